"""Loading the plugin stays light: pytest imports it for every run where it is installed, and most
runs never open a hub, so neither the import nor a run without hub tests may load the SDK, the
embedded hub or the certificate tools. Checked on sys.modules, never on a timing."""
import json
import subprocess
import sys

pytest_plugins = ["pytester"]

HEAVY = ("azure", "trustme", "cryptography", "paho", "requests")
HEAVY_OWN = ("pytest_iotfailover.fakehub", "pytest_iotfailover.backends.real")


def _heavy(modules):
    return sorted(m for m in modules
                  if m.split(".")[0] in HEAVY or any(m == own or m.startswith(own + ".") for own in HEAVY_OWN))


def test_importing_the_plugin_loads_no_hub_sdk_or_certificates():
    code = "import json, sys, pytest_iotfailover.plugin; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout)
    assert "pytest_iotfailover.plugin.hooks" in modules and "pytest_iotfailover.plugin.fixtures" in modules
    assert _heavy(modules) == []


def test_a_run_without_hub_tests_loads_none_of_them(pytester):
    # the plugin's configure and collection hooks run too (settings, markers, limits)
    pytester.makeconftest("""
        import json, sys

        def pytest_collection_finish(session):
            with open("modules.json", "w") as f:
                json.dump(sorted(sys.modules), f)
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.failover(outage=1)
        def test_marked_but_not_run():
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--co", "-q")
    assert result.ret == 0, result.stdout.str()
    modules = json.loads((pytester.path / "modules.json").read_text())
    assert "pytest_iotfailover.plugin" in modules
    assert _heavy(modules) == []
