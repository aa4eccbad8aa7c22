"""The HTML timeline in a real browser: headless Chromium renders the page, DOM queries check what it drew.

Skipped with the reason when Chromium, chromedriver or selenium is missing; under CI
(IOTFAILOVER_REQUIRE_BROWSER=1, set by .ci/run) that is a failure instead.
"""
import json
import re
import subprocess
import sys
import time

import browser_support as chromium
import pytest
from report_samples import make_report, outboxed

from pytest_iotfailover.plugin import timeline

pytestmark = pytest.mark.timeout(180)

HOSTILE_DEVICE = '<img src=x onerror="window.pwned=1">'
HOSTILE_MESSAGE = '"><script>window.pwned=2</script>'
KEY = "c2VjcmV0LWtleS1vZi10aGUtZGV2aWNlLTAwMQ=="


@pytest.fixture
def browser(tmp_path):
    why = chromium.missing()
    if why:
        if chromium.required():
            pytest.fail(f"{chromium.REQUIRE_ENV} is set but the browser cannot run: {why}")
        pytest.skip(why)
    driver = chromium.start(str(tmp_path / "profile"))
    try:
        yield driver
    finally:
        driver.quit()


def _load(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.documentElement.getAttribute('data-rendered')") == "1")


def _drawn(driver, selector):
    """Elements matching selector that have a non-empty box on the page."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).filter(function(e){"
        "var r=e.getBoundingClientRect();return (r.width>0||r.height>0)&&getComputedStyle(e).visibility!=='hidden'}).length", selector)


def _hover_first_message(driver, lane_index=0, row=0):
    """Move the real pointer onto a message of a lane (its row in the lane's hover data, by
    position); return its id and the tooltip's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    x, y, mid = driver.execute_script(
        "var g=document.querySelectorAll('g.iotf-lane')[arguments[0]],s=g.ownerSVGElement,"
        "m=JSON.parse(g.getAttribute('data-m'))[arguments[1]],p=s.createSVGPoint();"
        "p.x=m[0];p.y=+g.getAttribute('data-y')+(+g.getAttribute('data-h'))/2;"
        "g.scrollIntoView({block:'center'});"
        "var q=p.matrixTransform(s.getScreenCTM());return [q.x,q.y,m[1]]", lane_index, row)
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(round(x), round(y))
    actions.perform()
    tip = driver.find_element("css selector", ".iotf-tip")
    WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
    return mid, tip.text


