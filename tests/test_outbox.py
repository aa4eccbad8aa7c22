"""The buffered sender against the fake hub and the unmodified SDK: nothing accepted is ever lost.

Clients use connection_retry_interval=1 and keep_alive 1-5 s (the SDK's floors are 1 s), so each
fault scenario takes a few seconds. Every wait is bounded: flush/close take timeouts, SDK calls
outside the outbox go through `bounded`, threads are joined with a deadline.
"""
import asyncio
import json
import re
import threading

import pytest
from azure.iot.device import Message, exceptions
from sdk_support import bounded, make_client, wait_until

from pytest_iotfailover.devices.outbox import AsyncOutbox, Outbox, OutboxClosed, OutboxFull

pytestmark = pytest.mark.timeout(30)


def _shutdown(client):
    try:
        bounded(client.shutdown)
    except (exceptions.ClientError, TimeoutError):
        pass  # teardown only; the hub goes away next anyway


@pytest.fixture
def client(hub, device):
    c = make_client(hub, device)
    bounded(c.connect)
    yield c
    _shutdown(c)


def hub_ids(hub, device_id=None):
    return [t.message_id for t in hub.telemetry(device_id)]


def first_seen(ids):
    """The ids in the order the hub first accepted them; re-deliveries left out."""
    return list(dict.fromkeys(ids))


# --- ids, order, message forms -----------------------------------------------------------------

def test_ids_are_stamped_and_preserved(hub, device, client):
    with Outbox(client) as ob:
        ids = [
            ob.send("text"),
            ob.send(b"\x00bytes"),
            ob.send({"temperature": 21.5}),
            ob.send(Message("mine", message_id="keep-me")),
            ob.send(Message("no id yet")),
        ]
        assert ids[3] == "keep-me"
        stamped = ids[:3] + ids[4:]
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in stamped)
        assert len(set(ids)) == 5
        assert ob.message_ids == ids
        ob.flush(10)
        assert ob.pending == 0 and ob.pending_ids == []
        assert ob.sent_ids == ids
        assert ob.dropped_ids == [] and ob.failures == []
        assert set(ob.submitted_at) == set(ids)
    got = hub.telemetry(device.device_id)
    assert [t.message_id for t in got] == ids
    assert all(ob.submitted_at[t.message_id] <= t.enqueued_at for t in got)
    assert got[1].body == b"\x00bytes"
    assert json.loads(got[2].body) == {"temperature": 21.5}
    assert got[2].system_properties["content_type"] == "application/json"


def test_order_is_preserved(hub, device, client):
    with Outbox(client, name="ordered") as ob:
        ids = [ob.send(f"m{i}") for i in range(50)]
        ob.flush(15)
        assert ob.sent_ids == ids
    assert hub_ids(hub, device.device_id) == ids


def test_send_is_thread_safe(hub, device, client):
    with Outbox(client) as ob:
        per_thread = {}

        def producer(n):
            per_thread[n] = [ob.send(f"t{n}-{i}") for i in range(15)]
        threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ob.flush(15)
        assert sorted(ob.message_ids) == sorted(i for ids in per_thread.values() for i in ids)
    got = hub_ids(hub, device.device_id)
    assert got == ob.message_ids
    for ids in per_thread.values():  # each producer's own order survives the interleaving
        assert [i for i in got if i in set(ids)] == ids


# --- faults --------------------------------------------------------------------------------------

def test_region_failover_after_20_of_60_loses_nothing(hub, device, client):
    # ~2.5 s: a 1 s outage, then the SDK's 1 s retry interval
    failover = hub.faults.region_failover(outage=1, after_messages=20, unread=0)
    with Outbox(client, send_timeout=5) as ob:
        ids = [ob.send(f"m{i}") for i in range(60)]
        ob.flush(20)
        assert ob.pending == 0 and sorted(ob.sent_ids) == sorted(ids)
    failover.wait(5)
    assert hub.region == "secondary"
    assert failover.report().messages_before == 20
    got = hub_ids(hub, device.device_id)
    assert set(ids) <= set(got)
    assert first_seen(got) == ids


