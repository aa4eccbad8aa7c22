"""DevicePool and create_client against a real FakeHub with the real azure-iot-device SDK.

The contrast with tests/test_faults_sdk.py is the point: after a region failover the bare SDK
reconnects without subscribing again, and after CONNACK 5 it stops for good; the pool recreates
its clients, registers their handlers again and keeps trying until its operation timeout.
Clients use keep_alive 5 and a 5 s connect timeout; every wait below has a deadline.
"""
import asyncio
import collections
import threading
import time

import pytest
from azure.iot.device import Message, MethodResponse
from sdk_support import Inbox, bounded, wait_until

from pytest_iotfailover.devices.backoff import Backoff
from pytest_iotfailover.devices.pool import DeviceConnectionError, DevicePool, DeviceTimeoutError, create_client
from pytest_iotfailover.devices.slots import TRANSITIONS, Slot, SlotState
from pytest_iotfailover.iothub.auth import device_connection_string

pytestmark = pytest.mark.timeout(20)

POOL_KWARGS = {"keep_alive": 5, "connect_timeout": 5.0, "operation_timeout": 10.0}
# Executors the SDK starts once per process and keeps: not a pool's to stop.
SDK_PROCESS_THREADS = {"pipeline", "callback", "azure_iot_http"}


@pytest.fixture
def make_pool(hub):
    pools = []

    def make(devices, **kwargs):
        options = dict(POOL_KWARGS, server_verification_cert=hub.ca_pem)
        options.update(kwargs)
        pool = DevicePool(devices, **options)
        pools.append(pool)
        return pool
    yield make
    for pool in pools:
        pool.close(timeout=10)


def add_devices(hub, count, prefix="dev"):
    return [hub.add_device(f"{prefix}{i}") for i in range(count)]


def reconnects_after(hub, device_ids, since, timeout):
    """The hub's first `connect` event for each device at/after `since`, all within `timeout`."""
    deadline = time.monotonic() + timeout
    return {d: hub.wait_for_event("connect", d, after=since, timeout=max(deadline - time.monotonic(), 0.01))
            for d in device_ids}


def answer_methods(pool, payload=None):
    pool.on_method_request_received = lambda device_id, request: pool.send_method_response(
        device_id, MethodResponse.create_from_method_request(request, 200, payload or device_id), timeout=5)


# --- the non-pooled factory -------------------------------------------------------------------

def test_create_client_is_a_plain_sdk_client_with_the_sdks_own_retry(hub):
    dev = hub.add_device("plain")
    client = create_client(dev.connection_string, server_verification_cert=hub.ca_pem, keep_alive=5)
    try:
        assert type(client).__module__.startswith("azure.iot.device")
        assert not client.connected, "create_client must not connect"
        assert client._mqtt_pipeline.pipeline_configuration.connection_retry is True
        bounded(client.connect)
        bounded(client.send_message, Message("plain", message_id="p1"))
        assert [t.message_id for t in hub.wait_for_telemetry(1, "plain")] == ["p1"]
    finally:
        bounded(client.shutdown)


def test_create_client_aio(hub):
    dev = hub.add_device("plain-aio")

    async def scenario():
        client = create_client(dev.connection_string, server_verification_cert=hub.ca_pem, aio=True,
                               keep_alive=5, connection_retry=False)
        assert client._mqtt_pipeline.pipeline_configuration.connection_retry is False
        try:
            await asyncio.wait_for(client.connect(), 10)
            await asyncio.wait_for(client.send_message("aio"), 10)
        finally:
            await asyncio.wait_for(client.shutdown(), 10)
    asyncio.run(scenario())
    assert [t.body for t in hub.wait_for_telemetry(1, "plain-aio")] == [b"aio"]


# --- the pool -----------------------------------------------------------------------------------

def test_pool_of_five_connects_and_sends(hub, make_pool):
    devs = add_devices(hub, 5)
    pool = make_pool(devs)
    assert pool.device_ids == [d.device_id for d in devs]
    assert pool.clients == {}, "nothing is created before connect()"
    pool.connect(timeout=10)
    assert sorted(hub.connected_devices()) == sorted(pool.device_ids)
    clients = pool.clients
    assert len({id(c) for c in clients.values()}) == 5 and all(c.connected for c in clients.values())
    cfg = clients["dev0"]._mqtt_pipeline.pipeline_configuration
    assert (cfg.connection_retry, cfg.auto_connect, cfg.keep_alive) == (False, False, 5)
    for d in pool.device_ids:
        pool.send(d, Message(f"hello {d}", message_id=f"m-{d}"), timeout=5)
    got = hub.wait_for_telemetry(5, timeout=5)
    assert {(t.device_id, t.message_id) for t in got} == {(d, f"m-{d}") for d in pool.device_ids}
    assert pool.recreations == [] and pool.failed == {}
    assert repr(pool) == "<DevicePool of 5 devices: 5 connected, 0 recovering, 0 failed>"


