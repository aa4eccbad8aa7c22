"""IoT Hub's limits as the embedded hub enforces them: C2D time to live and expiry, iothub-ack
feedback, SAS tokens signed with a shared access policy (`skn=`), the MQTT user name without
`?api-version=`, and property bags with unencoded characters.

Through the unmodified azure-iot-device client where it can produce the case, raw MQTT otherwise.
"""
import asyncio
import datetime
import json
import time
import urllib.error
import urllib.request

import mqttclient as mq
import pytest
from azure.iot.device import IoTHubDeviceClient, Message
from sdk_support import CLIENT_KWARGS, Inbox, bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.backends.fake import FakeBackend
from pytest_iotfailover.backends.real.errors import RealBackendError
from pytest_iotfailover.backends.real.service import ServiceCalls, _c2d_terms
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.fakehub.control_api import ControlServer
from pytest_iotfailover.iothub.limits import C2D_MAX_TTL
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.sas import make_sas_token

pytest_plugins = ["pytester"]

TWO_DAYS = 2 * 86400


@pytest.fixture
def hub():
    # unthrottled: these tests are about limits, not about the tier's rates
    with FakeHub("limitshub", tier=None) as h:
        yield h
    mq.close_all()


@pytest.fixture
def device(hub):
    return hub.add_device("dev1")


@pytest.fixture
def sdk(hub, device):
    clients = []

    def make(**kwargs):
        c = IoTHubDeviceClient.create_from_connection_string(
            device.connection_string, server_verification_cert=hub.ca_pem, **dict(CLIENT_KWARGS, **kwargs))
        clients.append(c)
        bounded(c.connect)
        return c
    yield make
    for c in clients:
        bounded(c.shutdown)


def statuses(records):
    return [(r.message_id, r.status_code) for r in records]


# --- C2D time to live and expiry ----------------------------------------------------------------

def test_expired_c2d_is_never_delivered_and_reports_expired(hub, device, sdk):
    hub.send_c2d(device.device_id, "stale", message_id="old", ttl=0.5, ack="full")
    hub.send_c2d(device.device_id, "fresh", message_id="new")  # default time to live: one hour
    [record] = hub.wait_for_feedback("old", timeout=10)   # dead-lettered at its expiry, device offline
    assert (record.status_code, record.description, record.device_id) == ("Expired", "Expired", "dev1")
    expired = hub.wait_for_event("c2d_expired", "dev1")
    assert expired.detail["message_id"] == "old" and expired.detail["delivery_count"] == 0
    assert record.enqueued_at == expired.detail["expired_at"]  # stamped with when it expired
    inbox = Inbox()
    client = sdk()
    client.on_message_received = inbox
    first = inbox.wait(1)[0]
    assert (first.message_id, first.data) == ("new", b"fresh")  # queued after "old": nothing came before it


def test_c2d_ttl_is_at_most_two_days(hub, device):
    with pytest.raises(HubOperationError, match="two days") as err:
        hub.send_c2d(device.device_id, "x", ttl=TWO_DAYS + 60)
    assert err.value.error_code == 403009
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    with pytest.raises(HubOperationError) as err:
        hub.send_c2d(device.device_id, "x", expiry_time=later)
    assert err.value.error_code == 403009
    assert C2D_MAX_TTL == TWO_DAYS
    # just inside the limit, and in the past (dead-lettered without delivery): both accepted
    hub.send_c2d(device.device_id, "x", ttl=TWO_DAYS - 60)
    hub.send_c2d(device.device_id, "x", expiry_time=time.time() - 5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"ttl": 5, "expiry_time": time.time() + 5}, ValueError, "not both"),
    ({"ttl": -1}, ValueError, "non-negative"),
    ({"ttl": "soon"}, TypeError, "number of seconds"),
    ({"expiry_time": datetime.datetime(2030, 1, 1)}, ValueError, "no time zone"),
    ({"expiry_time": "tomorrow"}, TypeError, "aware datetime"),
])
def test_bad_c2d_expiry_arguments_name_the_argument(hub, device, kwargs, error, match):
    with pytest.raises(error, match=match):
        hub.send_c2d(device.device_id, "x", **kwargs)
    assert hub.errors == []


