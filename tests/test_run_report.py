"""The CI gate end to end: pytester runs with the embedded hub and the real SDK client through a short
region failover; objectives, baselines, the run report (checked against its JSON schema), the
timeline page and pytest-html's extras."""
import json
import re
from pathlib import Path

import jsonschema
import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

SCHEMA = json.loads((Path(__file__).parent.parent / "pytest_iotfailover" / "plugin" / "report_schema.json")
                    .read_text())

SUITE = """
    import pytest
    from azure.iot.device import Message
    from pytest_iotfailover import assert_all_delivered

    def test_fails_over(iothub, device_client, failover):
        device_client.send_message(Message("a", message_id="a"))
        failover(outage=0.5, unread=0).wait_recovered(timeout=30)
        device_client.send_message(Message("b", message_id="b"))
        assert_all_delivered(iothub, ["a"], timeout=10)
        assert_all_delivered(iothub, ["b"], timeout=10)   # both assertions count

    @pytest.mark.failover(slo="recover<0s")   # can never hold: the marker's objective wins
    def test_marker_tightens(iothub, device_client, failover):
        failover(outage=0.5, unread=0).wait_recovered(timeout=30)

    def test_short_blackhole(iothub, device_client, failover):
        # shorter than the client's keep-alive (5 s): the device never notices
        failover.blackhole(seconds=0.2).wait(timeout=10).wait_recovered(timeout=10)
        device_client.send_message(Message("c", message_id="c"))
        assert_all_delivered(iothub, ["c"], timeout=10)
"""

OBJECTIVES = "recover<=60s, lost==0, duplicates<=50%"


