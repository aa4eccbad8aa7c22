"""Every device operation through the unmodified azure-iot-device client, over TLS, to FakeHub."""
import asyncio
import time

import pytest
from azure.iot.device import Message, MethodResponse, exceptions
from sdk_support import Inbox, bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.sas import make_sas_token

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def hub():
    with FakeHub("sdkhub") as h:
        yield h


@pytest.fixture
def device(hub, request):
    dev = hub.add_device(f"dev-{request.node.name[:40].replace('[', '-').replace(']', '')}-{time.monotonic_ns() % 10**6}")
    yield dev
    hub.remove_device(dev.device_id)


@pytest.fixture
def client(hub, device):
    c = make_client(hub, device)
    bounded(c.connect)
    yield c
    bounded(c.shutdown)


def test_telemetry_with_system_and_custom_properties(hub, device, client):
    msg = Message('{"t": 21.5}', message_id="m-1", content_encoding="utf-8",
                  content_type="application/json")
    msg.correlation_id = "corr/1"
    msg.custom_properties["site"] = "north & south"
    msg.custom_properties["n"] = "1=2"
    bounded(client.send_message, msg)
    [t] = hub.wait_for_telemetry(1, device_id=device.device_id)
    assert t.body == b'{"t": 21.5}'
    assert t.message_id == "m-1"
    assert t.properties == {"site": "north & south", "n": "1=2"}
    assert t.system_properties["correlation_id"] == "corr/1"
    assert t.system_properties["content_type"] == "application/json"
    assert t.system_properties["content_encoding"] == "utf-8"
    assert t.system_properties["connection_device_id"] == device.device_id
    assert (t.dup, t.duplicate, t.qos) == (False, False, 1)


def test_many_messages_arrive_in_order(hub, device, client):
    for i in range(50):
        bounded(client.send_message, Message(str(i), message_id=f"m{i}"))
    got = hub.wait_for_telemetry(50, device_id=device.device_id)
    assert [t.message_id for t in got] == [f"m{i}" for i in range(50)]


def test_twin_get_reported_patch_and_desired_push(hub, device, client):
    patches = Inbox()
    client.on_twin_desired_properties_patch_received = patches
    twin = bounded(client.get_twin)
    assert twin == {"desired": {"$version": 1}, "reported": {"$version": 1}}
    bounded(client.patch_twin_reported_properties, {"temp": {"now": 21, "max": 30}})
    bounded(client.patch_twin_reported_properties, {"temp": {"max": None}, "fw": "1.2"})
    doc = hub.get_twin(device.device_id)
    assert doc["reported"] == {"temp": {"now": 21}, "fw": "1.2", "$version": 3}
    assert hub.update_desired(device.device_id, {"interval": 5}) == 2
    assert patches.wait(1) == [{"interval": 5, "$version": 2}]
    assert bounded(client.get_twin)["desired"] == {"interval": 5, "$version": 2}


def _nested(depth):
    obj = 1
    for level in range(depth, 0, -1):
        obj = {f"l{level}": obj}
    return obj


@pytest.mark.parametrize("patch", [_nested(11), {f"k{i}": "v" * 4000 for i in range(9)}],
                         ids=["11-levels", "over-32KB"])
def test_reported_patch_over_twin_limits_fails_the_call_only(hub, device, client, patch):
    # IoT Hub rejects twin updates that break its limits with status 400 (iothub-mqtt.md §5.2);
    # the SDK turns any status >= 300 into ServiceError, which its sync client re-raises as
    # ClientError("Unexpected failure") from it
    with pytest.raises((exceptions.ServiceError, exceptions.ClientError)) as info:
        bounded(client.patch_twin_reported_properties, patch)
    cause = info.value if isinstance(info.value, exceptions.ServiceError) else info.value.__cause__
    assert isinstance(cause, exceptions.ServiceError) and "status 400" in str(cause)
    bounded(client.patch_twin_reported_properties, _nested(10))
    assert hub.get_twin(device.device_id)["reported"] == dict(_nested(10), **{"$version": 2})
    assert hub.errors == []