def test_bad_ack_is_refused_with_argument_invalid(hub, device):
    with pytest.raises(HubOperationError, match="iothub-ack") as err:
        hub.send_c2d(device.device_id, "x", ack="always")
    assert err.value.error_code == 400004
    with pytest.raises(ValueError, match="contradicts"):
        hub.send_c2d(device.device_id, "x", {"iothub-ack": "full"}, ack="none")


def test_expired_messages_do_not_count_towards_the_queue_limit(hub, device):
    for _ in range(50):
        hub.send_c2d(device.device_id, "x", expiry_time=time.time() - 1)
    hub.send_c2d(device.device_id, "x", message_id="fits")  # the 50 are dead-lettered, not pending
    for _ in range(49):
        hub.send_c2d(device.device_id, "x")
    with pytest.raises(HubOperationError) as err:
        hub.send_c2d(device.device_id, "x")
    assert err.value.error_code == 403004


def test_message_held_unacknowledged_past_its_expiry_is_dead_lettered(hub, device):
    # raw MQTT: the SDK always acknowledges at once
    c = mq.connect(hub, device)
    c.subscribe("devices/dev1/messages/devicebound/#")
    hub.send_c2d(device.device_id, "x", message_id="held", ttl=0.5, ack="full")
    delivered = c.expect(p.PUBLISH)
    assert "iothub-ack=full" in delivered.topic
    [record] = hub.wait_for_feedback("held", timeout=10)
    assert record.status_code == "Expired"
    c.send(p.Puback(delivered.packet_id))  # too late: nothing left to complete
    c.ping()
    assert statuses(hub.feedback()) == [("held", "Expired")]
    assert not [e for e in hub.events if e.kind == "c2d_completed"]


# --- iothub-ack feedback --------------------------------------------------------------------------

def test_sdk_completion_reports_success_to_positive_and_full(hub, device, sdk):
    inbox = Inbox()
    client = sdk()
    client.on_message_received = inbox
    before = time.time()
    hub.send_c2d(device.device_id, "a", message_id="quiet", ack="negative")   # completed: nothing to report
    hub.send_c2d(device.device_id, "b", message_id="pos", ack="positive")
    hub.send_c2d(device.device_id, "c", message_id="all", ack="full")
    records = hub.wait_for_feedback(count=2, timeout=10)
    assert statuses(records) == [("pos", "Success"), ("all", "Success")]
    assert [m.ack for m in inbox.wait(3)] == ["negative", "positive", "full"]  # the device sees iothub-ack
    completed = {e.detail["message_id"] for e in hub.events if e.kind == "c2d_completed"}
    assert completed == {"quiet", "pos", "all"} and hub.feedback(message_id="quiet") == []
    record = records[1]
    assert before <= record.enqueued_at <= time.time()  # stamped with the completion
    body = record.as_json()
    assert set(body) == {"originalMessageId", "enqueuedTimeUtc", "statusCode", "description", "deviceId"}
    assert body["originalMessageId"] == "all" and body["deviceId"] == "dev1"
    assert body["enqueuedTimeUtc"].endswith("Z") and "T" in body["enqueuedTimeUtc"]


def test_feedback_through_the_property_iothub_ack(hub, device, sdk):
    inbox = Inbox()
    client = sdk()
    client.on_message_received = inbox
    hub.send_c2d(device.device_id, "x", {"iothub-ack": "positive"}, message_id="prop")
    assert statuses(hub.wait_for_feedback("prop")) == [("prop", "Success")]


def test_qos0_delivery_completes_at_once(hub, device):
    c = mq.connect(hub, device)
    c.subscribe("devices/dev1/messages/devicebound/#", qos=0)
    hub.send_c2d(device.device_id, "x", message_id="q0", ack="positive")
    assert c.expect(p.PUBLISH).qos == 0
    assert statuses(hub.wait_for_feedback("q0")) == [("q0", "Success")]


