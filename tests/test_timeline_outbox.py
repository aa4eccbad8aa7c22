"""The Outboxes' view in the run report and the timeline: submit times, failed attempts, final state,
and the messages that never reached the hub.

In process: devices.observers and the plugin's per-test watch, with the real SDK client and the
embedded hub. End to end: pytester runs a suite whose Outboxes (one made in the test body, one by a
user fixture, one that drops) lose messages to a region failover; the report (checked against its
schema, serially and under pytest-xdist) draws those messages as never acknowledged at their submit
times.
"""
import asyncio
import gc
import json
import re
import threading
import warnings
from pathlib import Path

import jsonschema
import pytest
from azure.iot.device import Message
from sdk_support import wait_until

from pytest_iotfailover import Outbox
from pytest_iotfailover.devices import observers
from pytest_iotfailover.plugin import gate, timeline
from pytest_iotfailover.plugin.reporting import OutboxWatch

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(180)

SCHEMA = json.loads((Path(__file__).parent.parent / "pytest_iotfailover" / "plugin" / "report_schema.json")
                    .read_text())


def _blackholed(hub, device):
    """A fault under which the device's publishes are never read: none can be acknowledged."""
    return hub.faults.blackhole(300, device_id=device.device_id)


def test_a_listener_hears_of_outboxes_made_and_closed_and_keeps_none_alive(hub, device, client):
    made, shut = [], []
    with observers.listen(made.append, shut.append):
        ob = Outbox(client, name="heard")
        assert made == [ob] and shut == []
        ob.send(Message("m", message_id="m"))
        ob.flush(timeout=20)
        ob.close()
        assert shut == [ob]
    Outbox(client, name="after").close()  # the listener was closed: nothing more arrives
    assert [o.name for o in made] == ["heard"] and len(shut) == 1


def test_the_watch_snapshots_an_outbox_closed_and_dropped_before_teardown(hub, device, client):
    watch = OutboxWatch()
    try:
        dark = _blackholed(hub, device)
        ob = Outbox(client, name="gone", send_timeout=30)
        ob.send(Message("acked?", message_id="a0"))
        ob.send(Message("queued", message_id="a1"))
        ob.close(timeout=10)
        ref = _weak(ob)
        del ob
        # the abandoned call for a0 holds the outbox until the hub reads it again and it returns
        dark.cancel()
        wait_until(lambda: gc.collect() >= 0 and ref() is None, 20, "the Outbox collected")
        [snap] = watch.snapshots()
        assert snap.name == "gone" and snap.closed
        records = {r.message_id: r for r in snap.messages}
        assert records["a1"].state == "pending" and records["a1"].device_id == device.device_id
        assert records["a1"].submitted_at is not None and records["a1"].failures == ()
    finally:
        watch.stop()
    assert not [x for x in observers._listeners if x is watch._listener]
    assert watch.snapshots() == []


def _weak(obj):
    import weakref
    return weakref.ref(obj)