def test_region_failover_recreates_every_client_and_handlers_come_back(hub, make_pool):
    # The bare SDK loses C2D, methods and desired patches here (test_faults_sdk); the pool must not.
    devs = add_devices(hub, 5)
    pool = make_pool(devs)
    c2d, patches = Inbox(), Inbox()
    pool.on_message_received = lambda d, m: c2d((d, m.data))
    pool.on_twin_desired_properties_patch_received = lambda d, p: patches((d, p.get("colour")))
    answer_methods(pool)
    pool.connect(timeout=10)
    before = pool.clients
    assert hub.invoke_method("dev0", "ping", timeout=5).payload == "dev0"

    f = hub.faults.region_failover(outage=1)
    events = reconnects_after(hub, pool.device_ids, f.started_at, timeout=8)
    pool.wait_connected(timeout=5)
    assert all(ev.at >= f.ended_at for ev in events.values())
    assert all(ev.detail["session_present"] is False for ev in events.values()), "the secondary has no sessions"
    after = pool.clients
    assert all(after[d] is not before[d] for d in pool.device_ids), "every client was replaced"
    assert not any(c.connected for c in before.values())
    recreated = pool.recreations
    assert sorted(r.device_id for r in recreated) == sorted(pool.device_ids)
    assert all(r.at >= f.started_at and "connection lost" in r.reason for r in recreated)

    for d in pool.device_ids:
        hub.send_c2d(d, f"after failover {d}")
        hub.update_desired(d, {"colour": "green"})
    assert sorted(c2d.wait(5, timeout=5)) == sorted((d, f"after failover {d}".encode()) for d in pool.device_ids)
    assert sorted(patches.wait(5, timeout=5)) == sorted((d, "green") for d in pool.device_ids)
    for d in pool.device_ids:
        resp = hub.invoke_method(d, "ping", timeout=5)
        assert (resp.status, resp.payload) == (200, d)
        pool.send(d, f"still here {d}", timeout=5)
    assert hub.region == "secondary"


def test_drop_recreates_the_client_within_about_min_backoff(hub, make_pool):
    [dev] = add_devices(hub, 1)
    pool = make_pool([dev], min_backoff=0.1)
    pool.connect(timeout=5)
    old = pool.clients[dev.device_id]
    drop = hub.faults.drop()
    reconnects_after(hub, [dev.device_id], drop.started_at, timeout=5)
    # the pool's first attempt after the drop got in: one CONNECT, nothing refused (how soon the
    # attempt comes after min_backoff is a speed, for a benchmark rather than a test)
    attempts = [e.kind for e in hub.events if e.device_id == dev.device_id and e.at >= drop.started_at
                and e.kind in ("connect", "connect_refused", "auth_failure")]
    assert attempts == ["connect"]
    pool.wait_connected(timeout=5)
    [rec] = pool.recreations
    assert rec.device_id == dev.device_id and "failed attempt" not in rec.reason
    assert pool.clients[dev.device_id] is not old
    assert hub.wait_for_event("disconnect", dev.device_id).reason == "drop"
    pool.send(dev.device_id, "after drop", timeout=5)


def test_send_in_flight_when_the_client_is_lost_goes_out_again_on_the_new_one(hub, make_pool):
    [dev] = add_devices(hub, 1)
    pool = make_pool([dev])
    pool.connect(timeout=5)
    lost = hub.faults.drop_before_ack()  # the hub records the message, then resets before the PUBACK
    # returning at all means the re-sent publish was acknowledged on the new client: a send left
    # waiting on the lost one would raise DeviceTimeoutError at its deadline
    pool.send(dev.device_id, Message("x", message_id="x"), timeout=8)
    assert lost.wait(5).report().duplicates == 1
    got = hub.telemetry(dev.device_id)
    assert [t.message_id for t in got] == ["x", "x"] and got[1].duplicate, "at least once: the hub sees it twice"
    [rec] = pool.recreations
    assert rec.device_id == dev.device_id


