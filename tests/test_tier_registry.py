"""Service-side throttling by tier: identity registry operations and C2D sends (fakehub/shaping.py).

The caller's thread waits the shaping delay; past the queue the call fails with 429001. Every
assertion reads the hub's counters (`throttle_stats()`) and events (`throttle_delay`, `throttled`),
never the wall clock. A single caller waits its turn and is never refused (that is what shaping
does), so the refusals come from callers that arrive together, released by one barrier. The queues
are shortened with `shaping=` so that a test waits seconds, not the default minute.
"""
import http.client
import json
import threading
from urllib.parse import urlsplit

import pytest
from sdk_support import Inbox, bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.backends.fake import FakeBackend
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.fakehub.control_api import ControlServer
from pytest_iotfailover.iothub.tiers import Operation, Shaping
from pytest_iotfailover.plugin.options import resolve
from pytest_iotfailover.testing.view import HubView

pytestmark = pytest.mark.timeout(60)

REGISTRY = Operation.REGISTRY_OPERATION
C2D = Operation.C2D_SEND
# S1 x 1: 100 at once (a minute of 100/min), then a 2 s queue at 1.67/s: three more wait, then 429001
SHORT_QUEUE = Shaping(burst_seconds=60.0, max_queue_delay=2.0)


def _together(calls, first=None):
    """Run the calls in threads released at once, right after `first()` if given (so the bucket
    cannot refill while the threads start); (results, HubOperationErrors) in call order."""
    barrier = threading.Barrier(len(calls) + 1)
    results, errors = [None] * len(calls), [None] * len(calls)

    def run(i, call):
        barrier.wait(10)
        try:
            results[i] = call()
        except HubOperationError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    if first is not None:
        first()
    barrier.wait(10)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a throttled call did not return within 30 s"
    return results, errors


def _kinds(hub, kind, operation):
    return [e for e in hub.events if e.kind == kind and e.detail.get("operation") == operation.value]


def test_registry_burst_is_taken_at_once_then_shaped_then_refused_with_429001():
    with FakeHub("reghub", shaping={REGISTRY: SHORT_QUEUE}) as hub:
        bulk = []

        def take_the_burst():
            # one bulk call of 100 devices: 100 registry operations, all within the burst
            bulk.extend(hub.add_devices([f"bulk{i:03}" for i in range(100)]))
            bulk.append(hub.throttle_stats()["registry_operation"])

        results, errors = _together([lambda i=i: hub.add_device(f"late{i}") for i in range(10)], take_the_burst)
        after_bulk = bulk.pop()
        assert len(bulk) == 100 and (after_bulk.admitted, after_bulk.delayed) == (1, 0)
        refused = [e for e in errors if e is not None]
        created = [r.device_id for r in results if r is not None]
        stats = hub.throttle_stats()["registry_operation"]
        assert stats.delayed >= 1 and stats.rejected >= 1, "beyond the burst: shaped first, then refused"
        assert (stats.admitted - 1 + stats.delayed, stats.rejected) == (len(created), len(refused))
        assert stats.delayed_seconds > 0
        for exc in refused:
            assert exc.error_code == 429001
            assert "add_device: registry_operation throttled" in str(exc)
        # every wait is an event a user can read, and only the refused ones were not created
        delays = _kinds(hub, "throttle_delay", REGISTRY)
        assert len(delays) == stats.delayed and {e.device_id for e in delays} <= set(created)
        assert all(e.detail["call"] == "add_device" and e.detail["seconds"] > 0 for e in delays)
        assert len(_kinds(hub, "throttled", REGISTRY)) == len(refused)
        assert sorted(d.device_id for d in hub.devices if d.device_id.startswith("late")) == sorted(created)


def test_default_s1_shapes_the_registry_call_after_a_minutes_worth():
    with FakeHub("reghub") as hub:  # S1 x 1, the default shaping
        hub.add_devices([f"d{i:03}" for i in range(100)])
        # 5 more at 100/min: the call waits its turn (up to 3 s), it is not refused
        assert len(hub.add_devices([f"late{i}" for i in range(5)])) == 5
        [delay] = _kinds(hub, "throttle_delay", REGISTRY)
        assert delay.detail["call"] == "add_devices" and delay.detail["count"] == 5
        assert 0 < delay.detail["seconds"] <= 3.0 + 1e-6
        stats = hub.throttle_stats()["registry_operation"]
        assert (stats.admitted, stats.delayed, stats.rejected) == (1, 1, 0)
        assert hub.throttled_time(None) == pytest.approx(delay.detail["seconds"], abs=0.001)


def test_removing_and_disabling_devices_are_registry_operations_too():
    with FakeHub("reghub") as hub:
        hub.add_device("a")
        hub.set_device_enabled("a", False)
        hub.remove_device("a")
        assert hub.throttle_stats()["registry_operation"].admitted == 3


def test_bulk_calls_take_at_most_100_devices_and_set_up_takes_any_number():
    with FakeHub("reghub") as hub:
        with pytest.raises(ValueError, match="at most 100"):
            hub.add_devices([f"d{i:03}" for i in range(101)])
        with pytest.raises(ValueError, match="given twice"):
            hub.add_devices(["x", "x"])
        assert hub.devices == []
        # test set-up (an import job): outside the registry throttle
        assert len(hub.add_devices([f"d{i:03}" for i in range(250)], throttle=False)) == 250
        hub.add_device("extra", throttle=False)
        assert hub.throttle_stats()["registry_operation"].admitted == 0
        assert not _kinds(hub, "throttle_delay", REGISTRY)