def test_back_off_ends_when_the_sdk_has_reconnected(hub, device, client):
    # A 60 s back-off after the failed send: the message can only arrive within the 20 s below if
    # the lane stops waiting once the SDK is connected again (its retry interval here is 1 s).
    fault = hub.faults.region_failover(outage=1, unread=0)
    wait_until(lambda: not client.connected, 10, "the client noticing the failover")
    with Outbox(client, send_timeout=5, min_backoff=60, max_backoff=60) as ob:
        mid = ob.send("while the hub is away")
        wait_until(lambda: ob.failures, 10, "a failed send while the hub is away")
        ob.flush(20)
        assert ob.sent_ids == [mid]
    fault.wait(5)
    assert hub_ids(hub, device.device_id) == [mid]


def test_drop_before_ack_delivers_with_visible_duplicates(hub, device, client):
    lost_acks = hub.faults.drop_before_ack(count=2, after_messages=3)
    with Outbox(client, send_timeout=5) as ob:
        ids = [ob.send(f"m{i}") for i in range(10)]
        ob.flush(20)
        assert ob.sent_ids == ids, "the outbox counts each message once"
    lost_acks.wait(5)
    got = hub.telemetry(device.device_id)
    assert set(ids) <= {t.message_id for t in got}
    dups = [t.message_id for t in got if t.duplicate]
    assert len(dups) >= 2 and set(dups) <= set(ids)
    assert len(got) == len(ids) + len(dups)
    assert first_seen(t.message_id for t in got) == ids


def test_blackhole_with_short_send_timeout_loses_nothing(hub, device):
    # keep_alive=1: the SDK notices the silent hub after ~2 s; the 1 s send_timeout fires first,
    # so attempts are abandoned and retried while the hub is dark (~5 s in all)
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        with Outbox(c, send_timeout=1, min_backoff=0.05, max_backoff=0.5) as ob:
            before = [ob.send(f"before{i}") for i in range(5)]
            ob.flush(10)
            dark = hub.faults.blackhole(3)
            during = [ob.send(f"dark{i}") for i in range(10)]
            ob.flush(20)
            assert any("TimeoutError" in error and "send_timeout=1" in error
                       for _, error, _ in ob.failures), ob.failures
            assert {mid for mid, _, _ in ob.failures} <= set(during)
            dark.wait(5)
        got = hub_ids(hub, device.device_id)
        assert set(before + during) <= set(got)
        assert first_seen(got)[:5] == before
    finally:
        _shutdown(c)


# --- capacity ------------------------------------------------------------------------------------

def test_capacity_raise(hub, device, client):
    slow = hub.faults.delay_acks(0.5)
    with Outbox(client, capacity=2, on_overflow="raise") as ob:
        ids = [ob.send("a"), ob.send("b")]
        with pytest.raises(OutboxFull, match=r"capacity 2"):
            ob.send("c")
        assert ob.message_ids == ids and ob.pending == 2
        slow.cancel()
        ob.flush(10)
        ob.send("d")  # room again
        ob.flush(10)
    assert hub_ids(hub, device.device_id) == ob.message_ids


def test_capacity_drop_oldest_spares_the_message_in_flight(hub, device, client):
    slow = hub.faults.delay_acks(1.0)
    with Outbox(client, capacity=3, on_overflow="drop_oldest") as ob:
        m0 = ob.send("m0")
        hub.wait_for_telemetry(1, device_id=device.device_id)  # recorded, its PUBACK held back
        m1, m2 = ob.send("m1"), ob.send("m2")
        m3 = ob.send("m3")
        m4 = ob.send("m4")
        assert ob.dropped_ids == [m1, m2]
        assert ob.pending_ids == [m0, m3, m4]
        assert ob.message_ids == [m0, m1, m2, m3, m4]
        slow.cancel()
        ob.flush(10)
        assert ob.sent_ids == [m0, m3, m4]
    assert hub_ids(hub, device.device_id) == [m0, m3, m4]


def test_capacity_block_waits_for_room_made_by_acknowledgements(hub, device, client):
    # the hub reads nothing until the test ends the blackhole: no acknowledgement can make room
    # before that, however slow the machine
    dark = hub.faults.blackhole(300, device_id=device.device_id)
    with Outbox(client, capacity=2) as ob:
        first = [ob.send("a"), ob.send("b")]
        result, acked_before_admission = [], []

        def send_c():
            result.append(ob.send("c"))
            acked_before_admission.extend(ob.sent_ids)
        blocked = threading.Thread(target=send_c, daemon=True)
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive(), "send() must wait while the outbox is full"
        dark.cancel()
        ob.flush(10)  # the first acknowledgement lets "c" in; flush then waits for it too
        blocked.join(5)
        assert not blocked.is_alive() and acked_before_admission, "c was let in before any acknowledgement"
        ob.flush(10)
        assert ob.sent_ids == first + result
    assert hub_ids(hub, device.device_id) == first + result