def test_refuse_5_the_pool_keeps_trying_and_recovers(hub, make_pool):
    # The bare SDK stops for good after one CONNACK 5 (test_faults_sdk); the pool must not.
    [dev] = add_devices(hub, 1)
    pool = make_pool([dev])
    pool.connect(timeout=5)
    refuse = hub.faults.refuse(5, seconds=1)
    hub.faults.drop()
    refuse.wait(5)
    ev = reconnects_after(hub, [dev.device_id], refuse.started_at, timeout=5)[dev.device_id]
    assert ev.at >= refuse.ended_at
    auth_failures = [e for e in hub.events if e.kind == "auth_failure" and e.device_id == dev.device_id]
    assert len(auth_failures) >= 2, "CONNACK 5 did not stop the pool"
    pool.wait_connected(timeout=5)
    [rec] = pool.recreations
    assert "CredentialError" in rec.reason
    pool.send(dev.device_id, "back", timeout=5)


def test_send_raises_naming_the_device_after_the_operation_timeout_then_it_comes_back(hub, make_pool):
    [dev] = add_devices(hub, 1, prefix="slowpoke")
    pool = make_pool([dev], operation_timeout=1.5, max_backoff=0.5)
    pool.connect(timeout=5)
    # long enough that a busy machine still sees the device fail inside it; cancelled below
    refuse = hub.faults.refuse(3, seconds=60)
    hub.faults.drop()
    # timeout=None: only the pool's operation_timeout (1.5 s) can end this send before the 60 s
    # refusal does, and the send must raise rather than succeed after the refusal
    with pytest.raises((DeviceTimeoutError, DeviceConnectionError), match="slowpoke0"):
        pool.send(dev.device_id, "lost", timeout=None)
    # marked failed at the operation timeout, possibly before its first refused attempt finished
    # ("no attempt finished"); the reason names the refusal once an attempt has come back
    wait_until(lambda: "ConnectionFailedError" in pool.failed.get(dev.device_id, ""), 30,
               "the device marked failed, with the refusal as its reason")
    # a failed device fails fast: with a 300 s timeout only an immediate refusal can return
    # within this test's timeout, and it is the pool's own verdict, not a send attempt
    with pytest.raises(DeviceConnectionError, match="'slowpoke0' is unavailable") as err:
        pool.send(dev.device_id, "still lost", timeout=300)
    assert not [t for t in hub.telemetry(dev.device_id) if t.body == b"still lost"]
    assert err.value.device_ids == [dev.device_id] and isinstance(err.value, ConnectionError)
    # failed is not final: once the hub lets it in again, the device rejoins
    refuse.cancel()
    pool.wait_connected(timeout=5)
    assert pool.failed == {}
    pool.send(dev.device_id, "back", timeout=5)


def test_connect_names_the_devices_that_failed_without_their_keys(hub, make_pool):
    good = hub.add_device("good")
    hub.add_device("bad")
    wrong_key = "QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5MTI="
    bad_cs = device_connection_string(hub.hostname, "bad", wrong_key, hub.gateway_host)
    pool = make_pool([good, ("bad", bad_cs)], max_backoff=0.5)
    with pytest.raises(DeviceConnectionError) as err:
        pool.connect(timeout=1.0)
    assert err.value.device_ids == ["bad"]
    assert "'bad'" in str(err.value) and "CredentialError" in str(err.value)
    assert wrong_key not in str(err.value) and wrong_key not in repr(pool)
    assert good.primary_key not in repr(pool)
    pool.send("good", "fine", timeout=5)
    wait_until(lambda: "CredentialError" in pool.failed.get("bad", ""), 30,
               "'bad' marked failed, with the refused credentials as its reason")


def test_close_is_idempotent_and_leaves_no_threads_behind(hub, make_pool):
    before = collections.Counter(t.name for t in threading.enumerate())
    devs = add_devices(hub, 3)
    pool = make_pool(devs)
    pool.on_message_received = lambda d, m: None
    answer_methods(pool)
    pool.connect(timeout=5)
    pool.send("dev0", "one", timeout=5)
    hub.faults.drop(device_id="dev1")
    wait_until(lambda: len(pool.recreations) == 1, 5, "dev1 recreated")
    # what close() must achieve is checked below: the hub sees every device go, threads end
    pool.close(timeout=5)
    pool.close(timeout=5)
    wait_until(lambda: hub.connected_devices() == [], 2, "the hub to see every device go")

    def leftovers():
        now = collections.Counter(t.name for t in threading.enumerate())
        return {name for name in now - before if name not in SDK_PROCESS_THREADS}
    try:
        wait_until(lambda: not leftovers(), 5, "SDK and pool threads to end")
    except TimeoutError:
        pytest.fail(f"threads left behind after close(): {sorted(leftovers())}")
    with pytest.raises(ConnectionError, match="closed"):
        pool.send("dev0", "after close", timeout=1)
    with pytest.raises(RuntimeError, match="closed"):
        pool.connect()
    assert repr(pool) == "<DevicePool of 3 devices: closed>"


