"""What the HTML timeline costs: render time and page size in Python, load-to-rendered time in Chromium.

For each (devices, messages) case, a synthetic report (tests/report_samples.py) is rendered with
`timeline.render_html` several times (the best time is printed), written to a temporary file, and opened
in headless Chromium (Debian's `chromium` and `chromium-driver`) with a fresh profile per load. The
browser figures come from the page's own Performance API: `domContentLoadedEventEnd` and `loadEventEnd`
of the navigation entry, the first contentful paint, and the page's `iotf-rendered` mark, set in the
first animation frame after the document was parsed (FCP is "-" when Chromium had not reported it by
then). This is a script that prints figures, not a test.

    python bench/bench_timeline.py                  # 20/200 devices x 1k/10k messages, 3 loads each
    python bench/bench_timeline.py --no-browser     # Python side only
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import browser_support
from report_samples import make_report

from pytest_iotfailover.plugin import timeline

_PERF = """
var n = performance.getEntriesByType('navigation')[0];
var fcp = performance.getEntriesByName('first-contentful-paint')[0];
var mark = performance.getEntriesByName('iotf-rendered')[0];
return [n.domContentLoadedEventEnd, n.loadEventEnd, fcp ? fcp.startTime : null, mark ? mark.startTime : null,
        document.querySelectorAll('g.iotf-lane').length, document.getElementsByTagName('*').length];
"""


def _render(report, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        page = timeline.render_html(report)
        best = min(best, time.perf_counter() - t)
    return page, best


def _load(path, loads, tmp):
    from selenium.webdriver.support.ui import WebDriverWait

    runs = []
    for i in range(loads):
        driver = browser_support.start(os.path.join(tmp, f"profile-{os.path.basename(path)}-{i}"))
        try:
            driver.get("file://" + path)
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return document.documentElement.getAttribute('data-rendered')") == "1")
            runs.append(driver.execute_script(_PERF))
        finally:
            driver.quit()
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="20,200", help="comma-separated device counts")
    ap.add_argument("--messages", default="1000,10000", help="comma-separated message counts")
    ap.add_argument("--repeat", type=int, default=5, help="renders per case (best is printed)")
    ap.add_argument("--loads", type=int, default=3, help="browser loads per case (median is printed)")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args(argv)
    why = "--no-browser" if args.no_browser else browser_support.missing()
    if why:
        print(f"browser figures skipped: {why}")
    ms = lambda v: "-" if v is None else f"{v:7.0f}"
    print(f"{'devices':>7} {'messages':>8} {'lanes':>5} {'render ms':>9} {'page KiB':>8} "
          f"{'DOM nodes':>9} {'DCL ms':>7} {'load ms':>7} {'FCP ms':>7} {'ready ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for devices in (int(x) for x in args.devices.split(",")):
            for messages in (int(x) for x in args.messages.split(",")):
                report = make_report(devices=devices, messages=messages)
                page, secs = _render(report, args.repeat)
                path = os.path.join(tmp, f"timeline-{devices}-{messages}.html")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(page)
                row = (f"{devices:7} {messages:8} ", f"{secs * 1000:9.1f} {len(page.encode()) / 1024:8.0f}")
                if why:
                    print(f"{row[0]}{'-':>5} {row[1]}")
                    continue
                runs = sorted(_load(path, args.loads, tmp), key=lambda r: r[3] or 0)
                dcl, load, fcp, ready, lanes, nodes = runs[len(runs) // 2]
                print(f"{row[0]}{lanes:5} {row[1]} {nodes:9} {ms(dcl)} {ms(load)} {ms(fcp)} {ms(ready):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
