"""Loading the plugin stays light: pytest imports it for every run where it is installed, and most
runs never open a hub, so neither the import nor a run without hub tests may load the SDK, the
embedded hub or the certificate tools; nor the CI gate's machinery (SLO, baseline, timeline), the
per-test record or the watchdog, until a gate option, a marker's slo= or a hub test asks for them.
Checked on sys.modules, never on a timing (bench/bench_start.py has the figures)."""
import json
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

HEAVY = ("azure", "trustme", "cryptography", "paho", "requests")
HEAVY_OWN = ("pytest_iotfailover.fakehub", "pytest_iotfailover.backends.real")
# the embedded hub's setting rules the options are checked with, and their lazy package: light
LIGHT_OWN = ("pytest_iotfailover.fakehub", "pytest_iotfailover.fakehub.nap", "pytest_iotfailover.fakehub.rules")


# what a run needs only for a hub test, a gate option or a marker's slo=
GATE = ("pytest_iotfailover.plugin.gate", "pytest_iotfailover.testing.slo", "pytest_iotfailover.testing.baseline",
        "pytest_iotfailover.plugin.timeline")
PER_HUB_TEST = ("pytest_iotfailover.plugin.watchdog", "pytest_iotfailover.plugin.reporting",
                "pytest_iotfailover.testing.assertions", "pytest_iotfailover.iothub.auth")

# records what the run imported once every test has run (their hooks have loaded what they need)
RECORDING_CONFTEST = """
    import json, sys

    def pytest_sessionfinish(session):
        with open("modules.json", "w") as f:
            json.dump(sorted(sys.modules), f)
"""


@pytest.fixture
def run(pytester, monkeypatch):
    for var in ("IOTHUB_CONNECTION_STRING", "IOTFAILOVER_SLO", "IOTFAILOVER_REPORT", "IOTFAILOVER_BASELINE",
                "IOTFAILOVER_MAX_REGRESSION", "IOTFAILOVER_HTML", "IOTFAILOVER_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeconftest(RECORDING_CONFTEST)

    def run(*args):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        return result, json.loads((pytester.path / "modules.json").read_text())
    return run


def _heavy(modules):
    return sorted(m for m in modules if m not in LIGHT_OWN and (
        m.split(".")[0] in HEAVY or any(m == own or m.startswith(own + ".") for own in HEAVY_OWN)))


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


PLAIN_SUITE = """
    import pytest

    @pytest.mark.parametrize("n", [1])
    def test_other_marker(n):
        pass

    def test_plain():
        pass
"""


def test_a_run_without_hub_tests_or_gate_options_loads_no_gate_record_or_watchdog(pytester, run):
    pytester.makepyfile(PLAIN_SUITE)
    result, modules = run("-q")
    result.assert_outcomes(passed=2)
    assert [m for m in GATE + PER_HUB_TEST if m in modules] == []
    assert _heavy(modules) == []


@pytest.mark.parametrize("var, value", [("IOTFAILOVER_NAP", "0.01"), ("IOTFAILOVER_HUB_NAME", "from-env")])
def test_embedded_hub_settings_in_the_environment_load_no_hub(pytester, run, monkeypatch, var, value):
    # a CI job that sets the hub's options for all its runs: the ones without hub tests stay light
    monkeypatch.setenv(var, value)
    pytester.makepyfile(PLAIN_SUITE)
    result, modules = run("-q")
    result.assert_outcomes(passed=2)
    assert _heavy(modules) == []


def test_slo_option_loads_the_gate_and_judges(pytester, run):
    pytester.makepyfile(PLAIN_SUITE)
    result, modules = run("-q", "--iothub-slo", "lost==0", "--iothub-report", "report.json")
    # a delivery objective for tests that made no delivery assertion: not measured, an error each
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*SLO not measured: lost==0*"])
    assert [m for m in GATE[:3] if m not in modules] == []
    report = json.loads((pytester.path / "report.json").read_text())
    assert sorted(t["nodeid"].split("::")[1] for t in report["tests"]) == ["test_other_marker[1]", "test_plain"]
    assert _heavy(modules) == []


def test_a_marker_slo_loads_the_gate_for_its_test(pytester, run):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.failover(slo="lost==0")
        def test_marked():
            pass

        def test_plain():
            pass
    """)
    result, modules = run("-q")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_marked*", "SLO not measured: lost==0*"])
    assert [m for m in GATE[:2] if m not in modules] == []


def test_a_hub_test_loads_its_record_and_watchdog_but_not_the_gate(pytester, run):
    pytester.makepyfile("""
        def test_hub(iothub):
            assert iothub.recorder is not None

        def test_hub_at_run_time(request):
            # not among the test's fixture names: the fixture makes the record itself
            assert request.getfixturevalue("iothub").recorder is not None
    """)
    result, modules = run("-q")
    result.assert_outcomes(passed=2)
    assert [m for m in PER_HUB_TEST[:2] if m not in modules] == []
    assert [m for m in GATE if m in modules] == []