def test_blocked_send_raises_when_the_outbox_is_closed(hub, device, client):
    hub.faults.delay_acks(3, duration=5)
    ob = Outbox(client, capacity=1)
    ob.send("a")
    errors = []

    def sender():
        try:
            ob.send("b")
        except Exception as exc:
            errors.append(exc)
    t = threading.Thread(target=sender, daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    ob.close(timeout=2)
    t.join(3)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], OutboxClosed)
    assert "closed" in str(errors[0])
    with pytest.raises(OutboxClosed):
        ob.send("after close")


# --- flush and close ----------------------------------------------------------------------------

def test_flush_timeout_names_what_is_pending(hub, device, client):
    # nothing is read, so nothing acknowledged, until the blackhole ends: a flush that ignored
    # its 0.3 s would never return within this test's timeout
    slow = hub.faults.blackhole(300, device_id=device.device_id)
    with Outbox(client) as ob:
        ids = [ob.send(f"m{i}") for i in range(8)]
        with pytest.raises(TimeoutError) as err:
            ob.flush(0.3)
        text = str(err.value)
        assert "8 messages pending" in text
        assert ", ".join(ids[:5]) in text and ids[5] not in text
        slow.cancel()
        ob.flush(10)


def test_close_keeps_pending_ids_and_a_late_ack_still_counts(hub, device, client):
    # the hub reads nothing from the device until the test ends the blackhole: the call in
    # flight cannot complete before that, however slow the machine
    dark = hub.faults.blackhole(300, device_id=device.device_id)
    ob = Outbox(client, name="closing")
    ids = [ob.send(f"m{i}") for i in range(3)]
    wait_until(lambda: any(t.name == f"closing:send:{ids[0]}" for t in threading.enumerate()), 5,
               "the first message in flight")
    # close must not wait for a call in flight: one that did would block past this test's timeout
    ob.close(timeout=300)
    assert dark.active and hub.telemetry(device.device_id) == [], "the call in flight was still blocked"
    assert ob.closed
    assert ob.pending_ids == ids and ob.pending == 3
    with pytest.raises(OutboxClosed, match="3 messages were left pending"):
        ob.send("more")
    with pytest.raises(OutboxClosed, match="3 messages pending"):
        ob.flush(1)
    # the call in flight was abandoned, not cancelled: its PUBACK still lands
    dark.cancel()
    wait_until(lambda: ob.pending == 2, 5, "the in-flight message was not acknowledged")
    assert ob.sent_ids == ids[:1] and ob.pending_ids == ids[1:]
    # nothing else may be sent after close: close() has ended the worker that would send it
    assert not [t for t in threading.enumerate() if t.name == "closing:client"]
    assert hub_ids(hub, device.device_id) == ids[:1]
    ob.close()  # idempotent


# --- pools --------------------------------------------------------------------------------------

class TinyPool:
    """Just enough of DevicePool for the outbox: real SDK clients keyed by device id."""

    def __init__(self, clients):
        self.clients = clients
        self.device_ids = list(clients)
        self.calls = []

    def send(self, device_id, message, timeout=None):
        self.calls.append((device_id, message.message_id))
        bounded(self.clients[device_id].send_message, message, timeout=timeout or 30)


@pytest.fixture
def pool(hub):
    clients = {}
    try:
        for name in ("p0", "p1", "p2"):
            clients[name] = make_client(hub, hub.add_device(name), keep_alive=1)
            bounded(clients[name].connect)
        yield TinyPool(clients)
    finally:
        for c in clients.values():
            _shutdown(c)


def test_pool_round_robin_and_explicit_device(hub, pool):
    with Outbox(pool) as ob:
        ids = [ob.send(f"m{i}") for i in range(30)]
        pinned = ob.send("pinned", device_id="p1")
        with pytest.raises(ValueError, match="device_id 'nope'"):
            ob.send("x", device_id="nope")
        ob.flush(15)
        assert sorted(ob.sent_ids) == sorted(ids + [pinned])
    for n, dev in enumerate(pool.device_ids):
        expected = ids[n::3] + ([pinned] if dev == "p1" else [])
        assert hub_ids(hub, dev) == expected