def test_clean_session_purge_reports_purged(hub, device):
    c = mq.connect(hub, device)
    c.subscribe("devices/dev1/messages/devicebound/#")
    hub.send_c2d(device.device_id, "w", message_id="held", ack="full")
    c.expect(p.PUBLISH)  # delivered, never acknowledged
    c.close()
    hub.wait_for_event("disconnect", "dev1")
    hub.send_c2d(device.device_id, "x", message_id="queued", ack="negative")
    hub.send_c2d(device.device_id, "y", message_id="silent")  # ack none: no record
    c = mq.connect(hub, device, clean_session=True)
    assert c.connack.return_code == 0
    records = hub.wait_for_feedback(count=2)
    assert statuses(records) == [("held", "Purged"), ("queued", "Purged")]
    assert hub.feedback(message_id="silent") == []


def test_aio_client_completion_reports_success(hub, device):
    async def scenario():
        c = make_client(hub, device, aio=True)
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        c.on_message_received = lambda m: loop.call_soon_threadsafe(got.set)
        try:
            await asyncio.wait_for(c.connect(), 10)
            hub.send_c2d(device.device_id, "x", message_id="aio", ack="full")
            await asyncio.wait_for(got.wait(), 10)
            return await hub.wait_for_feedback_async("aio", timeout=10)
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    assert statuses(asyncio.run(scenario())) == [("aio", "Success")]


def test_wait_for_feedback_times_out_naming_what_arrived(hub, device):
    with pytest.raises(TimeoutError, match=r"1 C2D feedback records for message 'nope'; 0 arrived"):
        hub.wait_for_feedback("nope", timeout=0.2)


def test_backend_and_view_plumbing():
    backend = FakeBackend("backendhub", tier=None)
    try:
        backend.create_device("b1")
        mid = backend.send_c2d("b1", "x", expiry_time=time.time() - 1, ack="negative")
        backend.fakehub.wait_for_feedback(mid)
        assert statuses(backend.feedback()) == [(mid, "Expired")]
        assert backend.feedback(["other"]) == []
    finally:
        backend.close()


def test_real_backend_sends_expiry_and_ack_as_azure_iot_hub_expects_them():
    props = {}
    before = time.time()
    _c2d_terms(props, 60, None, "full")
    assert props["iothub-ack"] == "full"
    assert int((before + 60) * 1000) <= props["expiryTimeUtc"] <= (time.time() + 60) * 1000
    with pytest.raises(HubOperationError) as err:
        _c2d_terms({}, TWO_DAYS + 60, None, None)
    assert err.value.error_code == 403009
    with pytest.raises(RealBackendError, match="feedback"):
        ServiceCalls(None).feedback()


