"""Headless Chromium through selenium and Debian's chromedriver, for the timeline's browser test and bench.

Debian's `chromium` and `chromium-driver` packages put the binaries at fixed paths; both are given to
selenium explicitly so it never tries to download a driver. `.ci/run` installs them and sets
IOTFAILOVER_REQUIRE_BROWSER=1, which turns "no browser here" from a skip into a failure.
"""
import os
import shutil

REQUIRE_ENV = "IOTFAILOVER_REQUIRE_BROWSER"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _which(*names: str) -> str | None:
    for name in names:
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not _which("/usr/bin/chromium", "chromium"):
        return "chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not _which("/usr/bin/chromedriver", "chromedriver"):
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    return None


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def start(user_data_dir: str, width: int = 1500, height: int = 1200):
    """A fresh headless Chromium with its own profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # keep selenium's own manager offline: the driver and browser paths are given
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = _which("/usr/bin/chromium", "chromium")
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_which("/usr/bin/chromedriver", "chromedriver"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