def _count(driver, selector):
    """The messages the paths matching selector stand for (their data-count)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".reduce(function(a,p){return a+(+p.getAttribute('data-count'))},0)", selector)


def _tick_xs(driver, lane_index, kind):
    """The x of every tick of `kind` drawn in a lane, read from its path in the page."""
    d = driver.execute_script(
        "var p=document.querySelectorAll('g.iotf-lane')[arguments[0]].querySelector('path.iotf-'+arguments[1]);"
        "return p?p.getAttribute('d'):''", lane_index, kind)
    return {float(x) for x in re.findall(r"M([0-9.]+) ", d)}


def _screenshot(driver, path):
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0


def _check_page(driver, report, lanes):
    test = report["tests"][1]
    assert chromium.console_errors(driver) == []
    assert _drawn(driver, "svg.iotf-timeline") == 1
    assert _drawn(driver, "g.iotf-lane") == lanes
    assert _drawn(driver, "rect.iotf-fault-window") == len(test["faults"])
    assert _drawn(driver, "rect.iotf-state, path.iotf-state") >= lanes
    # every send is in a send path, whatever the pixel merging did: an Outbox's message at each attempt
    # it started (at its submit time if never attempted), any other at each arrival the hub saw
    msgs = [m for d in test["devices"] for m in d["messages"]]
    sends = _count(driver, "path.iotf-send")
    assert sends == sum(len(m["attempts"]) if m.get("attempts") else 1 if "submitted" in m else len(m["sent"])
                        for m in msgs)
    # one acknowledgement tick per message acknowledged at the device or, not knowing that, by the hub
    assert _count(driver, "path.iotf-ack") == sum(
        1 for m in msgs if (m.get("device_acked") or m.get("acked")) is not None and m["fate"] != "lost_in_failover")
    never = [timeline.never_acked(m) for d in test["devices"] for m in d["messages"]]
    assert _count(driver, "path.iotf-never-acked-lost") == never.count("lost")
    assert _count(driver, "path.iotf-never-acked-pending") == never.count("pending")
    if any(never):
        assert _drawn(driver, "path.iotf-never-acked") >= 1
        assert driver.find_element("css selector", 'td[data-messages="never_acknowledged"]').text == \
            str(len([n for n in never if n]))
    for kind in ("ack", "delivery", "duplicate", "lost_in_failover"):
        assert _drawn(driver, f"path.iotf-{kind}") >= 1, kind
    fig = test["faults"][0]["figures"]
    text = driver.find_element("css selector", 'td[data-figure="time_to_recover"]').text
    assert text == f"{fig['time_to_recover']:.3f}s"
    assert driver.find_element("css selector", 'td[data-figure="lost_in_failover"]').text == \
        str(fig["lost_in_failover"])
    verdicts = driver.execute_script(
        "return Array.from(document.querySelectorAll('tr.iotf-slo')).map(function(r){return r.dataset.ok})")
    assert verdicts == [str(int(s["ok"])) for s in test["slos"]]
    assert "never disconnected" in driver.find_element("css selector", "body").text


def test_twenty_devices_region_failover(browser, tmp_path):
    report = make_report(devices=20, messages=1000)
    page = tmp_path / "report.html"
    page.write_text(timeline.render_html(report), encoding="utf-8")
    _load(browser, page)
    _check_page(browser, report, lanes=20)
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('g.iotf-lane')).map(function(g){return g.dataset.device})")
    assert labels == [d["device_id"] for d in report["tests"][1]["devices"]]
    # the one-device throttle shades only its device's lane
    heights = browser.execute_script(
        "return Array.from(document.querySelectorAll('rect.iotf-fault-window'))"
        ".map(function(r){return r.getBoundingClientRect().height})")
    assert heights[1] < heights[0] / 10
    mid, tip = _hover_first_message(browser, lane_index=2)
    assert tip.splitlines()[0] == mid
    assert tip.splitlines()[1] == "device-002"
    _screenshot(browser, tmp_path / "timeline-20-devices.png")
    assert chromium.console_errors(browser) == []


def test_outbox_view_marks_messages_never_acknowledged(browser, tmp_path):
    report = outboxed(make_report(devices=20, messages=1000))
    test = report["tests"][1]
    page = tmp_path / "report.html"
    page.write_text(timeline.render_html(report), encoding="utf-8")
    _load(browser, page)
    _check_page(browser, report, lanes=20)
    stuck = len(test["devices"]) - 1  # the device that never came back: its Outbox gave up on its messages
    assert browser.execute_script(
        "return document.querySelectorAll('g.iotf-lane')[arguments[0]]"
        ".querySelectorAll('path.iotf-never-acked-lost').length", stuck) == 1
    assert _drawn(browser, "path.iotf-never-acked-pending") == 1
    assert _drawn(browser, "path.iotf-failed_attempt") >= 1
    # the marks sit at the submit times: the first never-acknowledged mark of the stuck lane
    first = next(m for m in test["devices"][stuck]["messages"] if timeline.never_acked(m))
    rows = browser.execute_script(
        "return JSON.parse(document.querySelectorAll('g.iotf-lane')[arguments[0]].getAttribute('data-m'))", stuck)
    row = next(i for i, r in enumerate(rows) if r[1] == first["id"])
    mid, tip = _hover_first_message(browser, lane_index=stuck, row=row)
    assert mid == first["id"] and tip.splitlines()[0] == mid
    assert "never acknowledged; given up" in tip and "submitted +" in tip and "attempt started +" in tip
    pending = [m for m in test["devices"][stuck]["messages"] if timeline.never_acked(m) == "pending"][-1]
    row = next(i for i, r in enumerate(rows) if r[1] == pending["id"])
    _, tip = _hover_first_message(browser, lane_index=stuck, row=row)
    assert "still pending when the test ended" in tip
    assert "never acknowledged, given up" in browser.find_element("css selector", ".iotf-legend").text
    # a message retried after the outage: a send tick at each attempt's start, its ack tick at the
    # device's acknowledgement, and both named in the hover text
    lane, retried = next((i, m) for i, d in enumerate(test["devices"]) for m in d["messages"]
                         if m.get("attempt_count", 0) > 1 and m.get("device_acked"))
    sc = timeline._Scale(*timeline._time_range(test))
    assert {round(sc.x(t), 1) for t in retried["attempts"]} <= _tick_xs(browser, lane, "send")
    assert round(sc.x(retried["device_acked"]), 1) in _tick_xs(browser, lane, "ack")
    rows = browser.execute_script(
        "return JSON.parse(document.querySelectorAll('g.iotf-lane')[arguments[0]].getAttribute('data-m'))", lane)
    row = next(i for i, r in enumerate(rows) if r[1] == retried["id"])
    mid, tip = _hover_first_message(browser, lane_index=lane, row=row)
    assert mid == retried["id"]
    assert f"{retried['attempt_count']} attempts started +" in tip and "acknowledged at the device +" in tip
    assert "send attempt" in browser.find_element("css selector", ".iotf-legend").text
    _screenshot(browser, tmp_path / "timeline-outbox.png")
    assert chromium.console_errors(browser) == []


def _real_run(hub, device, client):
    """Messages through the real SDK and an Outbox: some plain, one whose PUBACK the hub holds back,
    one retried through a blackhole; the test's entry as the plugin would build it."""
    from azure.iot.device import Message
    from sdk_support import wait_until

    from pytest_iotfailover import Outbox
    from pytest_iotfailover.devices import observers
    from pytest_iotfailover.plugin import gate
    from pytest_iotfailover.plugin.reporting import OutboxWatch

    def attempts_of(ob, mid):
        return next(r for r in observers.snapshot(ob).messages if r.message_id == mid).attempt_count

    started, watch, faults = time.time(), OutboxWatch(), []
    ob = Outbox(client, name="real", send_timeout=0.5, min_backoff=0.05, max_backoff=0.1)
    try:
        for i in range(4):
            ob.send(Message(f"m{i}", message_id=f"before-{i}"))
        ob.flush(timeout=20)
        slow = hub.faults.delay_acks(0.25, device_id=device.device_id)
        ob.send(Message("late", message_id="late"))
        ob.flush(timeout=20)
        slow.cancel()
        dark = hub.faults.blackhole(None, device_id=device.device_id)
        ob.send(Message("retried", message_id="retried"))
        wait_until(lambda: attempts_of(ob, "retried") >= 3, 60, "three attempts of the blackholed message")
        dark.cancel()
        ob.flush(timeout=60)
        for i in range(4):
            ob.send(Message(f"a{i}", message_id=f"after-{i}"))
        ob.flush(timeout=20)
        snaps = watch.snapshots()
    finally:
        watch.stop()
        ob.close()
    for n, h in enumerate((slow, dark)):
        faults.append({"id": n, "kind": h.kind, "target": device.device_id,
                       "params": {}, "started_at": h.started_at, "ended_at": h.ended_at, "figures": {}, "recovery": []})
    lanes = gate.device_lanes([device.device_id], hub.events, hub.telemetry(include_lost=True), started, [],
                              outboxes=snaps)
    test = {"nodeid": "test_real_run", "outcome": "passed", "started_at": started, "ended_at": time.time(),
            "faults": faults, "devices": lanes, "delivery": None, "slos": []}
    return {"schema_version": 1, "run": {"backend": "fake"}, "tests": [test]}


