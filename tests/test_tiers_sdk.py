"""IoT Hub's tier throttles on the fake hub (default S1 x 1; iothub/tiers.py has the sources).

Connection shaping is checked on the hub's own timestamps: the tier's bucket (GCRA) admits at most
`burst + rate x t` connections in any window of t seconds, however fast they arrive, so the
assertions hold on a loaded machine too. Raw MQTT (tests/mqttclient.py) opens the many connections,
since it can finish every TLS handshake first and then send all CONNECTs at once; the SDK test
shows what an unmodified client sees.
"""
import asyncio
import threading

import pytest
from azure.iot.device import Message
from mqttclient import ConnectionClosed, MqttClient, sas_token, username_for
from sdk_support import bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.iothub.mqtt import encode
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.iothub.tiers import Operation, Shaping

pytestmark = pytest.mark.timeout(60)

S1_RATE = 100.0   # new connections and D2C sends per second, S1 x 1 (D-QT, iothub/tiers.py)
S1_BURST = 100.0  # the bucket holds one second of the rate (assumption, iothub/tiers.py)


def _close(clients):
    for client in clients:
        client.close()


def _connect_all(hub, n):
    # set-up, outside the registry throttle (100/min on S1; tests/test_tier_registry.py covers it)
    devices = [hub.add_device(f"d{i:03}", throttle=False) for i in range(n)]
    clients = [MqttClient.open(hub) for _ in devices]
    try:
        for client, dev in zip(clients, devices):
            client.send(p.Connect(dev.device_id, 60, True, username_for(hub, dev.device_id),
                                  sas_token(hub, dev.device_id).encode(), None, "MQTT", 4))
        codes = [client.expect(p.CONNACK, 20).return_code for client in clients]
    except BaseException:
        _close(clients)
        raise
    return clients, codes


def test_s1_spreads_a_burst_of_new_connections_at_the_tier_rate():
    n = 250
    with FakeHub("tierhub") as hub:  # the default tier: S1 x 1
        assert str(hub.tier) == "S1 x 1"
        clients, codes = _connect_all(hub, n)
        try:
            assert codes == [0] * n
            times = sorted(e.at for e in hub.events if e.kind == "connect")
            assert len(times) == n
            for i, start in enumerate(times):
                in_window = sum(1 for t in times[i:] if t < start + 1.0)
                assert in_window <= S1_BURST + S1_RATE + 1, f"{in_window} connections within 1 s"
            # the last one waited for the rate to serve those beyond the burst (timers never fire early
            # by more than the clock's resolution)
            assert times[-1] - times[0] >= (n - S1_BURST - 1) / S1_RATE - 0.05
            waited = sum(e.detail.get("throttled", 0) for e in hub.events if e.kind == "connect")
            total = sum(hub.throttled_time(f"d{i:03}") for i in range(n))
            assert waited == pytest.approx(total, abs=0.01 * n)
        finally:
            _close(clients)


def test_recovery_report_shows_the_reconnect_waves_throttling_waits():
    with FakeHub("tierhub") as hub:
        old, _ = _connect_all(hub, 150)
        fo = hub.faults.region_failover(outage=0.2)
        fo.wait(10)
        _close(old)
        devices = [f"d{i:03}" for i in range(150)]
        assert sorted(fo.report().devices) == devices
        # the raw clients do not reconnect on their own: the wave is sent here, all at once
        clients, codes = _reconnect_all(hub, devices)
        try:
            assert codes == [0] * 150
            rep = fo.report()
            waits = {e.device_id: e.detail.get("throttled", 0.0) for e in hub.events
                     if e.kind == "connect" and e.at >= fo.started_at}
            for device_id, d in rep.devices.items():
                assert d.throttled == pytest.approx(waits[device_id])
            assert rep.throttled == pytest.approx(max(waits[d] for d in rep.devices) if rep.devices else 0.0)
        finally:
            _close(clients)


def _reconnect_all(hub, device_ids):
    clients = [MqttClient.open(hub) for _ in device_ids]
    try:
        for client, device_id in zip(clients, device_ids):
            client.send(p.Connect(device_id, 60, True, username_for(hub, device_id),
                                  sas_token(hub, device_id).encode(), None, "MQTT", 4))
        codes = [client.expect(p.CONNACK, 20).return_code for client in clients]
    except BaseException:
        _close(clients)
        raise
    return clients, codes


def test_no_tier_means_no_shaping():
    with FakeHub("freehub", tier=None) as hub:
        clients, codes = _connect_all(hub, 150)
        try:
            assert codes == [0] * 150
            assert not [e for e in hub.events if e.kind == "connect" and "throttled" in e.detail]
            assert hub.throttled_time("d000") == 0.0
        finally:
            _close(clients)