@pytest.mark.timeout(30)
def test_a_pool_of_twenty_survives_a_region_failover(hub, make_pool):
    devs = add_devices(hub, 20)
    pool = make_pool(devs)
    pool.on_message_received = lambda d, m: None
    answer_methods(pool)
    pool.connect(timeout=10)
    f = hub.faults.region_failover(outage=1)
    # the deadlines below bound the recovery; how fast twenty devices come back (a 1 s outage and
    # the 0.1 + 0.2 + 0.4 + 0.8 s backoff) is a speed, for a benchmark rather than a test
    reconnects_after(hub, pool.device_ids, f.started_at, timeout=10)
    pool.wait_connected(timeout=5)
    assert sorted({r.device_id for r in pool.recreations}) == sorted(pool.device_ids)
    assert hub.invoke_method("dev19", "ping", timeout=5).status == 200
    for d in pool.device_ids:
        pool.send(d, f"after {d}", timeout=5)
    assert len(hub.wait_for_telemetry(20, timeout=5)) == 20
    rep = f.report()
    assert rep.recovered and len(rep.devices) == 20


def test_a_client_the_hub_does_not_see_is_replaced_although_it_says_connected(hub, make_pool):
    """The liveness probe: the hub's word against the client's. Here the probe lies for a while,
    which stands in for a connection the hub lost without the client noticing."""
    devs = add_devices(hub, 2)
    hidden = set()
    pool = make_pool(devs, liveness_probe=lambda: set(hub.connected_devices()) - hidden, probe_grace=0.5)
    pool.connect(timeout=5)
    old = pool.clients["dev1"]
    hidden.add("dev1")
    wait_until(lambda: pool.wedges, 10, "the pool to find dev1 missing on the hub")
    hidden.clear()
    pool.wait_connected(timeout=10)
    [found] = pool.wedges
    assert found.device_id == "dev1"
    assert found.text.startswith("dev1: the hub has had no connection from it for ")
    assert found.text.endswith("s; it still reports connected")
    assert pool.clients["dev1"] is not old and pool.clients["dev0"] is not None
    assert [r.device_id for r in pool.recreations] == ["dev1"]
    pool.send("dev1", "after", timeout=5)
    assert hub.wait_for_telemetry(1, device_id="dev1", timeout=5)[0].body == b"after"


def test_a_send_without_acknowledgement_past_ack_timeout_replaces_the_client(hub, make_pool):
    [dev] = add_devices(hub, 1)
    pool = make_pool([dev], ack_timeout=1.0)
    pool.connect(timeout=5)
    old = pool.clients["dev0"]
    delay = hub.faults.delay_acks(30, device_id="dev0")
    sender = threading.Thread(target=pool.send, args=("dev0", Message("late", message_id="late-1")),
                              kwargs={"timeout": 15}, daemon=True)
    sender.start()
    wait_until(lambda: pool.wedges, 10, "the pool to give up on the silent client")
    delay.cancel()
    sender.join(15)
    assert not sender.is_alive()
    assert "dev0: send_message got no acknowledgement within 1 s; it still reports connected" in pool.wedges[0].text
    assert pool.clients["dev0"] is not old
    assert "late-1" in {t.message_id for t in hub.telemetry("dev0")}


# --- arguments -----------------------------------------------------------------------------------

CS = device_connection_string("h.azure-devices.net", "d1", "a2V5a2V5a2V5a2V5", "127.0.0.1")