def test_no_tier_means_no_service_side_throttling():
    with FakeHub("freehub", tier=None) as hub:
        hub.add_devices([f"d{i:03}" for i in range(100)])
        for i in range(50):
            hub.add_device(f"e{i:02}")
        for i in range(40):
            hub.send_c2d(f"d{i:03}", b"x")
        assert hub.throttle_stats() == {}
        assert not [e for e in hub.events if e.kind in ("throttle_delay", "throttled")]


def test_c2d_beyond_the_rate_waits_then_is_refused_and_the_sdk_receives_every_accepted_one():
    # 1 at once, then a 2 s queue at 1.67/s: of 12 sends arriving together about 4 wait, the rest fail
    with FakeHub("c2dhub", shaping={C2D: Shaping(burst_seconds=1.0, max_queue_delay=2.0)}) as hub:
        dev = hub.add_device("receiver")
        client = make_client(hub, dev)
        inbox = Inbox()
        client.on_message_received = inbox
        bounded(client.connect)
        try:
            results, errors = _together([lambda i=i: hub.send_c2d("receiver", f"m{i}".encode(), message_id=f"m{i}")
                                         for i in range(12)])
            accepted = {r for r in results if r is not None}
            refused = [e for e in errors if e is not None]
            stats = hub.throttle_stats()["c2d_send"]
            assert stats.delayed >= 1 and stats.rejected >= 1
            assert (stats.admitted + stats.delayed, stats.rejected) == (len(accepted), len(refused))
            assert all(e.error_code == 429001 and "c2d_send throttled" in str(e) for e in refused)
            assert len(_kinds(hub, "throttle_delay", C2D)) == stats.delayed
            # what the hub accepted reaches the unmodified SDK, the refused ones never
            got = inbox.wait(len(accepted), timeout=20)
            assert {m.message_id for m in got} == accepted
        finally:
            bounded(client.shutdown)


def test_a_call_waiting_its_turn_fails_clearly_when_the_hub_stops():
    hub = FakeHub("stophub", shaping={C2D: Shaping(burst_seconds=1.0, max_queue_delay=30.0)}).start()
    try:
        hub.add_device("d")
        for _ in range(20):  # 1 at once, then 0.6 s apiece: the last of these waits about 11 s
            hub._act(hub._running_core().book_service_call, C2D, "d", "send_c2d", 1)
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(_outcome(lambda: hub.send_c2d("d", b"late"))))
        waiter.start()
        hub.wait_for_event("throttle_delay", "d", where=lambda e: e.detail["call"] == "send_c2d", timeout=10)
    finally:
        hub.stop()
    waiter.join(10)
    [exc] = outcome
    assert isinstance(exc, RuntimeError) and "stopped while the call waited" in str(exc)


def _outcome(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_control_api_answers_429_past_the_shaping_queue():
    with FakeHub("ctlhub", shaping={REGISTRY: Shaping(burst_seconds=0.0, max_queue_delay=0.0)}) as hub:
        control = ControlServer(hub).start()
        try:
            # one at once, and no queue: the next within 0.6 s (100/min) is refused
            answers = [_post(control, "/devices", {"device_id": f"d{i}"}) for i in range(6)]
        finally:
            control.stop()
    assert answers[0][0] == 201
    refused = [body for status, body in answers[1:] if status == 429]
    assert refused and all(b["error_code"] == 429001 and "registry_operation throttled" in b["error"]
                           for b in refused)


def _post(control, path, obj):
    url = urlsplit(control.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(obj), {"Authorization": f"Bearer {control.token}",
                                                     "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_fixture_devices_are_set_up_unless_the_option_counts_them():
    for throttle_setup, counted in ((False, 0), (True, 4)):
        backend = FakeBackend("fixhub", throttle_setup=throttle_setup)
        try:
            view = HubView(backend, "test_x")
            for _ in range(2):
                view.add_device()
            view.close()  # removes them: two more registry operations when counted
            stats = backend.fakehub.throttle_stats()["registry_operation"]
            assert stats.admitted == counted
        finally:
            backend.close()


def test_throttle_setup_option_has_cli_ini_and_environment_forms():
    def none(_):
        return None
    assert resolve(none, none, {}).throttle_setup is False
    assert resolve(lambda n: True if n == "iothub_throttle_setup" else None, none, {}).throttle_setup is True
    assert resolve(none, none, {"IOTFAILOVER_THROTTLE_SETUP": "1"}).throttle_setup is True
    assert resolve(none, lambda n: "true" if n == "iothub_throttle_setup" else None, {}).throttle_setup is True


def test_the_recovery_report_counts_service_calls_that_waited_their_turn():
    with FakeHub("rephub", shaping={C2D: Shaping(burst_seconds=1.0, max_queue_delay=30.0)}) as hub:
        hub.add_device("d")
        fo = hub.faults.region_failover(outage=0.1)
        fo.wait(10)
        hub.send_c2d("d", b"first")    # taken at once
        hub.send_c2d("d", b"second")   # waits its turn
        rep = fo.report()
        [delay] = _kinds(hub, "throttle_delay", C2D)
        assert rep.service_throttled == pytest.approx(delay.detail["seconds"])
        assert "service calls throttled" in str(rep)