def test_control_api_c2d_ttl_and_feedback(hub, device):
    with ControlServer(hub) as api:
        def call(method, path, body=None):
            req = urllib.request.Request(api.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {api.token}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, out = call("POST", "/devices/dev1/c2d", {"body": "x", "message_id": "api", "ttl": 0, "ack": "full"})
        assert (status, out) == (200, {"message_id": "api"})
        hub.wait_for_feedback("api")
        status, out = call("GET", "/feedback?message_id=api")
        assert status == 200 and [(r["originalMessageId"], r["statusCode"]) for r in out] == [("api", "Expired")]
        status, out = call("POST", "/devices/dev1/c2d", {"body": "x", "ttl": TWO_DAYS + 1})
        assert status == 403 and out["error_code"] == 403009
        status, out = call("POST", "/devices/dev1/c2d", {"body": "x", "ttl": 1, "expiry_time": 1})
        assert status == 400 and "not both" in out["error"]


# --- SAS tokens signed with a shared access policy (skn=) -----------------------------------------

def test_default_policies_are_those_of_a_new_hub(hub):
    perms = {name: set(pol.permissions) for name, pol in hub.policies.items()}
    assert perms == {"iothubowner": {"RegistryRead", "RegistryWrite", "ServiceConnect", "DeviceConnect"},
                     "service": {"ServiceConnect"}, "device": {"DeviceConnect"},
                     "registryRead": {"RegistryRead"}, "registryReadWrite": {"RegistryRead", "RegistryWrite"}}
    assert hub.policy("device").primary_key not in repr(hub.policies)


def test_sdk_connects_with_a_device_policy_token(hub, device):
    policy = hub.policy("device")
    token = make_sas_token(f"{hub.hostname}/devices/dev1", policy.secondary_key, key_name="device")
    c = IoTHubDeviceClient.create_from_sastoken(token, gateway_hostname=hub.gateway_host,
                                                server_verification_cert=hub.ca_pem, **CLIENT_KWARGS)
    try:
        bounded(c.connect)
        bounded(c.send_message, Message("by policy", message_id="p1"))
        [t] = hub.wait_for_telemetry(1, "dev1")
        assert t.message_id == "p1"
    finally:
        bounded(c.shutdown)


@pytest.mark.parametrize("audience", ["{host}/devices/dev1", "{host}/devices", "{host}"])
def test_policies_with_device_connect_are_accepted(hub, device, audience):
    custom = hub.add_policy("gateway", ["DeviceConnect", "RegistryRead"])
    for name, key in (("device", hub.policy("device").primary_key), ("iothubowner", hub.policy("iothubowner").primary_key),
                      ("gateway", custom.primary_key)):
        token = make_sas_token(audience.format(host=hub.hostname), key, key_name=name)
        c = mq.connect(hub, device, password=token)
        assert c.connack.return_code == 0, name
        c.close()


@pytest.mark.parametrize("name", ["service", "registryRead", "registryReadWrite", "nosuchpolicy"])
def test_policy_without_device_connect_or_unknown_gets_connack_5(hub, device, name):
    key = hub.policies[name].primary_key if name in hub.policies else hub.policy("device").primary_key
    token = make_sas_token(f"{hub.hostname}/devices/dev1", key, key_name=name)
    c = mq.connect(hub, device, password=token)
    assert c.connack.return_code == p.CONNACK_NOT_AUTHORIZED
    c.expect_closed()
    reason = hub.wait_for_event("auth_failure", "dev1").detail["reason"]
    assert name in reason and ("DeviceConnect" in reason or "does not have" in reason)
    assert "sig=" not in reason and key not in reason


def test_policy_token_with_the_wrong_key_or_after_removal_gets_connack_5(hub, device):
    token = make_sas_token(f"{hub.hostname}/devices/dev1", device.primary_key, key_name="device")
    c = mq.connect(hub, device, password=token)
    assert c.connack.return_code == p.CONNACK_NOT_AUTHORIZED
    assert "shared access policy 'device'" in hub.wait_for_event("auth_failure", "dev1").detail["reason"]
    good = make_sas_token(f"{hub.hostname}/devices/dev1", hub.policy("device").primary_key, key_name="device")
    hub.remove_policy("device")
    assert mq.connect(hub, device, password=good).connack.return_code == p.CONNACK_NOT_AUTHORIZED
    with pytest.raises(KeyError, match="no shared access policy 'device'"):
        hub.policy("device")


def test_add_policy_checks_its_arguments(hub):
    with pytest.raises(ValueError, match="permission"):
        hub.add_policy("p", ["DeviceConect"])
    with pytest.raises(ValueError, match="primary_key is not valid base64"):
        hub.add_policy("p", primary_key="not base64!")
    own = hub.add_policy("p", "DeviceConnect", primary_key=hub.policy("device").primary_key)
    assert own.permissions == {"DeviceConnect"}


# --- the MQTT user name without ?api-version= -----------------------------------------------------

@pytest.mark.parametrize("suffix", ["/", "", "/?", "/?DeviceClientType=raw"])
def test_user_name_without_api_version_is_accepted(hub, device, suffix):
    c = mq.connect(hub, device, username=f"{hub.hostname}/dev1{suffix}")
    assert c.connack.return_code == 0
    assert hub.wait_for_event("connect", "dev1").detail["api_version"] is None
    c.publish("devices/dev1/messages/events/", "hi", packet_id=7)
    assert c.expect(p.PUBACK).packet_id == 7
    c.subscribe("$iothub/twin/res/#")
    c.publish("$iothub/twin/GET/?$rid=g", "", qos=0)
    assert c.expect(p.PUBLISH).topic.startswith("$iothub/twin/res/200/?$rid=g")
    # reported: without api-version, reported-property updates are answered 400
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=r", '{"a": 1}', qos=0)
    answer = c.expect(p.PUBLISH)
    assert answer.topic.startswith("$iothub/twin/res/400/?$rid=r")
    assert json.loads(answer.payload)["errorCode"] == 400001
    assert hub.get_twin("dev1")["reported"] == {"$version": 1}


def test_user_name_with_api_version_updates_the_twin(hub, device):
    c = mq.connect(hub, device)
    c.subscribe("$iothub/twin/res/#")
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=r", '{"a": 1}', qos=0)
    assert c.expect(p.PUBLISH).topic.startswith("$iothub/twin/res/204/")


# --- property bags --------------------------------------------------------------------------------

@pytest.mark.parametrize("bag", ["a=b c", "ts=00:11:22", "%24.mid=12:00", "a b=1", "a=%zz", "a=50%", "k=v\u00e9"])
def test_unencoded_characters_in_a_property_bag_close_the_connection(hub, device, bag):
    c = mq.connect(hub, device)
    c.publish(f"devices/dev1/messages/events/{bag}", "x")
    c.expect_closed()  # no PUBACK: the hub closed the connection
    ev = hub.wait_for_event("protocol_violation", "dev1")
    assert "property bag" in ev.detail["message"]
    assert hub.telemetry("dev1") == []


def test_encoded_property_bag_is_accepted(hub, device):
    c = mq.connect(hub, device)
    c.publish("devices/dev1/messages/events/%24.mid=12%3A00&a=b%20c&ts=00%3A11&x=(ok)!*~'", "x", packet_id=3)
    assert c.expect(p.PUBACK).packet_id == 3
    [t] = hub.telemetry("dev1")
    assert t.message_id == "12:00" and t.properties == {"a": "b c", "ts": "00:11", "x": "(ok)!*~'"}


def test_will_with_an_unencoded_property_bag_is_dropped(hub, device):
    will = p.Will("devices/dev1/messages/events/a=b c", b"bye", 1, False)
    c = mq.connect(hub, device, will=will)
    assert c.connack.return_code == 0
    assert "property bag" in hub.wait_for_event("will_rejected", "dev1").detail["reason"]


def test_sdk_encodes_awkward_property_names_and_values(hub, device, sdk):
    client = sdk()
    msg = Message("x", message_id="id:1 2/3")
    msg.custom_properties = {"a key": "a value", "time:stamp": "00:11:22", "slash/amp&eq=": "v/&=?#%", "ünï": "cödé"}
    bounded(client.send_message, msg)
    [t] = hub.wait_for_telemetry(1, "dev1")
    assert t.message_id == "id:1 2/3"
    assert t.properties == msg.custom_properties
    assert hub.is_connected("dev1")


def test_iothub_fixture_sends_with_ttl_and_reads_feedback(pytester, monkeypatch):
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    pytester.makepyfile("""
        import threading

        def test_feedback(iothub, iothub_device, device_client):
            got = threading.Event()
            device_client.on_message_received = lambda m: got.set()
            mid = iothub.send_c2d(iothub_device.device_id, "x", ttl=60, ack="positive")
            assert got.wait(10)
            assert iothub.wait_until(lambda: iothub.feedback(), 10)
            [record] = iothub.feedback()
            assert (record.message_id, record.status_code) == (mid, "Success")
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--iothub-tier", "none").assert_outcomes(passed=1)