def test_pool_lanes_are_independent(hub, pool):
    # p0 goes dark for 3 s; p1 and p2 must not wait behind it
    with Outbox(pool, send_timeout=1, min_backoff=0.05, max_backoff=0.5) as ob:
        dark = hub.faults.blackhole(3, device_id="p0")
        ids = {dev: [ob.send(f"{dev}-{i}", device_id=dev) for i in range(5)] for dev in pool.device_ids}
        wait_until(lambda: ob.pending_ids == ids["p0"], 2, "p1 and p2 were not acknowledged")
        assert hub.telemetry("p0") == [] and dark.state == "active"
        ob.flush(20)
    for dev, sent in ids.items():
        assert first_seen(hub_ids(hub, dev)) == sent


# --- asyncio -------------------------------------------------------------------------------------

def test_async_outbox_with_aio_client_across_a_drop(hub, device):
    async def scenario():
        c = make_client(hub, device, aio=True)
        await asyncio.wait_for(c.connect(), 10)
        try:
            drop = hub.faults.drop(after_messages=5)
            async with AsyncOutbox(c, send_timeout=5) as ob:
                ids = [ob.send(f"m{i}") for i in range(20)]
                ids.append(ob.send(Message("mine", message_id="keep-me")))
                await ob.flush(15)
                assert ob.sent_ids == ids and ob.pending == 0
            assert ob.closed
            drop.wait(5)
            return ids
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    ids = asyncio.run(asyncio.wait_for(scenario(), 25))
    got = hub_ids(hub, device.device_id)
    assert set(ids) <= set(got) and first_seen(got) == ids
    assert ids[-1] == "keep-me"


def test_async_outbox_cannot_block_the_loop_but_asend_waits(hub, device):
    async def scenario():
        c = make_client(hub, device, aio=True)
        await asyncio.wait_for(c.connect(), 10)
        try:
            hub.faults.delay_acks(0.3, duration=5)
            ob = AsyncOutbox(c, capacity=1)
            a = ob.send("a")
            with pytest.raises(OutboxFull, match="asend"):
                ob.send("b")
            b = await asyncio.wait_for(ob.asend("b"), 5)
            with pytest.raises(TimeoutError, match="1 messages pending"):
                await ob.flush(0.05)
            await ob.flush(5)
            await ob.close()
            with pytest.raises(TypeError, match="async with"), ob:
                pass
            return [a, b]
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    ids = asyncio.run(asyncio.wait_for(scenario(), 25))
    assert hub_ids(hub, device.device_id) == ids


# --- arguments -----------------------------------------------------------------------------------

class _Client:
    def send_message(self, message):
        pass


class _AsyncClient:
    async def send_message(self, message):
        pass


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity": 0}, "capacity must be at least 1"),
    ({"capacity": 1.5}, "capacity must be a whole number"),
    ({"on_overflow": "spill"}, "on_overflow must be one of"),
    ({"send_timeout": 0}, "send_timeout must be a positive"),
    ({"min_backoff": -1}, "min_backoff must be a non-negative"),
    ({"max_backoff": float("nan")}, "max_backoff must be a number of seconds"),
    ({"min_backoff": 2, "max_backoff": 1}, "max_backoff .* must not be less than min_backoff"),
    ({"name": 3}, "name must be a non-empty string"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        Outbox(_Client(), **kwargs)


def test_bad_targets_and_messages_are_named():
    with pytest.raises(ValueError, match="target must be a device client"):
        Outbox(object())
    with pytest.raises(ValueError, match="use AsyncOutbox"):
        Outbox(_AsyncClient())
    with pytest.raises(ValueError, match="use Outbox for synchronous clients"):
        AsyncOutbox(_Client())
    with Outbox(_Client()) as ob:
        with pytest.raises(ValueError, match="device_id 'd1' given, but the target is a single device"):
            ob.send("x", device_id="d1")
        with pytest.raises(TypeError, match="message must be str, bytes, dict"):
            ob.send(42)
        with pytest.raises(ValueError, match="256 KB"):
            ob.send(b"x" * (256 * 1024 + 1))
        with pytest.raises(ValueError, match="timeout must be"):
            ob.flush(-1)
        assert ob.message_ids == []
    with pytest.raises(RuntimeError, match="running event loop"):
        AsyncOutbox(_AsyncClient()).send("x")
