"""What the unmodified azure-iot-device client does under each fault of the fake hub.

Clients use keep_alive 1-5 s and connection_retry_interval=1 (the SDK's floors are 1 s) so
every scenario fits in a few seconds; each test says when it needs more than two.
"""
import dataclasses
import inspect
import re
import threading
import time

import pytest
from azure.iot.device import Message, MethodResponse, exceptions
from sdk_support import Inbox, bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.fakehub.faults import Faults
from pytest_iotfailover.model import SPECS, Drop, FaultState

pytestmark = pytest.mark.timeout(20)


def send_with_retry(client, message, deadline):
    """The buffer-and-retry loop the SDK leaves to the application: send_message raises at once
    while the hub is unreachable and never times out, so bound each try and try again.
    Returns how many tries failed."""
    failed = 0
    while True:
        try:
            bounded(client.send_message, message, timeout=5)
            return failed
        except (exceptions.ConnectionFailedError, exceptions.ConnectionDroppedError,
                exceptions.OperationCancelled, exceptions.NoConnectionError):
            if time.monotonic() > deadline:
                raise
            failed += 1
            time.sleep(0.1)  # back-off between attempts, not synchronisation


def reconnect_after(hub, device_id, handle, timeout=10):
    return hub.wait_for_event("connect", device_id, timeout=timeout, after=handle.started_at)


def test_region_failover_one_liner_after_50_messages(hub, device, client):
    # Takes ~3 s: a 2 s outage, then the SDK's 1 s retry interval.
    failover = hub.faults.region_failover(outage=2, after_messages=50, unread=0)  # delivery, not data loss
    deadline = time.monotonic() + 15
    for i in range(80):
        send_with_retry(client, Message(f"m{i}", message_id=f"m{i}"), deadline)
    failover.wait(10)
    got = hub.wait_for_telemetry(80, device_id=device.device_id, timeout=10)
    ids = {t.message_id for t in got}
    assert ids == {f"m{i}" for i in range(80)}, "buffer-and-retry must lose nothing"
    assert hub.region == "secondary"
    rep = failover.report()
    assert rep.messages_before == 50
    assert rep.devices[device.device_id].reconnected_at >= failover.ended_at
    # recovered at the SDK's first retry after the outage: one CONNECT since the failover began,
    # nothing refused after it ended (how soon that retry comes is a speed: bench/bench_recovery.py)
    assert rep.time_to_recover is not None
    attempts = [e for e in hub.events if e.at >= failover.started_at and e.kind in ("connect", "connect_refused")
                and e.device_id in (device.device_id, None)]
    assert [e.kind for e in attempts if e.at >= failover.ended_at] == ["connect"]
    # the hub ends the outage from a 2 s timer set after started_at was taken: never early
    assert rep.outage >= 2
    assert hub.wait_for_event("connect", device.device_id, after=failover.started_at).detail["session_present"] is False


def test_region_failover_loses_subscriptions_the_sdk_never_renews(hub, device, client):
    c2d = Inbox()
    patches = Inbox()
    client.on_message_received = c2d
    client.on_twin_desired_properties_patch_received = patches
    client.on_method_request_received = lambda r: client.send_method_response(
        MethodResponse.create_from_method_request(r, 200, None))
    hub.send_c2d(device.device_id, "before")
    c2d.wait(1)
    f = hub.faults.region_failover(outage=1)
    f.wait(5)
    reconnect_after(hub, device.device_id, f)
    # the client is back and telemetry flows ...
    bounded(client.send_message, Message("after", message_id="after"))
    hub.wait_for_telemetry(1, device_id=device.device_id)
    # ... but the secondary has no session and the SDK does not subscribe again
    assert hub.invoke_method(device.device_id, "ping", timeout=5).status == 404
    hub.send_c2d(device.device_id, "after failover")
    hub.update_desired(device.device_id, {"x": 1})
    with pytest.raises(TimeoutError):
        c2d.wait(2, timeout=1.5)  # waiting for what must not come: bounded, 1.5 s
    assert patches.items == []


