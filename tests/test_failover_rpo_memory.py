"""A regional failover's data loss, on the in-memory core and a fake clock (test_core_memory.py's
Harness): what the wire adds nothing to. The SDK's view is in test_failover_rpo.py."""
import json

import pytest
from test_core_memory import Harness, c2d_filter

from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.model import DEFAULT_UNREAD, RegionFailover, spec_for


@pytest.fixture
def h() -> Harness:
    hub = Harness()
    hub.add("d1")
    return hub


def failover(h: Harness, **params):
    params = {"outage": 10.0, "refuse": "tcp", **params}
    return h.schedule("region_failover", None, params["outage"], **params)


def test_unread_telemetry_is_marked_lost_and_older_is_kept(h):
    peer = h.connected()
    h.publish(peer, mid="old", pid=1)
    h.advance(5)
    h.publish(peer, mid="recent", pid=2)
    h.advance(0.5)
    failover(h, unread=1.0)
    marks = {t.message_id: t.lost_in_failover for t in h.ledger.items()}
    assert marks == {"old": False, "recent": True}
    loss = h.kinds("failover_data_loss")[0].detail
    assert loss["telemetry_lost"] == 1


def test_unread_zero_loses_nothing(h):
    peer = h.connected()
    h.publish(peer, mid="m", pid=1)
    failover(h, unread=0.0)
    assert not any(t.lost_in_failover for t in h.ledger.items())


def test_a_one_device_failover_marks_only_that_device(h):
    h.add("d2")
    one, two = h.connected("d1"), h.connected("d2")
    h.publish(one, mid="a", pid=1)
    h.publish(two, mid="b", pid=1)
    h.schedule("region_failover", "d1", 5.0, outage=5.0, unread=60.0, refuse="connack")
    assert {t.message_id for t in h.ledger.items() if t.lost_in_failover} == {"a"}


def queue_c2d(h: Harness, peer) -> None:
    h.subscribe(peer, c2d_filter())
    for body in (b"sent", b"queued"):
        _, actions = h.core.send_c2d("d1", body, None, None, h.now)
        h.run(actions)


def test_c2d_in_flight_and_queued_is_dropped_by_default(h):
    peer = h.connected(clean=False)
    queue_c2d(h, peer)
    failover(h, keep_sessions=True)
    assert h.kinds("failover_data_loss")[0].detail["c2d_dropped"] == 2
    h.advance(10)
    again = h.connected(clean=False)
    assert again.take(p.Publish) == []


def test_keep_c2d_delivers_after_the_failover_even_without_sessions(h):
    peer = h.connected(clean=False)
    queue_c2d(h, peer)
    failover(h, keep_c2d=True, keep_sessions=False)
    h.advance(10)
    again = h.connected(clean=False)
    h.subscribe(again, c2d_filter())
    assert [m.payload for m in again.take(p.Publish)] == [b"sent", b"queued"]


def test_service_calls_fail_with_503001_during_the_outage(h):
    failover(h)
    calls = {
        "send_c2d": lambda: h.core.send_c2d("d1", b"x", None, None, h.now),
        "update_desired": lambda: h.core.update_desired("d1", {"a": 1}, h.now),
        "get_twin": lambda: h.core.get_twin("d1", h.now),
        "add_device": lambda: h.core.add_device("d9", None, None, True, h.now),
        "invoke_method": lambda: h.core.invoke_method("d1", "m", None, 5.0, h.replies.append, h.now),
    }
    for name, call in calls.items():
        with pytest.raises(HubOperationError, match="failing over") as info:
            call()
        assert info.value.error_code == 503001, name
    h.advance(10)
    assert h.core.get_twin("d1", h.now)[0]["desired"]["$version"] == 1
    assert h.registry.get("d9") is None


def test_rpo_rolls_back_a_desired_version_and_forgets_a_new_device(h):
    h.core.update_desired("d1", {"rate": 1}, h.now)       # version 2, long before
    h.advance(120)
    h.core.update_desired("d1", {"rate": 2}, h.now)       # version 3, 10 s before
    h.core.add_device("fresh", None, None, True, h.now)
    h.advance(10)
    failover(h, rpo=30.0)
    h.advance(10)
    doc = h.core.get_twin("d1", h.now)[0]
    assert (doc["desired"]["$version"], doc["desired"]["rate"]) == (2, 1)
    assert h.registry.get("fresh") is None
    assert h.connect("fresh", key="a2V5")[1].return_code == p.CONNACK_NOT_AUTHORIZED
    loss = h.kinds("failover_data_loss")[0].detail
    assert (loss["twins_rolled_back"], loss["devices_forgotten"]) == (["d1"], ["fresh"])


def test_rpo_zero_rolls_nothing_back(h):
    h.core.update_desired("d1", {"rate": 2}, h.now)
    failover(h, rpo=0.0)
    h.advance(10)
    assert h.core.get_twin("d1", h.now)[0]["desired"]["$version"] == 2


def test_rolled_back_reported_version_goes_backwards(h):
    peer = h.connected()
    h.subscribe(peer, "$iothub/twin/res/#")
    h.send(peer, p.Publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"fw": "2"}', 0))
    assert peer.one(p.Publish).topic.endswith("$version=2")
    failover(h, rpo=5.0)
    h.advance(10)
    again = h.connected()
    h.subscribe(again, "$iothub/twin/res/#")
    h.send(again, p.Publish("$iothub/twin/GET/?$rid=2", b"", 0))
    assert json.loads(again.one(p.Publish).payload)["reported"] == {"$version": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"rpo": 301}, "rpo must be at most 300"),
    ({"rpo": -1}, "rpo must be a non-negative"),
    ({"unread": "1"}, "unread must be a number"),
    ({"keep_c2d": 1}, "keep_c2d must be True or False"),
    ({"rpo": 5, "device_id": "d1"}, "rpo= needs the whole hub"),
])
def test_bad_data_loss_parameters_are_named(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        RegionFailover(**kwargs)


def test_defaults_are_documented_values():
    spec = spec_for("region_failover", {})
    assert (spec.unread, spec.keep_c2d, spec.rpo) == (DEFAULT_UNREAD, False, 0.0)