def test_a_real_runs_attempts_and_device_acknowledgements(browser, tmp_path, hub, device, client):
    report = _real_run(hub, device, client)
    [test] = report["tests"]
    msgs = {m["id"]: m for m in test["devices"][0]["messages"]}
    late, retried = msgs["late"], msgs["retried"]
    assert late["device_acked"] > late["acked"]   # the hub held its PUBACK back
    assert retried["attempt_count"] >= 3 and len(retried["attempts"]) == min(retried["attempt_count"], 10)
    page = tmp_path / "real.html"
    page.write_text(timeline.render_html(report), encoding="utf-8")
    _load(browser, page)
    assert chromium.console_errors(browser) == []
    assert _drawn(browser, "g.iotf-lane") == 1 and _drawn(browser, "rect.iotf-fault-window") == 2
    assert _count(browser, "path.iotf-send") == sum(len(m["attempts"]) for m in msgs.values())
    assert _count(browser, "path.iotf-ack") == len(msgs)
    sc = timeline._Scale(*timeline._time_range(test))
    assert {round(sc.x(t), 1) for t in retried["attempts"]} <= _tick_xs(browser, 0, "send")
    assert round(sc.x(late["device_acked"]), 1) in _tick_xs(browser, 0, "ack")
    rows = browser.execute_script("return JSON.parse(document.querySelector('g.iotf-lane').getAttribute('data-m'))")
    for mid, expect in (("retried", f"{retried['attempt_count']} attempts started +"),
                        ("late", "acknowledged at the device +")):
        got, tip = _hover_first_message(browser, lane_index=0, row=next(i for i, r in enumerate(rows) if r[1] == mid))
        assert got == mid and tip.splitlines()[0] == mid and expect in tip, tip
    browser.find_element("css selector", "svg.iotf-timeline").screenshot(str(tmp_path / "timeline-real-run.png"))
    _screenshot(browser, tmp_path / "timeline-real-run-page.png")
    assert chromium.console_errors(browser) == []


def test_two_hundred_devices_ten_thousand_messages(browser, tmp_path):
    report = make_report(devices=200, messages=10_000)
    page = tmp_path / "report.html"
    page.write_text(timeline.render_html(report), encoding="utf-8")
    _load(browser, page)
    assert browser.find_element("css selector", "svg.iotf-timeline").get_attribute("data-banded") == "1"
    _check_page(browser, report, lanes=timeline.BANDS)
    bands = browser.execute_script(
        "return Array.from(document.querySelectorAll('g.iotf-lane'))"
        ".reduce(function(a,g){return a+(+g.dataset.band)},0)")
    assert bands == 200
    mid, tip = _hover_first_message(browser, lane_index=24)
    assert tip.splitlines()[0] == mid
    # the tooltip of the bottom band opens upwards instead of growing the plot a scrollbar
    assert browser.execute_script(
        "var c=document.querySelector('.iotf-plot');return c.scrollHeight<=c.clientHeight")
    _screenshot(browser, tmp_path / "timeline-200-devices.png")
    assert chromium.console_errors(browser) == []