def test_region_failover_with_kept_sessions_keeps_everything(hub, device, client):
    c2d = Inbox()
    client.on_message_received = c2d
    client.on_method_request_received = lambda r: client.send_method_response(
        MethodResponse.create_from_method_request(r, 200, "pong"))
    f = hub.faults.region_failover(outage=1, keep_sessions=True, refuse="connack")
    f.wait(5)
    ev = reconnect_after(hub, device.device_id, f)
    assert ev.detail["session_present"] is True
    refused = [e for e in hub.events if e.kind == "connect_refused" and e.device_id == device.device_id]
    assert refused and all(e.detail["return_code"] == 3 for e in refused)
    hub.send_c2d(device.device_id, "after failover")
    assert c2d.wait(1)[0].data == b"after failover"
    assert hub.invoke_method(device.device_id, "ping", timeout=5).payload == "pong"


def test_drop_reconnects_within_a_retry_interval_and_in_flight_send_completes(hub, device, client):
    hub.faults.delay_acks(0.5, duration=5)  # keep the next send in flight while we drop
    sent = []

    def send():
        try:
            sent.append(client.send_message(Message("x", message_id="x")))
        except exceptions.NoConnectionError as exc:
            # the SDK sometimes retries its own operation a moment before its reconnect is done;
            # paho re-sends the publish either way (asserted below from the ledger)
            sent.append(exc)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    hub.wait_for_telemetry(1, device_id=device.device_id)
    for f in hub.faults.active():
        f.cancel()
    drop = hub.faults.drop()
    reconnect_after(hub, device.device_id, drop, timeout=5)
    # within a retry interval means at the SDK's first attempt: one CONNECT since the drop, no refusal
    assert [e.kind for e in hub.events if e.at >= drop.started_at and e.device_id == device.device_id
            and e.kind in ("connect", "connect_refused", "auth_failure")] == ["connect"]
    t.join(10)
    assert len(sent) == 1, "send_message must not hang once the re-sent publish is acknowledged"
    got = hub.wait_for_telemetry(2, device_id=device.device_id)
    # paho's session re-send carries DUP=1; when the SDK's own retry re-publishes instead, the copy
    # is a new packet (DUP=0): either way the hub flags it by its message id
    assert [g.message_id for g in got] == ["x", "x"] and got[1].duplicate
    assert hub.wait_for_event("disconnect", device.device_id).reason == "drop"


def test_blackhole_is_noticed_only_by_keep_alive_and_send_blocks(hub, device):
    # keep_alive=1: the SDK (paho) notices a silent hub after ~2 keep-alive periods.
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        bh = hub.faults.blackhole(3)
        done = threading.Event()

        def send_in_the_dark():
            try:
                c.send_message(Message("in the dark", message_id="d"))
            except exceptions.NoConnectionError:
                pass  # the SDK's retry raced its reconnect; paho re-sends the publish regardless
            done.set()
        threading.Thread(target=send_in_the_dark, daemon=True).start()
        assert not done.wait(1.5), "send_message must block while the hub is silent"
        gone = hub.wait_for_event("disconnect", device.device_id, after=bh.started_at, timeout=5)
        assert gone.reason == "connection_lost"  # the client hung up: it noticed
        # only keep-alive could notice: the client sent its PINGREQ into the silence and gave up
        # (how long that takes is a speed, not something a test on a shared machine can assert)
        assert done.wait(10), "the send completes after the hub is back"
        assert [t.message_id for t in hub.wait_for_telemetry(1, device_id=device.device_id)][-1] == "d"
        rep = bh.wait(5).report()
        assert rep.time_to_detect == pytest.approx(gone.at - bh.started_at)
    finally:
        bounded(c.shutdown)


def test_refuse_3_is_retried_until_it_ends(hub, device, client):
    r = hub.faults.refuse(3, seconds=2)
    hub.faults.drop()
    r.wait(5)
    ev = reconnect_after(hub, device.device_id, r, timeout=5)
    assert ev.at >= r.ended_at
    refusals = [e for e in hub.events if e.kind == "connect_refused" and e.device_id == device.device_id]
    assert len(refusals) >= 2 and {e.detail["return_code"] for e in refusals} == {3}


def test_refuse_5_stops_the_sdk_for_good(hub, device, client):
    # After the refusal window closes we watch three retry intervals (3 s) for an attempt that
    # must never come: the Python SDK treats CONNACK 5 as final.
    r = hub.faults.refuse(5, seconds=1)
    hub.faults.drop()
    hub.wait_for_event("auth_failure", device.device_id, after=r.started_at, timeout=5)
    r.wait(5)
    with pytest.raises(TimeoutError):
        hub.wait_for_event("connect", device.device_id, after=r.started_at, timeout=3)
    assert not client.connected
    assert len([e for e in hub.events if e.kind == "auth_failure"]) == 1