@pytest.mark.parametrize("kwargs, message", [
    ({"devices": []}, "devices is empty"),
    ({"devices": "d1"}, "devices must be an iterable"),
    ({"devices": [("d1",)]}, "devices: expected"),
    ({"devices": [object()]}, "devices: object is neither"),
    ({"devices": [("d1", CS), ("d1", CS)]}, "more than once"),
    ({"devices": [("d2", CS)]}, "is for device 'd1'"),
    ({"devices": [("", CS)]}, "device_id must be a non-empty string"),
    ({"devices": [("d1", "")]}, "connection string"),
    ({"min_backoff": -1}, "min_backoff"),
    ({"min_backoff": 2, "max_backoff": 1}, "max_backoff"),
    ({"delta_backoff": "0.1"}, "delta_backoff"),
    ({"operation_timeout": 0}, "operation_timeout"),
    ({"connect_timeout": True}, "connect_timeout"),
    ({"connection_retry": True}, "connection_retry"),
    ({"auto_connect": True}, "auto_connect"),
    ({"server_verification_cert": b"pem"}, "server_verification_cert"),
    ({"ack_timeout": 0}, "ack_timeout"),
    ({"liveness_probe": "hub"}, "liveness_probe must be callable"),
    ({"probe_grace": -1}, "probe_grace"),
    ({"watch_interval": 0}, "watch_interval"),
])
def test_bad_pool_arguments_are_named(kwargs, message):
    kwargs = dict(kwargs)
    devices = kwargs.pop("devices", [("d1", CS)])
    with pytest.raises((TypeError, ValueError), match=message):
        DevicePool(devices, **kwargs)


def test_bad_call_arguments_are_named():
    pool = DevicePool([("d1", CS)])
    with pytest.raises(ValueError, match="device_id 'nope'"):
        pool.send("nope", "x")
    with pytest.raises(ValueError, match="timeout"):
        pool.send("d1", "x", timeout=-1)
    with pytest.raises(ValueError, match="on_message_received"):
        pool.on_message_received = "not callable"
    with pytest.raises(ConnectionError, match="call connect"):
        pool.send("d1", "x", timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        pool.close(timeout=-1)
    pool.close()
    with pytest.raises(TypeError, match="Unsupported keyword"):
        DevicePool([("d1", CS)], not_an_sdk_option=1).connect(timeout=1)  # from the SDK, before any I/O
    with pytest.raises(ValueError, match="connection_string"):
        create_client("")


def test_no_secret_in_validation_errors():
    key = "U2VjcmV0U2VjcmV0U2VjcmV0"
    for cs in (f"HostName=h;DeviceId=d1;SharedAccessKey:{key}",
               f"HostName=h;DeviceId=d1;SharedAccessKey={key};Bogus=1",
               f"HostName=h;DeviceId=other;SharedAccessKey={key}"):
        with pytest.raises(ValueError) as err:
            DevicePool([("d1", cs)])
        assert key[:8] not in str(err.value)


# --- backoff and slot states (no I/O) -----------------------------------------------------------

def test_backoff_grows_exponentially_within_its_bounds():
    b = Backoff(min=0.1, max=10.0, delta=0.1)
    assert b.delay(0, uniform=lambda lo, hi: hi) == pytest.approx(0.1)  # the first retry: min
    assert b.delay(3, uniform=lambda lo, hi: 1.0) == pytest.approx(0.1 + 0.1 * 7)
    assert b.delay(3, uniform=lambda lo, hi: lo) == pytest.approx(0.1 + 0.1 * 7 * 0.8)
    assert b.delay(3, uniform=lambda lo, hi: hi) == pytest.approx(0.1 + 0.1 * 7 * 1.2)
    assert b.delay(10_000) == 10.0  # capped, and no OverflowError
    assert all(0.1 <= b.delay(n) <= 10.0 for n in range(70))


def test_backoff_arguments_are_checked():
    with pytest.raises(ValueError, match="max_backoff .* must not be less than min_backoff"):
        Backoff.checked(2, 1, 0.1)
    with pytest.raises(TypeError, match="delta_backoff"):
        Backoff.checked(0.1, 1, "0.1")


def test_slot_states_move_only_as_the_table_allows():
    slot = Slot("d1", CS)
    assert slot.state is SlotState.NEW
    for to in (SlotState.CONNECTING, SlotState.CONNECTED, SlotState.RECREATING, SlotState.FAILED,
               SlotState.CONNECTING, SlotState.FAILED, SlotState.CONNECTED, SlotState.CLOSED):
        assert to in TRANSITIONS[slot.state]
        slot.move(to)
        assert slot.state is to and slot.failed == (to is SlotState.FAILED)
    with pytest.raises(RuntimeError, match="no transition CLOSED -> CONNECTING"):
        slot.move(SlotState.CONNECTING)
    with pytest.raises(RuntimeError, match="NEW -> CONNECTED"):
        Slot("d2", CS).move(SlotState.CONNECTED)
    assert set(TRANSITIONS) == set(SlotState)
    assert all(SlotState.CLOSED in TRANSITIONS[s] for s in SlotState if s is not SlotState.CLOSED)