def test_user_data_is_text_and_keys_stay_out(browser, tmp_path):
    report = make_report(devices=5, messages=50, device_prefix=HOSTILE_DEVICE)
    test = report["tests"][1]
    test["devices"][0]["messages"][0]["id"] = HOSTILE_MESSAGE
    test["faults"][0]["params"]["connection"] = f"HostName=h;DeviceId=d;SharedAccessKey={KEY}"
    page = tmp_path / "report.html"
    html_text = timeline.render_html(report)
    assert KEY not in html_text
    page.write_text(html_text, encoding="utf-8")
    _load(browser, page)
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script("return document.scripts.length") == 1  # the page's own ready mark
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('g.iotf-lane')).map(function(g){return g.dataset.device})")
    assert labels[0] == f"{HOSTILE_DEVICE}000"
    mid, tip = _hover_first_message(browser, lane_index=0)
    assert mid == HOSTILE_MESSAGE and tip.splitlines()[0] == HOSTILE_MESSAGE
    assert browser.execute_script("return window.pwned === undefined")
    assert "SharedAccessKey=<redacted>" in browser.find_element("css selector", "body").text
    assert chromium.console_errors(browser) == []


def test_fragment_inserted_like_pytest_html_extras(browser, tmp_path):
    """pytest-html puts an extra's HTML in with innerHTML, where <script> elements never run."""
    report = make_report(devices=12, messages=300)
    fragment = timeline.render_fragment(report["tests"][1])
    page = tmp_path / "host.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><div id='extra'></div><script>"
        f"document.getElementById('extra').innerHTML={json.dumps(fragment)};"
        "requestAnimationFrame(function(){document.documentElement.setAttribute('data-rendered','1')})"
        "</script></body></html>", encoding="utf-8")
    _load(browser, page)
    assert _drawn(browser, "#extra g.iotf-lane") == 12
    assert _drawn(browser, "#extra rect.iotf-fault-window") == 2
    assert _drawn(browser, '#extra table.iotf-figures td[data-figure="time_to_recover"]') == 2
    # the scoped style applied: figures are right-aligned numbers
    align = browser.execute_script(
        "return getComputedStyle(document.querySelector('td[data-figure]')).textAlign")
    assert align == "right"
    mid, tip = _hover_first_message(browser, lane_index=5)
    assert tip.splitlines()[0] == mid
    _screenshot(browser, tmp_path / "fragment.png")
    assert chromium.console_errors(browser) == []


INNER_CONFTEST = '''
import json, pathlib
import pytest
import pytest_html
from pytest_iotfailover.plugin import timeline

TEST = json.loads((pathlib.Path(__file__).parent / "test_record.json").read_text())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        report.extras = getattr(report, "extras", []) + [pytest_html.extras.html(timeline.render_fragment(TEST))]
'''


def test_inside_a_pytest_html_report(browser, tmp_path):
    """The fragment as a real pytest-html 4 report shows it: an `extras.html` entry per test."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        import pytest_html  # noqa: F401
    except ImportError:
        if chromium.required():
            pytest.fail(f"{chromium.REQUIRE_ENV} is set but pytest-html is not installed")
        pytest.skip("pytest-html is not installed")
    inner = tmp_path / "inner"
    inner.mkdir()
    report = make_report(devices=8, messages=200)
    (inner / "test_record.json").write_text(json.dumps(report["tests"][1]))
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text("def test_one():\n    pass\n")
    out = tmp_path / "pytest-html.html"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           f"--html={out}", "--self-contained-html", "-o", "render_collapsed=", str(inner)],
                          check=False, cwd=inner, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    browser.get(out.as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.querySelectorAll('.extraHTML svg.iotf-timeline').length") == 1)
    assert _drawn(browser, ".extraHTML g.iotf-lane") == 8
    assert _drawn(browser, ".extraHTML rect.iotf-fault-window") == 2
    assert _drawn(browser, '.extraHTML td[data-figure="time_to_recover"]') == 2
    # pytest-html's own table style does not re-align the figures
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('.extraHTML td[data-figure]')).textAlign") == "right"
    mid, tip = _hover_first_message(browser, lane_index=3)
    assert tip.splitlines()[0] == mid
    _screenshot(browser, tmp_path / "pytest-html.png")
    assert chromium.console_errors(browser) == []