def test_drop_before_ack_shows_one_flagged_duplicate(hub, device, client):
    f = hub.faults.drop_before_ack()
    # as an application does: send again when the SDK gives up with NoConnectionError (its own
    # retry can race its reconnect)
    send_with_retry(client, Message("once", message_id="once"), time.monotonic() + 10)
    f.wait(5)
    got = hub.wait_for_telemetry(2, device_id=device.device_id)
    assert {t.message_id for t in got} == {"once"}
    assert (got[0].dup, got[0].duplicate) == (False, False)
    # the copy after the reset is paho's re-send (DUP=1) or the SDK's own re-publish, a new packet
    # (DUP=0): the hub flags every copy after the first as a duplicate either way
    assert all(t.duplicate for t in got[1:])
    assert f.report().duplicates >= len(got) - 1 >= 1


def test_expire_tokens_makes_the_client_authenticate_again(hub, device, client):
    f = hub.faults.expire_tokens()
    assert hub.wait_for_event("disconnect", device.device_id, after=f.started_at).reason == "token_expired"
    ev = reconnect_after(hub, device.device_id, f, timeout=5)
    assert ev.detail["session_present"] is True
    bounded(client.send_message, "still here")


def test_delay_acks_slows_send_message(hub, device, client):
    with hub.faults.delay_acks(0.5) as f:
        t0 = time.monotonic()
        bounded(client.send_message, "slow")
        # a lower bound that holds on any machine: the hub sets its 0.5 s PUBACK timer (on the
        # same monotonic clock) only after the publish sent after t0 arrived
        assert time.monotonic() - t0 >= 0.5
    assert f.state == "ended"
    with hub.faults.delay_acks(300) as long:
        pass
    assert long.state == "ended"
    # both faults are over: a PUBACK still held back 300 s could not come within bounded()'s 10 s
    bounded(client.send_message, "fast", timeout=10)