@pytest.fixture
def run(pytester, monkeypatch):
    for var in ("IOTHUB_CONNECTION_STRING", "IOTFAILOVER_SLO", "IOTFAILOVER_REPORT", "IOTFAILOVER_BASELINE",
                "IOTFAILOVER_MAX_REGRESSION", "IOTFAILOVER_HTML", "IOTFAILOVER_OUTAGE", "IOTFAILOVER_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)

    def run(*args):
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    return run


def _validated(path: Path) -> dict:
    doc = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def _by_name(doc: dict) -> dict:
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_report_slo_and_figures(pytester, run, workers):
    pytester.makepyfile(SUITE)
    result = run("--iothub-slo", OBJECTIVES, "--iothub-report", "out/report.json", "--junitxml=out.xml", *workers)
    result.assert_outcomes(passed=3, errors=1)
    out = result.stdout.str()
    # the marker's objective replaces the session's recover<=60s; the session's others still apply
    assert re.search(r"^SLO broken: recover \d+\.\d\ds >= 0s \(region_failover outage \d+\.\d\ds, "
                     r"1 device, device test-marker-tightens-\d+ last back\)", out, re.MULTILINE)
    assert "SLO not measured: lost==0: the test made no delivery assertion" in out
    assert "iothub gate: SLO and baseline" in out
    assert "NOT RECOVERED" not in out
    doc = _validated(pytester.path / "out" / "report.json")
    assert doc["run"]["workers"] == (2 if workers else 0)
    tests = _by_name(doc)
    assert set(tests) == {"test_fails_over", "test_marker_tightens", "test_short_blackhole"}
    over = tests["test_fails_over"]
    assert over["outcome"] == "passed" and all(s["ok"] for s in over["slos"])
    assert over["delivery"]["sent"] == 2 and over["delivery"]["delivered"] == 2
    fault = over["faults"][0]
    assert fault["kind"] == "region_failover" and fault["params"]["outage"] == 0.5
    assert fault["recovery"][0]["status"] == "recovered"
    # disconnected during the fault, back after it: away at least as long as it took to come back
    assert fault["figures"]["downtime_max"] >= fault["figures"]["time_to_recover"] > 0
    lane = over["devices"][0]
    assert [s["state"] for s in lane["states"]][:3] == ["connected", "reconnecting", "connected"]
    assert {m["id"] for m in lane["messages"]} == {"a", "b"}
    tight = tests["test_marker_tightens"]
    assert tight["outcome"] == "failed"
    assert {s["name"]: s["ok"] for s in tight["slos"]} == {"recover<0s": False, "lost==0": False,
                                                          "duplicates<=50%": False}
    short = tests["test_short_blackhole"]
    assert short["outcome"] == "passed"
    assert short["faults"][0]["recovery"][0]["status"] == "never_disconnected"
    assert short["faults"][0]["figures"]["time_to_recover"] == 0.0
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="iothub_time_to_recover_s" value=""' not in xml
    assert "iothub_report_entry" not in xml
    props = re.findall(r'name="iothub_failover" value="([^"]*)"', xml)
    assert props and all(json.loads(p.replace("&quot;", '"'))["faults"][0]["recovered"] for p in props)


@pytest.mark.parametrize("how", ["cli", "env", "ini"])
def test_malformed_objective_is_a_usage_error_naming_option_and_term(pytester, run, monkeypatch, how):
    pytester.makepyfile("def test_nothing(): pass")
    args = []
    if how == "cli":
        args, source = ["--iothub-slo", "recover<=30s, lost<=banana"], "--iothub-slo"
    elif how == "env":
        monkeypatch.setenv("IOTFAILOVER_SLO", "recover<=30s, lost<=banana")
        source = "IOTFAILOVER_SLO (environment)"
    else:
        pytester.makeini("[pytest]\niothub_slo = recover<=30s, lost<=banana\n")
        source = "ini option iothub_slo"
    result = run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{source}: bad objective 'lost<=banana'" in result.stderr.str()


def test_malformed_marker_objective_is_a_collection_error(pytester, run):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.failover(slo="recovr<=3s")
        def test_marked():
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    assert "bad objective 'recovr<=3s'" in result.stdout.str()


def test_baseline_regression_fails_and_missing_is_reported(pytester, run):
    pytester.makepyfile(SUITE)
    run("--iothub-report", "first.json", "-k", "not tightens").assert_outcomes(passed=2)
    base = json.loads((pytester.path / "first.json").read_text())
    for t in base["tests"]:
        for f in t["faults"]:
            f["figures"]["downtime_p99"] = 0.0  # the device is away for the whole outage: always worse
    base["tests"] = [t for t in base["tests"] if not t["nodeid"].endswith("test_short_blackhole")]
    (pytester.path / "base.json").write_text(json.dumps(base))
    result = run("--iothub-baseline", "base.json", "--iothub-max-regression", "20%", "--iothub-report", "second.json",
                 "-k", "fails_over or short_blackhole")
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "BASELINE test_baseline_regression_fails_and_missing_is_reported.py::test_fails_over: regression" in out
    assert re.search(r"baseline: downtime_p99 0\.00s \(run base\.json\), now \d+\.\d\ds: \d+\.\d\ds worse than a "
                     r"zero baseline, allowed 20% \(region_failover #1\)", out)
    assert "test_short_blackhole: not in the baseline (run base.json): not compared" in out
    doc = _validated(pytester.path / "second.json")
    over = _by_name(doc)["test_fails_over"]
    assert over["outcome"] == "failed" and over["baseline"]["results"][0]["regressed"] is True


def test_bad_baseline_and_regression_values_are_usage_errors(pytester, run):
    pytester.makepyfile("def test_nothing(): pass")
    result = run("--iothub-baseline", "nowhere.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "--iothub-baseline: cannot read nowhere.json" in result.stderr.str()
    result = run("--iothub-max-regression", "0.2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "--iothub-max-regression: bad value '0.2'" in result.stderr.str()


def test_marker_objectives_gate_without_any_option(pytester, run):
    pytester.makepyfile(SUITE)
    result = run("-k", "tightens")
    result.assert_outcomes(passed=1, errors=1)
    assert re.search(r"^SLO broken: recover \d+\.\d\ds >= 0s", result.stdout.str(), re.MULTILINE)


def test_html_timeline_and_pytest_html_extras(pytester, run):
    pytester.makepyfile(SUITE)
    result = run("--iothub-html", "timeline.html", "--html", "ph.html", "--self-contained-html",
                 "-k", "fails_over")
    result.assert_outcomes(passed=1)
    page = (pytester.path / "timeline.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "<svg" in page
    assert re.search(r"test-fails-over-\d+", page)  # the device's lane
    assert "region_failover" in page
    html = (pytester.path / "ph.html").read_text()
    assert "iotf" in html and "region_failover" in html


def test_page_from_a_real_run_opens_in_a_browser(pytester, run, tmp_path):
    import browser_support as chromium
    why = chromium.missing()
    if why:
        if chromium.required():
            pytest.fail(f"{chromium.REQUIRE_ENV} is set but the browser cannot run: {why}")
        pytest.skip(why)
    from selenium.webdriver.support.ui import WebDriverWait

    pytester.makepyfile(SUITE)
    run("--iothub-html", "timeline.html", "--iothub-report", "report.json", "-k", "fails_over").assert_outcomes(
        passed=1)
    doc = _validated(pytester.path / "report.json")
    driver = chromium.start(str(tmp_path / "profile"))
    try:
        driver.get((pytester.path / "timeline.html").as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.documentElement.getAttribute('data-rendered')") == "1")
        assert chromium.console_errors(driver) == []
        lanes = driver.execute_script("return document.querySelectorAll('g.iotf-lane').length")
        assert lanes == len(doc["tests"][0]["devices"]) == 1
        assert driver.execute_script("return document.querySelectorAll('rect.iotf-fault-window').length") == 1
        fig = doc["tests"][0]["faults"][0]["figures"]
        text = driver.find_element("css selector", 'td[data-figure="time_to_recover"]').text
        assert text == f"{fig['time_to_recover']:.3f}s"
    finally:
        driver.quit()


def test_messages_the_failover_lost_are_drawn_as_lost_in_failover(pytester, run):
    # acknowledged before the failover and never read by the backend: the timeline marks them apart
    pytester.makepyfile("""
        from azure.iot.device import Message

        def test_loses_unread(iothub, device_client, failover):
            for i in range(3):
                device_client.send_message(Message(str(i), message_id=f"m{i}"))
            failover.region_failover(outage=0.5, unread=60).wait(30)
            device_client.send_message(Message("after", message_id="after"))
            iothub.wait_for_telemetry(1)
    """)
    result = run("--iothub-report", "report.json")
    result.assert_outcomes(passed=1)
    [test] = _validated(pytester.path / "report.json")["tests"]
    fates = {m["id"]: m["fate"] for m in test["devices"][0]["messages"]}
    assert fates == {"m0": "lost_in_failover", "m1": "lost_in_failover", "m2": "lost_in_failover",
                     "after": "delivered"}
