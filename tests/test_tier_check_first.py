"""A throttled service call is checked before it is booked (fakehub/shaping.py, iothub/tier_gate.py).

A call refused for its arguments is refused at once: it takes nothing from the tier's budget, so
the throttle's counters and events are exactly what they were before it: a call that was booked
shows as an `admitted` or `delayed` count, one that was not shows as nothing at all.
"""
import time

import pytest

from pytest_iotfailover import FakeHub
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.iothub.tiers import Operation, Shaping

pytestmark = pytest.mark.timeout(60)

REGISTRY = Operation.REGISTRY_OPERATION
C2D = Operation.C2D_SEND
ONE_AT_ONCE = Shaping(burst_seconds=1.0, max_queue_delay=30.0)  # the next booking would wait 0.6 s


def _throttle_trace(hub, operation):
    stats = hub.throttle_stats().get(operation.value)
    events = [e for e in hub.events if e.kind in ("throttle_delay", "throttled")
              and e.detail.get("operation") == operation.value]
    return (stats.admitted, stats.delayed, stats.rejected), len(events)


def _booked_twice(trace):
    """The first call and the next good one were booked, nothing else. Whether the second waited
    depends on how long the refused call took (the bucket refills meanwhile; on a busy machine it
    can be full again), so either way counts: admitted or delayed, with one event per delay."""
    (admitted, delayed, rejected), events = trace
    return admitted + delayed == 2 and rejected == 0 and events == delayed


@pytest.mark.parametrize("call, error, code", [
    (lambda hub: hub.send_c2d("d", b"x", ttl=3 * 86400), HubOperationError, 403009),
    (lambda hub: hub.send_c2d("d", b"x" * (64 * 1024 + 1)), HubOperationError, 400000),
    (lambda hub: hub.send_c2d("nobody", b"x"), HubOperationError, 404001),
    (lambda hub: hub.send_c2d("d", b"x", ttl=-1), ValueError, None),
    (lambda hub: hub.send_c2d("d", b"x", ack="sometimes"), HubOperationError, None),
    (lambda hub: hub.send_c2d("d", b"x", ttl=10, expiry_time=time.time() + 60), ValueError, None),
], ids=["ttl-over-two-days", "body-over-64KB", "unknown-device", "negative-ttl", "bad-ack", "ttl-and-expiry"])
def test_a_c2d_send_refused_for_its_arguments_is_refused_at_once_and_books_nothing(call, error, code):
    with FakeHub("c2dhub", shaping={C2D: ONE_AT_ONCE}) as hub:
        hub.add_device("d", throttle=False)
        hub.send_c2d("d", b"first")  # takes the one send the burst has
        before = _throttle_trace(hub, C2D)
        assert before == ((1, 0, 0), 0)
        with pytest.raises(error) as caught:
            call(hub)
        if code is not None:
            assert caught.value.error_code == code
        assert _throttle_trace(hub, C2D) == before, "the refused send must not have been booked"
        # the budget is intact: the next good send is booked (and waits its turn) as usual
        hub.send_c2d("d", b"second")
        assert _booked_twice(_throttle_trace(hub, C2D))


@pytest.mark.parametrize("call, error", [
    (lambda hub: hub.add_device("bad id"), ValueError),
    (lambda hub: hub.add_device("taken"), ValueError),
    (lambda hub: hub.add_device("fresh", primary_key="not base64!"), ValueError),
    (lambda hub: hub.remove_device("nobody"), KeyError),
    (lambda hub: hub.set_device_enabled("nobody", False), KeyError),
    (lambda hub: hub.add_devices(["ok1", "taken"]), ValueError),
], ids=["bad-id", "duplicate-id", "bad-key", "remove-unknown", "disable-unknown", "bulk-with-a-taken-id"])
def test_a_registry_call_refused_for_its_arguments_is_refused_at_once_and_books_nothing(call, error):
    with FakeHub("reghub", shaping={REGISTRY: ONE_AT_ONCE}) as hub:
        hub.add_device("taken")  # takes the one operation the burst has
        before = _throttle_trace(hub, REGISTRY)
        assert before == ((1, 0, 0), 0)
        with pytest.raises(error):
            call(hub)
        assert _throttle_trace(hub, REGISTRY) == before, "the refused call must not have been booked"
        assert sorted(d.device_id for d in hub.devices) == ["taken"]
        hub.add_device("next")
        assert _booked_twice(_throttle_trace(hub, REGISTRY))


def test_the_outage_still_comes_before_the_argument_checks():
    # a failing-over hub is unreachable as a whole: 503001 whatever the arguments
    with FakeHub("outhub", shaping={REGISTRY: ONE_AT_ONCE}) as hub:
        hub.add_device("d", throttle=False)
        failover = hub.faults.region_failover(outage=60)
        try:
            with pytest.raises(HubOperationError) as caught:
                hub.send_c2d("d", b"x", ttl=3 * 86400)
            assert caught.value.error_code == 503001
            with pytest.raises(HubOperationError) as caught:
                hub.add_device("bad id")
            assert caught.value.error_code == 503001
        finally:
            failover.cancel()