def test_throttle_shapes_then_disconnects(hub, device, client):
    # 2 msg/s with at most 1 s of queueing: of 8 concurrent sends the 4th would wait 1.5 s, so
    # the hub closes the connection unacknowledged, as a throttled IoT Hub does over MQTT. The
    # SDK re-sends after reconnecting; everything arrives once the 3 s throttle is over.
    hub.faults.throttle(2, seconds=3, max_delay=1.0)
    # the sends retry like an application: a send caught by the disconnect may raise NoConnectionError
    deadline = time.monotonic() + 12
    threads = [threading.Thread(target=send_with_retry, args=(client, Message(str(i), message_id=str(i)), deadline),
                                daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    assert hub.wait_for_event("disconnect", device.device_id).reason == "throttled"
    for t in threads:
        t.join(15)
    assert {t.message_id for t in hub.telemetry(device.device_id)} == {str(i) for i in range(8)}


def test_throttle_without_a_rate_closes_every_publisher_like_the_hubs_own_injection(hub, device, client):
    # the throttle a real hub can produce too (InvokeThrottling): no shaping, every publish in the
    # window closes its connection; the SDK re-sends until the window is over
    f = hub.faults.throttle(seconds=1)
    assert f.kind == "throttle" and f.spec.rate is None
    send_with_retry(client, Message("x", message_id="t-1"), time.monotonic() + 10)
    assert hub.wait_for_event("disconnect", device.device_id, after=f.started_at).reason == "throttled"
    f.wait(5)
    assert f.report().fault == "throttle" and f.report().devices.keys() == {device.device_id}
    # at least once: the SDK (or the retry above) may have sent it again after the window
    assert {t.message_id for t in hub.telemetry(device.device_id)} == {"t-1"}


def test_service_fault_injection_properties_kill_tcp(hub, device, client):
    msg = Message("fault", message_id="fi-1")
    msg.custom_properties["AzIoTHub_FaultOperationType"] = "KillTcp"
    msg.custom_properties["AzIoTHub_FaultOperationCloseReason"] = "boom"
    msg.custom_properties["AzIoTHub_FaultOperationDelayInSecs"] = "1"
    t0 = time.time()
    # the hub never acks the request; paho re-sends it. The SDK may raise NoConnectionError if its
    # retry races its own reconnect: an application sends again, with the same message id
    send_with_retry(client, msg, time.monotonic() + 10)
    drop = hub.wait_for_event("disconnect", device.device_id)
    # a lower bound that holds on any machine: the hub's 1 s timer starts after it got the
    # request, which was sent after t0
    assert drop.reason == "drop" and drop.at - t0 >= 1.0
    got = hub.wait_for_telemetry(1, device_id=device.device_id)
    while not any(t.dup for t in got):  # paho's re-send may come after the application's own
        got = hub.wait_for_telemetry(len(got) + 1, device_id=device.device_id)
    assert {t.message_id for t in got} == {"fi-1"}, "the re-sent request is a normal message, not a new fault"
    assert all(t.duplicate for t in got[1:])
    assert len([e for e in hub.events if e.kind == "fault_injection_requested"]) == 1


def test_injected_throttling_closes_publishers_for_its_duration(hub, device, client):
    msg = Message("fault", message_id="fi-2")
    msg.custom_properties["AzIoTHub_FaultOperationType"] = "InvokeThrottling"
    msg.custom_properties["AzIoTHub_FaultOperationDurationInSecs"] = "1"
    # the SDK may raise NoConnectionError if its re-send races its own reconnect: retry like an app
    send_with_retry(client, msg, time.monotonic() + 10)
    assert hub.wait_for_event("disconnect", device.device_id).reason == "throttled"
    assert hub.telemetry(device.device_id)[-1].message_id == "fi-2"


def test_fault_at_offset_cancel_and_targeting(hub):
    a, b = hub.add_device("a"), hub.add_device("b")
    ca, cb = make_client(hub, a), make_client(hub, b)
    try:
        bounded(ca.connect)
        bounded(cb.connect)
        later = hub.faults.drop(at=30)
        later.cancel()
        assert later.state == "cancelled"
        f = hub.faults.drop(device_id="a", at=0.2)
        f.wait(5)
        assert f.started_at - time.time() < 0 and f.report().devices.keys() == {"a"}
        hub.wait_for_event("connect", "a", after=f.started_at, timeout=5)
        assert not [e for e in hub.events if e.kind == "disconnect" and e.device_id == "b"]
    finally:
        bounded(ca.shutdown)
        bounded(cb.shutdown)


@pytest.mark.parametrize("call, error, message", [
    (lambda f: f.region_failover(outage=-1), ValueError, "outage must be a non-negative"),
    (lambda f: f.region_failover(refuse="udp"), ValueError, "refuse must be one of 'tcp', 'connack', got 'udp'"),
    (lambda f: f.refuse(7), ValueError, "code must be at most 5, got 7"),
    (lambda f: f.drop(after_messages=0), ValueError, "after_messages= must be at least 1, got 0"),
    (lambda f: f.drop(at=1, after_messages=2), ValueError, "not both"),
    (lambda f: f.throttle(0), ValueError, "rate must be a positive"),
    (lambda f: f.throttle(burst=3), ValueError, r"burst= only apply with rate="),
    (lambda f: f.drop_before_ack(count=0), ValueError, "count must be at least 1"),
    # a value of the wrong type is a TypeError, as Python's own calls raise
    (lambda f: f.refuse(True), TypeError, "code must be a whole number, got True"),
    (lambda f: f.blackhole(float("nan")), TypeError, "seconds must be a number of seconds, got nan"),
    (lambda f: f.throttle(float("inf")), TypeError, "rate must be a number, got inf"),
    (lambda f: f.drop(at=True), TypeError, "at= must be a number of seconds, got True"),
    (lambda f: f.drop(device_id=5), TypeError, "device_id must be a non-empty string, got 5"),
    (lambda f: f.region_failover(device_id="dev1", refuse="tcp"), ValueError, "refuse='tcp' needs the whole hub"),
])
def test_bad_fault_arguments_are_named(hub, call, error, message):
    with pytest.raises(error) as e:
        call(hub.faults)
    assert re.search(message, str(e.value)), str(e.value)
    assert str(e.value).startswith("hub.faults."), "the error names the call"
    assert hub.faults.history() == []


def test_a_spec_built_elsewhere_starts_the_same_fault(hub, device):
    handle = hub.faults.start(Drop(device_id=device.device_id, at=30))
    assert handle.kind == "drop" and handle.state is FaultState.PENDING and handle.spec == Drop(
        device_id=device.device_id, at=30.0)
    assert handle.params == {"graceful": False, "reason": "drop"}
    assert hub.faults.history()[0].spec is handle.spec, "history keeps the spec"
    handle.cancel()
    assert handle.state == "cancelled"
    with pytest.raises(TypeError, match="takes a FaultSpec"):
        hub.faults.start({"kind": "drop"})


def test_every_fault_method_takes_its_specs_names_and_defaults():
    for kind, cls in SPECS.items():
        params = inspect.signature(getattr(Faults, kind.value)).parameters
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {n: p.default for n, p in params.items() if n != "self"} == {
            n: (inspect.Parameter.empty if d is dataclasses.MISSING else d) for n, d in fields.items()}, kind


def test_fault_ids_count_per_hub_and_cancelled_faults_never_start(hub):
    with FakeHub("otherhub") as other:
        other.faults.drop()
    h = hub.faults.drop(at=30)
    assert [f._fault.id for f in hub.faults.history()] == [1]
    h.cancel()
    with pytest.raises(RuntimeError, match="cancelled before it started"):
        h.wait_started(1)


def test_a_fault_on_an_unknown_device_is_refused(hub, device):
    with pytest.raises(ValueError) as e:
        hub.faults.drop(device_id="no-such-device")
    assert str(e.value) == "device_id='no-such-device': no such device on this hub"
    assert hub.faults.history() == []


def test_overlapping_outages_are_refused(hub, device):
    first = hub.faults.region_failover(outage=30)
    with pytest.raises(ValueError, match="a region failover of the whole hub is already running"):
        hub.faults.region_failover(outage=1)
    with pytest.raises(ValueError, match="already running"):
        hub.faults.region_failover(outage=1, device_id=device.device_id)  # inside the hub-wide one
    first.cancel()
    later = hub.faults.region_failover(outage=5, at=60)
    with pytest.raises(ValueError, match=r"whole hub is already due in \d+\.\d s"):
        hub.faults.region_failover(outage=1, at=62)
    hub.faults.region_failover(outage=1, at=10).cancel()  # over before the pending one starts
    with pytest.raises(ValueError, match="already due in"):
        hub.faults.region_failover(outage=1, after_messages=5)  # may start at any moment
    later.cancel()
    counting = hub.faults.region_failover(outage=1, after_messages=5)
    with pytest.raises(ValueError, match=r"already waiting for messages \(after_messages=\)"):
        hub.faults.region_failover(outage=1, at=100)
    counting.cancel()
    hub.faults.drop()  # other kinds are not outages
    assert [h.state for h in hub.faults.history()] == ["ended", "cancelled", "cancelled", "cancelled", "ended"]


# every kind with each of its parameters changed from the default: the embedded hub honours them all
FAKE_CASES = [
    ("region_failover", {"outage": 5, "keep_sessions": True, "refuse": "connack"}),
    ("drop", {"graceful": True}), ("blackhole", {"seconds": 3}), ("refuse", {"code": 5, "seconds": 2}),
    ("drop_before_ack", {"count": 4}), ("delay_acks", {"seconds": 0.5, "duration": 2}),
    ("throttle", {"rate": 5, "seconds": 2, "burst": 3, "max_delay": 1}), ("throttle", {"seconds": 2}),
    ("expire_tokens", {}),
]


@pytest.mark.parametrize("kind, kwargs", FAKE_CASES, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_the_embedded_backend_honours_every_parameter(kind, kwargs):
    from pytest_iotfailover.backends.fake import FakeBackend
    from pytest_iotfailover.model import spec_for
    backend = FakeBackend("specshub")
    try:
        backend.create_device("d1")
        mark = backend.fault_mark()
        spec = spec_for(kind, dict(kwargs, device_id="d1", at=60))
        handle = backend.start_fault(spec)
        assert handle.spec is spec and handle.kind == kind and handle.state is FaultState.PENDING
        assert handle.device_id == "d1" and handle._fault.due_at is not None
        shown = handle.params
        for name, value in kwargs.items():
            assert shown[name] == value, (name, shown)
        assert spec.lasts == handle._fault.duration
        assert [h.state for h in backend.end_faults_since(mark)] == ["cancelled"]
    finally:
        backend.close()