def test_method_response_over_128KB_answers_the_caller(hub, device, client):
    def handler(request):
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, "x" * 200_000))
    client.on_method_request_received = handler
    r = hub.invoke_method(device.device_id, "dump", timeout=10)
    assert r.status == 502 and r.payload["errorCode"] == "InvalidResponseWhileProxying"
    assert "131072" in r.payload["message"]
    assert hub.errors == []


def test_c2d_with_properties(hub, device, client):
    inbox = Inbox()
    client.on_message_received = inbox
    hub.send_c2d(device.device_id, "reboot please", {"kind": "cmd/x", "empty": ""}, message_id="c-1")
    [m] = inbox.wait(1)
    assert m.data == b"reboot please"
    assert m.message_id == "c-1"
    assert m.custom_properties == {"kind": "cmd/x", "empty": ""}
    hub.wait_for_event("c2d_completed", device.device_id, where=lambda e: e.detail["message_id"] == "c-1")


def test_direct_method_round_trip(hub, device, client):
    def handler(request):
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 201, {"echo": request.payload,
                                                                     "name": request.name}))
    client.on_method_request_received = handler
    r = hub.invoke_method(device.device_id, "reboot", {"delay": 1}, timeout=5)
    assert (r.status, r.payload) == (201, {"echo": {"delay": 1}, "name": "reboot"})


def test_direct_method_404_when_offline_or_unsubscribed(hub, device, client):
    # 404 must come at once, not after the timeout: with 300 s only an immediate answer can come
    # within this test's 30 s timeout
    r = hub.invoke_method(device.device_id, "m", timeout=300)
    assert r.status == 404 and r.payload["errorCode"] == 404103
    other = hub.add_device(device.device_id + "-off")
    assert hub.invoke_method(other.device_id, "m", timeout=300).status == 404


def test_direct_method_504_when_device_does_not_answer(hub, device, client):
    seen = Inbox()
    client.on_method_request_received = seen  # never answers
    r = hub.invoke_method(device.device_id, "slow", None, timeout=0.5)
    # 504101 is the hub's own verdict that the method's timeout, not something else, ended the call
    assert r.status == 504 and r.payload["errorCode"] == 504101
    assert seen.wait(1)[0].name == "slow"


def test_wrong_key_is_refused_and_recorded(hub, device):
    bad = device.connection_string.replace(device.primary_key, "AAAA" + device.primary_key[4:])
    c = make_client(hub, device)
    c2 = type(c).create_from_connection_string(bad, server_verification_cert=hub.ca_pem,
                                               keep_alive=5, connection_retry_interval=1)
    try:
        with pytest.raises(exceptions.CredentialError):
            bounded(c2.connect)
    finally:
        bounded(c2.shutdown)
        bounded(c.shutdown)
    ev = hub.wait_for_event("auth_failure", device.device_id)
    assert ev.detail["return_code"] == 5 and "signature" in ev.detail["reason"]
    assert hub.telemetry(device.device_id) == []


def test_disabled_device_is_refused(hub, device):
    hub.set_device_enabled(device.device_id, False)
    c = make_client(hub, device)
    try:
        with pytest.raises(exceptions.CredentialError):
            bounded(c.connect)
    finally:
        bounded(c.shutdown)
    assert "disabled" in hub.wait_for_event("auth_failure", device.device_id).detail["reason"]


def test_expired_token_disconnects_connected_client():
    # grace 0 and a token living 2 s: the hub cuts the connection, the SDK's reconnect with the
    # same (user-supplied, non-renewable) token is refused with CONNACK 5 and it gives up.
    from azure.iot.device import IoTHubDeviceClient
    with FakeHub("expiryhub", token_grace=0) as hub:
        dev = hub.add_device("short")
        token = make_sas_token(f"{hub.hostname}/devices/short", dev.primary_key, ttl=2)
        c = IoTHubDeviceClient.create_from_sastoken(token, gateway_hostname=hub.gateway_host,
                                                    server_verification_cert=hub.ca_pem,
                                                    keep_alive=5, connection_retry_interval=1)
        try:
            bounded(c.connect)
            ev = hub.wait_for_event("disconnect", "short", timeout=10)
            assert ev.reason == "token_expired"
            hub.wait_for_event("auth_failure", "short", timeout=10, where=lambda e: "expired" in e.reason)
        finally:
            bounded(c.shutdown)