def test_d2c_over_the_shaping_queue_closes_the_connection_without_puback(hub):
    dev = hub.add_device("dev1")
    client = MqttClient.open(hub)
    try:
        client.send(p.Connect("dev1", 60, True, username_for(hub, "dev1"), sas_token(hub, "dev1").encode(),
                              None, "MQTT", 4))
        assert client.expect(p.CONNACK).return_code == 0
        # 100 taken at once, 6000 queued (60 s at 100/s), the rest refused: the hub closes the connection
        n = 7000
        burst = b"".join(encode(p.Publish(f"devices/{dev.device_id}/messages/events/", b"x", 1, i % 65535 + 1))
                         for i in range(n))
        client.send_raw(burst)
        acks = 0
        with pytest.raises(ConnectionClosed):
            while True:
                assert client.recv(timeout=30).type == p.PUBACK
                acks += 1
        assert S1_BURST <= acks < n, "those admitted at once are acknowledged, the queued ones never"
        throttled = hub.wait_for_event("throttled", "dev1", timeout=10)
        assert throttled.detail == {"operation": "d2c_send", "error_code": 429001}
        gone = hub.wait_for_event("disconnect", "dev1", timeout=10)
        assert gone.reason == "throttled"
    finally:
        client.close()


def test_c2d_sends_beyond_the_s1_queue_fail_with_429001():
    # 100 at once (a minute of 100/min), then a 1 s queue at 1.67/s. A lone caller waits its turn and
    # is never refused, so the sends beyond the burst arrive together (tests/test_tier_registry.py)
    with FakeHub("tierhub", shaping={Operation.C2D_SEND: Shaping(burst_seconds=60, max_queue_delay=1.0)}) as hub:
        devices = [hub.add_device(f"c{i}") for i in range(4)]
        for i in range(100):
            hub.send_c2d(devices[i % 4].device_id, b"hello")
        barrier, errors = threading.Barrier(8), []

        def send(device_id):
            barrier.wait(10)
            try:
                hub.send_c2d(device_id, b"late")
            except HubOperationError as exc:
                errors.append(exc)
        threads = [threading.Thread(target=send, args=(devices[i % 4].device_id,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors and all(e.error_code == 429001 for e in errors)
        assert "c2d_send throttled" in str(errors[0])
        assert hub.throttle_stats()["c2d_send"].admitted == 100


def test_sdk_client_sends_a_burst_through_s1_shaping(hub):
    dev = hub.add_device("sdk1")
    n = 150

    async def burst():
        client = make_client(hub, dev, aio=True)
        await asyncio.wait_for(client.connect(), 10)
        try:
            await asyncio.wait_for(asyncio.gather(*(
                client.send_message(Message(f"m{i}", message_id=f"m{i}")) for i in range(n))), 30)
        finally:
            await asyncio.wait_for(client.shutdown(), 10)

    asyncio.run(burst())
    assert sorted(t.message_id for t in hub.telemetry("sdk1")) == sorted(f"m{i}" for i in range(n))
    # every PUBACK that waited did so for the rate: never more than the burst beyond it allows
    assert hub.throttled_time("sdk1") <= (n - S1_BURST) / S1_RATE * n
    assert not [e for e in hub.events if e.kind == "throttled"]


def test_sdk_clients_connect_normally_on_the_default_tier(hub):
    clients = []
    for i in range(3):
        c = make_client(hub, hub.add_device(f"s{i}"))
        bounded(c.connect)
        clients.append(c)
    try:
        bounded(clients[0].send_message, Message("hello"))
        assert hub.connected_devices() == ["s0", "s1", "s2"]
    finally:
        for c in clients:
            bounded(c.shutdown)


# --- IoT Hub's limits (iothub/limits.py has the sources) --------------------------------------

def test_d2c_message_id_over_128_characters_closes_the_connection(hub):
    hub.add_device("mid1")
    client = MqttClient.open(hub)
    try:
        client.send(p.Connect("mid1", 60, True, username_for(hub, "mid1"), sas_token(hub, "mid1").encode(),
                              None, "MQTT", 4))
        assert client.expect(p.CONNACK).return_code == 0
        client.send(p.Publish("devices/mid1/messages/events/%24.mid=" + "m" * 129, b"x", 1, 1))
        client.expect_closed(timeout=10)
        violation = hub.wait_for_event("protocol_violation", "mid1", timeout=10)
        assert "129 characters" in violation.detail["message"]
        assert hub.telemetry("mid1") == []
    finally:
        client.close()


@pytest.mark.parametrize(("call", "code", "words"), [
    ({"method_name": "reboot now"}, 400004, "contains ' '"),
    ({"payload": "x" * (129 * 1024)}, 413001, "128 KB"),
    ({"timeout": 301}, 400004, "outside 0..300"),
])
def test_direct_method_limits_are_refused_with_iothubs_codes(hub, call, code, words):
    hub.add_device("m1")
    args = {"method_name": "reboot", "payload": None, "timeout": 5} | call
    with pytest.raises(HubOperationError) as caught:
        hub.invoke_method("m1", args["method_name"], args["payload"], timeout=args["timeout"])
    assert caught.value.error_code == code
    assert words in str(caught.value)