def test_a_failing_listener_is_a_warning_and_the_outbox_still_sends(hub, device, client):
    def broken(_outbox):
        raise RuntimeError("collector bug")
    with observers.listen(broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Outbox(client) as ob:
            ob.send(Message("x", message_id="x"))
            ob.flush(timeout=20)
    assert any("collector bug" in str(w.message) for w in caught)
    assert ob.sent_ids == ["x"]


def test_outboxes_made_on_other_threads_during_the_test_count_too(hub, device, client):
    watch = OutboxWatch()
    try:
        made = []
        t = threading.Thread(target=lambda: made.append(Outbox(client, name="threaded")))
        t.start()
        t.join(10)
        assert [s.name for s in watch.snapshots()] == ["threaded"]
        made[0].close()
    finally:
        watch.stop()


def test_an_async_outbox_is_watched_too(hub, device):
    from sdk_support import make_client

    from pytest_iotfailover import AsyncOutbox

    async def scenario(watch):
        c = make_client(hub, device, aio=True)
        await asyncio.wait_for(c.connect(), 10)
        try:
            async with AsyncOutbox(c, name="aio") as ob:
                ob.send(Message("x", message_id="x"))
                await ob.flush(15)
            return watch.snapshots()
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    watch = OutboxWatch()
    try:
        [snap] = asyncio.run(asyncio.wait_for(scenario(watch), 30))
    finally:
        watch.stop()
    assert snap.name == "aio" and snap.closed
    assert [(r.message_id, r.state, r.device_id) for r in snap.messages] == [("x", "acknowledged", device.device_id)]


def test_a_pools_pending_messages_are_placed_on_their_devices(hub):
    from pytest_iotfailover import DevicePool
    devices = [hub.add_device(f"pooled{i}") for i in range(2)]
    pool = DevicePool(devices, keep_alive=5, connect_timeout=5.0, operation_timeout=10.0,
                      server_verification_cert=hub.ca_pem)
    watch = OutboxWatch()
    try:
        pool.connect(timeout=10)
        dark = hub.faults.blackhole(300, device_id="pooled1")
        with Outbox(pool, name="pooled", send_timeout=30) as ob:
            ob.send(Message("a", message_id="a"), device_id="pooled0")
            ob.send(Message("b", message_id="b"), device_id="pooled1")
            ob.send(Message("c", message_id="c"), device_id="pooled1")
            wait_until(lambda: "a" in ob.sent_ids, 20, "a acknowledged")
            [snap] = watch.snapshots()
        dark.cancel()
    finally:
        watch.stop()
        pool.close(timeout=10)
    records = {r.message_id: (r.device_id, r.state) for r in snap.messages}
    # an acknowledged message's device is left to the hub's ledger; the pending ones keep their lane
    assert records == {"a": (None, "acknowledged"), "b": ("pooled1", "pending"), "c": ("pooled1", "pending")}


def _record(ob, mid):
    return next(r for r in observers.snapshot(ob).messages if r.message_id == mid)


def test_the_outbox_records_when_the_device_got_the_acknowledgement(hub, device, client):
    # the hub enqueues on arrival and holds back the PUBACK: the device hears of it later than the hub says
    slow = hub.faults.delay_acks(0.3, device_id=device.device_id)
    with Outbox(client, name="timed", send_timeout=30) as ob:
        ob.send(Message("late", message_id="late"))
        ob.flush(timeout=20)
    slow.cancel()
    rec = _record(ob, "late")
    [copy] = [t for t in hub.telemetry(include_lost=True) if t.message_id == "late"]
    assert rec.state == "acknowledged" and rec.attempt_count == 1 and len(rec.attempts) == 1
    assert rec.submitted_at <= rec.attempts[0] <= rec.acked_at
    assert copy.enqueued_at < rec.acked_at
    lanes = gate.device_lanes([device.device_id], hub.events, hub.telemetry(include_lost=True),
                              rec.submitted_at, [], outboxes=[observers.snapshot(ob)])
    [m] = lanes[0]["messages"]
    assert m["attempts"] == list(rec.attempts) and m["attempt_count"] == 1
    assert m["device_acked"] == rec.acked_at and m["acked"] == copy.enqueued_at


def test_attempts_are_kept_within_a_bound_however_long_the_retries(hub, device, client):
    from pytest_iotfailover.devices.send_times import ATTEMPTS_KEPT
    dark = _blackholed(hub, device)
    ob = Outbox(client, name="retried", send_timeout=0.3, min_backoff=0.01, max_backoff=0.02)
    try:
        ob.send(Message("r", message_id="r"))
        ob.send(Message("behind", message_id="behind"))
        wait_until(lambda: _record(ob, "r").attempt_count > ATTEMPTS_KEPT + 2, 90, "attempts beyond the bound")
        queued = _record(ob, "behind")
        assert (queued.attempts, queued.attempt_count, queued.acked_at) == ((), 0, None)  # never tried yet
        dark.cancel()
        ob.flush(timeout=60)
        rec = _record(ob, "r")
    finally:
        dark.cancel()
        ob.close()
    assert len(rec.attempts) == ATTEMPTS_KEPT and rec.attempt_count > ATTEMPTS_KEPT + 2
    assert list(rec.attempts) == sorted(rec.attempts) and rec.attempts[0] >= rec.submitted_at
    # every attempt but the one running when the acknowledgement came ended in a failure first
    assert rec.attempt_count - 1 <= len(rec.failures) <= rec.attempt_count
    assert rec.acked_at is not None and rec.acked_at >= rec.attempts[0]
    assert _record(ob, "behind").attempt_count >= 1


def test_the_summary_counts_what_the_outboxes_never_got_acknowledged(hub, device, client):
    from pytest_iotfailover.plugin import reporting
    record = reporting.TestRecord("t")
    record.outboxes = OutboxWatch(whole=False)
    try:
        ob = Outbox(client, name="counted", capacity=2, on_overflow="drop_oldest", send_timeout=30)
        ob.send(Message("ok", message_id="ok"))
        ob.flush(timeout=20)
        dark = _blackholed(hub, device)
        ob.send(Message("s1", message_id="s1"))
        wait_until(lambda: _record(ob, "s1").attempt_count, 20, "s1 being sent")
        for mid in ("s2", "s3"):  # s2 is dropped for s3: the outbox holds two, s1 being sent
            ob.send(Message(mid, message_id=mid))
        assert ob.dropped_ids == ["s2"]
        gone = Outbox(client, name="closed-early", send_timeout=30)
        gone.send(Message("g1", message_id="g1"))
        gone.close()
        assert record.never_acknowledged() == {"never_acknowledged": 4, "given_up": 2, "pending": 2}
        snaps = {s.name: s for s in record.outbox_snapshots()}
        # only what the summary needs: the messages never acknowledged
        assert {r.message_id for r in snaps["counted"].messages} == {"s1", "s2", "s3"}
        dark.cancel()
        ob.flush(timeout=30)
        # taken once: the view is the one at the end of the test, not what came after
        assert record.never_acknowledged()["never_acknowledged"] == 4
    finally:
        record.outboxes.stop()
        ob.close()
    record.faults = []
    record.deliveries = []
    assert record.summary() is None  # nothing to report without a fault or a delivery assertion


def test_summary_line_and_junit_property_name_the_never_acknowledged():
    from pytest_iotfailover.plugin import reporting
    record = reporting.TestRecord("t")
    record._outboxes_at_end = [Snap("ob", True, observers.MessageRecord("a", "d", 1.0, "pending", ()),
                                    observers.MessageRecord("b", "d", 1.0, "acknowledged", (), (1.1,), 1, 1.2)),
                               Snap("open", False, observers.MessageRecord("c", "d", 1.0, "pending", ()),
                                    observers.MessageRecord("e", "d", 1.0, "dropped", ()),
                                    # dropped, but an abandoned call got through: acknowledged at the device
                                    observers.MessageRecord("f", "d", 1.0, "dropped", (), (1.1,), 1, 1.3))]
    record.faults.append(_Report())
    s = record.summary()
    assert s["outboxes"] == {"never_acknowledged": 3, "given_up": 2, "pending": 1}
    [line] = reporting.summary_lines([("t", "passed", s)])
    assert line.endswith("; no delivery assertion; 3 never acknowledged (2 given up, 1 pending)")
    assert ("iothub_never_acknowledged", 3) in record.user_properties()
    record._outboxes_at_end = [Snap("ob", True, observers.MessageRecord("b", "d", 1.0, "acknowledged", ()))]
    s = record.summary()
    assert "never acknowledged" not in reporting.summary_lines([("t", "passed", s)])[0]
    assert ("iothub_never_acknowledged", 0) in record.user_properties()
    record._outboxes_at_end = []
    assert "outboxes" not in record.summary()  # no Outbox: not measured, left out
    assert not [p for p in record.user_properties() if p[0] == "iothub_never_acknowledged"]


class _Report:
    """A RecoveryReport as far as the summary reads one."""
    fault, target, outage, time_to_detect, time_to_recover = "blackhole", None, 1.0, 0.1, 0.2
    started_at, ended_at, devices, recovered, never_disconnected, throttled, wedged = 1.0, 2.0, {}, True, [], 0.0, {}

    def downtimes(self):
        return []


class Snap(observers.OutboxSnapshot):
    def __init__(self, name, closed, *records):
        super().__init__(name, closed, records)


def test_lanes_merge_the_outbox_view_into_the_hubs():
    class T:  # a hub telemetry record
        def __init__(self, device_id, message_id, at, lost=False):
            self.device_id, self.message_id, self.enqueued_at, self.lost_in_failover = device_id, message_id, at, lost
    rec = observers.MessageRecord
    telemetry = [T("d1", "seen", 10.5), T("d1", "unacked", 11.5), T("d2", "never", 11.9)]
    snaps = [Snap("ob", True, rec("seen", "d1", 10.0, "acknowledged", (10.2,)),
                  rec("unacked", "d1", 11.0, "pending", ()),
                  rec("never", "d1", 12.0, "pending", (12.5, 13.5)),
                  rec("gave-up", "d1", 12.2, "dropped", ())),
             Snap("pool", False, rec("pooled", "d9", 13.0, "pending", ()),
                  rec("who", None, 13.1, "dropped", ()))]
    # d2 sent an id of its own that d1's Outbox also used: the hub's copy is d2's, not d1's
    lanes = gate.device_lanes(["d1", "d2"], [], telemetry, 9.0, [], outboxes=snaps)
    by = {lane["device_id"]: {m["id"]: m for m in lane["messages"]} for lane in lanes}
    d1 = by["d1"]
    assert d1["seen"]["submitted"] == 10.0 and d1["seen"]["sent"] == [10.5] and d1["seen"]["acked"] == 10.5
    assert d1["seen"]["failures"] == [10.2] and d1["seen"]["outbox_state"] == "acknowledged"
    # the hub has it but the device never got the acknowledgement
    assert d1["unacked"]["fate"] == "delivered" and d1["unacked"]["acked"] is None
    assert d1["never"] == {"id": "never", "sent": [12.0], "acked": None, "delivered": None, "duplicates": [],
                           "fate": "lost", "submitted": 12.0, "outbox": "ob", "outbox_state": "pending",
                           "failures": [12.5, 13.5]}
    assert d1["gave-up"]["fate"] == "lost"
    assert by["d2"]["never"]["fate"] == "delivered" and "submitted" not in by["d2"]["never"]
    assert by["d9"]["pooled"]["fate"] == "in_flight"   # its outbox is still open
    assert by["pool (device not known)"]["who"]["fate"] == "lost"
    test = {"nodeid": "t", "devices": lanes, "faults": [{"started_at": 11.0, "ended_at": 12.0}]}
    counts = timeline.message_counts(test)
    assert counts["never_acknowledged"] == 4 and counts["given_up"] == 3 and counts["still_pending"] == 1
    assert counts["failed_attempts"] == 3 and counts["submitted"] == 6


def test_the_timeline_draws_never_acknowledged_marks_at_submit_times():
    from report_samples import make_report
    report = make_report(devices=3, messages=30)
    test = report["tests"][1]
    msgs = test["devices"][0]["messages"]
    msgs[0].update(submitted=msgs[0]["sent"][0] - 0.05, outbox="ob", outbox_state="pending", failures=[],
                   fate="lost", acked=None, delivered=None)
    msgs[1].update(submitted=msgs[1]["sent"][0], outbox="ob", outbox_state="pending", failures=[msgs[1]["sent"][0]],
                   fate="in_flight", acked=None, delivered=None)
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    html = timeline.render_fragment(test)
    assert 'class="iotf-mark iotf-never-acked iotf-never-acked-lost"' in html
    assert 'class="iotf-mark iotf-never-acked iotf-never-acked-pending"' in html
    assert 'data-messages="never_acknowledged"' in html


def _path_xs(html, kind):
    """The x of every tick in the path of `kind` (one lane drawn)."""
    d = re.search(rf'class="iotf-tick iotf-{kind}"[^>]* d="([^"]*)"', html).group(1)
    return {float(x) for x in re.findall(r"M([0-9.]+) ", d)}


def test_send_ticks_at_each_attempt_and_the_ack_tick_at_the_devices_acknowledgement():
    lane = {"device_id": "d1", "states": [], "messages": [
        # retried twice, then the hub acknowledged it at 13.0 and the device heard so at 14.0
        {"id": "retried", "sent": [13.0], "acked": 13.0, "delivered": 13.0, "duplicates": [], "fate": "delivered",
         "submitted": 10.0, "outbox": "ob", "outbox_state": "acknowledged", "failures": [11.0, 12.0],
         "attempts": [10.5, 11.5, 12.5], "attempt_count": 3, "device_acked": 14.0},
        # a message no Outbox sent: its arrival and the hub's acknowledgement
        {"id": "plain", "sent": [15.0], "acked": 15.0, "delivered": 15.0, "duplicates": [], "fate": "delivered"},
        # queued behind a stuck one, never attempted: its submit time stands for the send
        {"id": "queued", "sent": [16.0], "acked": None, "delivered": None, "duplicates": [], "fate": "in_flight",
         "submitted": 16.0, "outbox": "ob", "outbox_state": "pending", "failures": []}]}
    test = {"nodeid": "t", "outcome": "passed", "started_at": 9.0, "ended_at": 20.0, "devices": [lane],
            "faults": [{"id": 0, "kind": "blackhole", "started_at": 10.2, "ended_at": 12.8}]}
    sc = timeline._Scale(*timeline._time_range(test))
    html = timeline.render_fragment(test)

    def x(t):
        return round(sc.x(t), 1)
    assert _path_xs(html, "send") == {x(10.5), x(11.5), x(12.5), x(15.0), x(16.0)}
    assert _path_xs(html, "ack") == {x(14.0), x(15.0)}
    assert _path_xs(html, "failed_attempt") == {x(11.0), x(12.0)}
    rows = json.loads(__import__("html").unescape(re.search(r'data-m="([^"]*)"', html).group(1)))
    retried = next(r for r in rows if r[1] == "retried")
    assert retried[4] == 3 and retried[10] == [1500, 2500, 3500] and retried[11] == 5000 and retried[5] == 4000
    plain = next(r for r in rows if r[1] == "plain")
    assert plain[10] == [] and plain[11] == -1 and plain[5] == 6000
    assert timeline.never_acked(lane["messages"][2]) == "pending"


def test_lanes_keep_the_hubs_acknowledgement_when_the_device_got_one_for_a_dropped_message():
    class T:
        device_id, message_id, enqueued_at, lost_in_failover = "d1", "late", 10.5, False
    rec = observers.MessageRecord
    snaps = [Snap("ob", True, rec("late", "d1", 10.0, "dropped", (10.4,), (10.1, 10.45), 2, 10.6))]
    [lane] = gate.device_lanes(["d1"], [], [T()], 9.0, [], outboxes=snaps)
    [m] = lane["messages"]
    # evicted by drop_oldest while an abandoned call was still out: that call got through
    assert (m["acked"], m["device_acked"], m["attempts"], m["attempt_count"]) == (10.5, 10.6, [10.1, 10.45], 2)
    assert timeline.never_acked(m) is None


SUITE = """
    import pytest
    from azure.iot.device import Message
    from pytest_iotfailover import Outbox

    FAST = dict(send_timeout=1.0, min_backoff=0.1, max_backoff=0.3)

    def region_down(iothub, failover):
        failover(outage=120, unread=0)   # ended by the plugin at teardown, long before 120 s
        assert iothub.wait_until(lambda: any(e.kind == "disconnect" for e in iothub.events), 20)

    @pytest.fixture
    def fixture_outbox(device_client):
        ob = Outbox(device_client, name="from-a-fixture", **FAST)
        yield ob
        ob.close()

    def test_closed_while_pending(iothub, device_client, failover):
        with Outbox(device_client, name="in-the-test", **FAST) as ob:
            ob.send(Message("before", message_id="before"))
            ob.flush(timeout=20)
            region_down(iothub, failover)
            for mid in ("x1", "x2", "x3"):
                ob.send(Message(mid, message_id=mid))
            assert iothub.wait_until(lambda: any(f[0] == "x1" for f in ob.failures), 20)

    def test_ends_while_pending(iothub, fixture_outbox, failover):
        region_down(iothub, failover)
        fixture_outbox.send(Message("p1", message_id="p1"))
        fixture_outbox.send(Message("p2", message_id="p2"))
        assert iothub.wait_until(lambda: bool(fixture_outbox.failures), 20)

    def test_drop_oldest_gives_up(iothub, device_client, failover):
        region_down(iothub, failover)
        with Outbox(device_client, name="small", capacity=2, on_overflow="drop_oldest", **FAST) as ob:
            for mid in ("d1", "d2", "d3", "d4"):
                ob.send(Message(mid, message_id=mid))
            assert len(ob.dropped_ids) == 2
"""


def _messages(test):
    return {m["id"]: m for d in test["devices"] for m in d["messages"]}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_messages_a_failover_kept_from_the_hub_are_drawn_never_acknowledged(pytester, monkeypatch, workers):
    for var in ("IOTHUB_CONNECTION_STRING", "IOTFAILOVER_SLO", "IOTFAILOVER_REPORT", "IOTFAILOVER_HTML",
                "IOTFAILOVER_BASELINE", "IOTFAILOVER_OUTAGE", "IOTFAILOVER_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--iothub-report", "out/report.json",
                                           "--iothub-html", "out/timeline.html", "--junitxml", "out/junit.xml",
                                           *workers)
    result.assert_outcomes(passed=3)
    doc = json.loads((pytester.path / "out" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}

    closed = _messages(tests["test_closed_while_pending"])
    before = closed["before"]
    assert before["fate"] == "delivered" and before["outbox_state"] == "acknowledged"
    assert before["outbox"] == "in-the-test" and before["submitted"] <= before["sent"][0]
    # when the one attempt started, and when the device (not only the hub) had the acknowledgement
    assert before["attempt_count"] == 1 and before["submitted"] <= before["attempts"][0] <= before["device_acked"]
    assert before["acked"] == before["sent"][0]
    assert closed["x1"]["failures"], "the failed attempts of the message the failover held up"
    assert closed["x1"]["attempt_count"] >= len(closed["x1"]["failures"]) and "device_acked" not in closed["x1"]
    for mid in ("x2", "x3"):  # queued behind x1, never attempted: the hub cannot know them
        m = closed[mid]
        assert (m["fate"], m["outbox_state"], m["acked"], m["delivered"]) == ("lost", "pending", None, None)
        assert m["sent"] == [m["submitted"]] and m["submitted"] >= before["submitted"]
        assert "attempts" not in m and "device_acked" not in m
        assert timeline.never_acked(m) == "lost"
    _summary_agrees_with_the_report(result.stdout.str(), tests, pytester.path / "out" / "junit.xml")
    # no delivery assertion: the fault's loss figure is the lanes' count, not a silent 0
    figures = tests["test_closed_while_pending"]["faults"][0]["figures"]
    assert figures["lost"] == sum(m["fate"] == "lost" for m in closed.values()) >= 2

    pending = _messages(tests["test_ends_while_pending"])
    assert set(pending) == {"p1", "p2"}, "only this test's Outbox, none of another test's"
    for m in pending.values():
        assert m["outbox"] == "from-a-fixture" and m["outbox_state"] == "pending"
        assert m["fate"] in ("in_flight", "delivered")  # p1's attempt may land once the fault ends
    assert pending["p2"]["fate"] == "in_flight" and timeline.never_acked(pending["p2"]) == "pending"

    dropped = [m for m in _messages(tests["test_drop_oldest_gives_up"]).values() if m["outbox_state"] == "dropped"]
    assert len(dropped) == 2 and all(m["fate"] == "lost" for m in dropped)

    html = (pytester.path / "out" / "timeline.html").read_text()
    assert "iotf-never-acked-lost" in html and "iotf-never-acked-pending" in html


_NEVER = re.compile(r"::(test_\w+): .*; (\d+) never acknowledged \((\d+) given up, (\d+) pending\)$")


def _never_in_summary(out):
    """test name -> (never acknowledged, given up, pending), from the summary lines."""
    found = {}
    for line in out.splitlines():
        m = _NEVER.search(line)
        if m:
            found[m.group(1)] = tuple(int(g) for g in m.groups()[1:])
    return found


def _junit_never(path):
    import xml.etree.ElementTree as ET
    out = {}
    for case in ET.parse(path).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out[case.get("name")] = int(props["iothub_never_acknowledged"])
    return out


def _summary_agrees_with_the_report(out, tests, junit):
    """The summary line and the junit property count what the report's lanes show from the device's side."""
    summary = _never_in_summary(out)
    for name, test in tests.items():
        msgs = [m for m in _messages(test).values() if m.get("outbox")]
        never = [m for m in msgs if m["outbox_state"] != "acknowledged" and "device_acked" not in m]
        # the Outboxes left open at the end are the fixture's: its messages are still pending
        pending = len(never) if name == "test_ends_while_pending" else 0
        assert summary[name] == (len(never), len(never) - pending, pending), name
    assert _junit_never(junit) == {name: summary[name][0] for name in tests}


def test_the_summary_names_never_acknowledged_messages_without_a_report(pytester, monkeypatch):
    for var in ("IOTHUB_CONNECTION_STRING", "IOTFAILOVER_SLO", "IOTFAILOVER_REPORT", "IOTFAILOVER_HTML",
                "IOTFAILOVER_BASELINE", "IOTFAILOVER_OUTAGE", "IOTFAILOVER_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--junitxml", "junit.xml")
    result.assert_outcomes(passed=3)
    summary = _never_in_summary(result.stdout.str())
    assert summary["test_closed_while_pending"] == (3, 3, 0)   # x1 tried, x2 and x3 queued: all given up
    assert summary["test_drop_oldest_gives_up"] == (4, 4, 0)   # two dropped, two left when it closed
    never, given_up, pending = summary["test_ends_while_pending"]
    assert given_up == 0 and 1 <= pending == never <= 2         # the fixture's Outbox was still open
    assert _junit_never(pytester.path / "junit.xml") == {name: n[0] for name, n in summary.items()}