def test_two_hubs_at_once():
    with FakeHub("hub-a") as a, FakeHub("hub-b") as b:
        assert a.gateway_host != b.gateway_host and a.port == b.port == 8883
        da, db = a.add_device("d"), b.add_device("d")
        ca, cb = make_client(a, da), make_client(b, db)
        try:
            bounded(ca.send_message, "to a")
            bounded(cb.send_message, "to b")
        finally:
            bounded(ca.shutdown)
            bounded(cb.shutdown)
        assert [t.body for t in a.wait_for_telemetry(1)] == [b"to a"]
        assert [t.body for t in b.wait_for_telemetry(1)] == [b"to b"]


def test_events_record_connect_and_client_disconnect(hub, device):
    c = make_client(hub, device)
    t0 = time.time()
    bounded(c.connect)
    bounded(c.disconnect)
    bounded(c.shutdown)
    con = hub.wait_for_event("connect", device.device_id)
    dis = hub.wait_for_event("disconnect", device.device_id)
    assert t0 <= con.at <= dis.at
    assert dis.reason == "client"
    assert con.detail["api_version"] == "2019-10-01" and con.detail["session_present"] is False


def test_aio_client_every_operation(hub, device):
    async def scenario():
        c = make_client(hub, device, aio=True)
        inbox = asyncio.Queue()
        loop = asyncio.get_running_loop()
        c.on_message_received = lambda m: loop.call_soon_threadsafe(inbox.put_nowait, ("c2d", m))
        c.on_twin_desired_properties_patch_received = \
            lambda p: loop.call_soon_threadsafe(inbox.put_nowait, ("patch", p))

        async def on_method(req):
            await c.send_method_response(MethodResponse.create_from_method_request(req, 200, "pong"))
        c.on_method_request_received = on_method
        try:
            await asyncio.wait_for(c.connect(), 10)
            await asyncio.wait_for(c.send_message(Message("aio", message_id="a1")), 10)
            await asyncio.wait_for(c.patch_twin_reported_properties({"aio": True}), 10)
            assert (await asyncio.wait_for(c.get_twin(), 10))["reported"]["aio"] is True
            hub.send_c2d(device.device_id, "hello aio")
            kind, m = await asyncio.wait_for(inbox.get(), 10)
            assert (kind, m.data) == ("c2d", b"hello aio")
            hub.update_desired(device.device_id, {"x": 1})
            kind, p = await asyncio.wait_for(inbox.get(), 10)
            assert (kind, p["x"]) == ("patch", 1)
            r = await hub.invoke_method_async(device.device_id, "ping", timeout=5)
            assert (r.status, r.payload) == (200, "pong")
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    asyncio.run(scenario())
    assert [t.message_id for t in hub.telemetry(device.device_id)] == ["a1"]


def test_async_with_fakehub():
    async def scenario():
        async with FakeHub("asynchub") as h:
            dev = h.add_device("d")
            c = make_client(h, dev, aio=True)
            try:
                await asyncio.wait_for(c.send_message("x"), 10)
            finally:
                await asyncio.wait_for(c.shutdown(), 10)
            return [t.body for t in h.telemetry()]
    assert asyncio.run(scenario()) == [b"x"]


def test_stop_disconnects_clients_with_a_reason():
    h = FakeHub("stophub").start()
    dev = h.add_device("d")
    c = make_client(h, dev, connection_retry=False)
    try:
        bounded(c.connect)
        h.stop()
        assert [e.reason for e in h.events if e.kind == "disconnect"] == ["hub_stopped"]
    finally:
        try:
            bounded(c.shutdown)
        except exceptions.NoConnectionError:
            pass  # the SDK complains that the hub is gone, which is the point
    with pytest.raises(RuntimeError, match="not running"):
        h.send_c2d("d", "x")


def test_service_calls_on_unknown_devices_name_the_device(hub):
    from pytest_iotfailover import HubOperationError
    for call in (lambda: hub.invoke_method("ghost", "m", timeout=1), lambda: hub.send_c2d("ghost", "x"),
                 lambda: hub.get_twin("ghost"), lambda: hub.update_desired("ghost", {"a": 1})):
        with pytest.raises(HubOperationError, match="'ghost' is not registered") as info:
            call()
        assert info.value.error_code == 404001
