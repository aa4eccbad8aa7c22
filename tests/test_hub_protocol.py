"""The fake hub's device-facing MQTT behaviour, checked packet by packet with a raw client.

Section numbers refer to the project's notes on the real hub (iothub-mqtt.md). Every refusal
test also checks that nothing reached the telemetry ledger, because a message that is refused
on the wire but recorded anyway would make resilience tests pass for the wrong reason.
"""
import base64
import concurrent.futures
import hashlib
import hmac
import json
import random
import time
from urllib.parse import quote

import pytest

from mqttclient import MqttClient, close_all, connect, sas_token, username_for
from pytest_iotfailover.fakehub.hub import FakeHub
from pytest_iotfailover.iothub.auth import make_sas_token
from pytest_iotfailover.iothub.registry import new_key
from pytest_iotfailover.iothub.mqtt import Decoder, ProtocolError, packets as p

pytestmark = pytest.mark.timeout(15)

MAX_D2C = 256 * 1024


@pytest.fixture
def make_hub():
    """Start hubs with non-default settings; all are stopped (and checked for errors) afterwards."""
    hubs = []

    def make(**kwargs) -> FakeHub:
        hub = FakeHub(**kwargs).start()
        hubs.append(hub)
        return hub
    yield make
    close_all()
    for hub in hubs:
        hub.stop()


@pytest.fixture
def hub(make_hub):
    return make_hub()


@pytest.fixture
def dev(hub):
    return hub.add_device("dev1")


def events_of(hub, kind, device_id=None):
    return [e for e in hub.events if e.kind == kind and (device_id is None or e.device_id == device_id)]


def events_topic(device_id, bag=""):
    return f"devices/{device_id}/messages/events/{bag}"


def devicebound(device_id):
    return f"devices/{device_id}/messages/devicebound/#"


def connected(hub, device, **kwargs) -> MqttClient:
    client = connect(hub, device, **kwargs)
    assert client.connack.return_code == p.CONNACK_ACCEPTED, client.connack
    return client


def assert_violation_closes(hub, client, device_id, message_part):
    """The hub closed `client` for a protocol violation and recorded nothing."""
    client.expect_closed()
    ev = hub.wait_for_event("protocol_violation", device_id, timeout=5)
    assert message_part in ev.detail["message"]
    if device_id is not None:
        gone = hub.wait_for_event("disconnect", device_id, timeout=5)
        assert gone.reason == "protocol_violation"
        assert not hub.is_connected(device_id)
    assert hub.telemetry() == []


# ------------------------------------------------------------------------------ CONNECT / CONNACK

def _wrong_key(hub, dev):
    return dict(password=sas_token(hub, dev.device_id, key=new_key())), dev.device_id, "signature"


def _expired_token(hub, dev):
    # default grace is 300 s (§2.4), so 1000 s ago is well beyond it
    return dict(password=sas_token(hub, dev.device_id, expiry=time.time() - 1000)), dev.device_id, "expired"


def _unknown_device(hub, dev):
    token = make_sas_token(f"{hub.hostname}/devices/ghost", new_key())
    return dict(device="ghost", password=token), None, "not registered"


def _disabled_device(hub, dev):
    hub.set_device_enabled(dev.device_id, False)
    return {}, dev.device_id, "disabled"


def _other_hub_in_username(hub, dev):
    return (dict(username=f"otherhub.azure-devices.net/{dev.device_id}/?api-version=2021-04-12"),
            dev.device_id, "names hub")


def _client_id_not_username_device(hub, dev):
    other = hub.add_device("dev2")
    return (dict(client_id=other.device_id, password=sas_token(hub, other.device_id)),
            other.device_id, "does not match client id")


def _token_for_other_device(hub, dev):
    # dev1's audience is a character prefix of dev10's, but audiences match by whole segments
    other = hub.add_device("dev10")
    token = make_sas_token(f"{hub.hostname}/devices/{dev.device_id}", other.primary_key)
    return dict(device=other, password=token), other.device_id, "audience"


def _empty_password(hub, dev):
    return dict(password=b""), dev.device_id, "SharedAccessSignature"


@pytest.mark.parametrize("case", [
    _wrong_key, _expired_token, _unknown_device, _disabled_device, _other_hub_in_username,
    _client_id_not_username_device, _token_for_other_device, _empty_password,
], ids=lambda f: f.__name__.strip("_"))
def test_connect_refused_not_authorized(hub, dev, case):
    kwargs, event_device, reason_part = case(hub, dev)
    device = kwargs.pop("device", dev)
    client = connect(hub, device, **kwargs)
    assert client.connack == p.Connack(p.CONNACK_NOT_AUTHORIZED, False)
    client.expect_closed()
    ev = hub.wait_for_event("auth_failure", timeout=5)
    assert ev.device_id == event_device
    assert ev.detail["return_code"] == p.CONNACK_NOT_AUTHORIZED
    assert reason_part in ev.reason
    assert events_of(hub, "connect") == []
    assert hub.connected_devices() == []
    assert hub.telemetry() == []


def test_refused_connect_does_not_displace_existing_connection(hub, dev):
    # §1.6: the old socket is closed only once the new one has authenticated
    online = connected(hub, dev)
    intruder = connect(hub, dev, password=sas_token(hub, dev.device_id, key=new_key()))
    assert intruder.connack.return_code == p.CONNACK_NOT_AUTHORIZED
    intruder.expect_closed()
    online.ping()
    assert hub.connected_devices() == [dev.device_id]
    assert events_of(hub, "disconnect") == []


def test_connect_protocol_level_3_refused_unacceptable_protocol(hub, dev):
    client = connect(hub, dev, protocol_level=3)
    assert client.connack == p.Connack(p.CONNACK_BAD_PROTOCOL, False)
    client.expect_closed()
    # not a credential problem, so the hub logs it as a refusal rather than an auth failure
    ev = hub.wait_for_event("connect_refused", timeout=5)
    assert ev.detail["return_code"] == p.CONNACK_BAD_PROTOCOL
    assert "level 3" in ev.reason
    assert events_of(hub, "auth_failure") == []
    assert events_of(hub, "connect") == []
    assert hub.telemetry() == []


def _sdk_style_token(hub, dev):
    """Lower-case escapes (C SDK, .NET docs) and the docs' field order: signed over sr as sent."""
    se = str(int(time.time()) + 3600)
    sr = quote(f"{hub.hostname}/devices/{dev.device_id}", safe="").replace("%2F", "%2f")
    digest = hmac.new(base64.b64decode(dev.primary_key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sig={quote(base64.b64encode(digest).decode(), safe='')}&se={se}&sr={sr}"


@pytest.mark.parametrize("variant", ["secondary-key", "lowercase-escapes", "legacy-username",
                                     "node-username-with-model-id"])
def test_connect_accepts_sdk_credential_variants(hub, dev, variant):
    d = dev.device_id
    kwargs = {
        "secondary-key": dict(password=sas_token(hub, d, key=dev.secondary_key)),
        "lowercase-escapes": dict(password=_sdk_style_token(hub, dev)),
        # api-version 2016-11-14 SDKs sent no '?' (§1.2.1)
        "legacy-username": dict(username=f"{hub.hostname}/{d}/api-version=2016-11-14&DeviceClientType=c%2F1.0"),
        "node-username-with-model-id": dict(
            username=f"{hub.hostname}/{d}/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1"
                     "&DeviceClientType=azure-iot-device%2F1.24.0"),
    }[variant]
    client = connected(hub, dev, **kwargs)
    pid = client.publish(events_topic(d), b"x")
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    if variant == "node-username-with-model-id":
        assert t.system_properties["dt_dataschema"] == "dtmi:com:example:Thermostat;1"
    else:
        assert "dt_dataschema" not in t.system_properties


def test_token_expired_within_grace_is_accepted(hub, dev):
    client = connect(hub, dev, password=sas_token(hub, dev.device_id, expiry=time.time() - 100))
    assert client.connack == p.Connack(p.CONNACK_ACCEPTED, False)
    assert hub.wait_for_event("connect", dev.device_id, timeout=5)


def test_token_expired_beyond_configured_grace_is_refused(make_hub):
    hub = make_hub(token_grace=0)
    dev = hub.add_device("dev1")
    client = connect(hub, dev, password=sas_token(hub, dev.device_id, expiry=time.time() - 5))
    assert client.connack.return_code == p.CONNACK_NOT_AUTHORIZED
    client.expect_closed()
    assert "expired" in hub.wait_for_event("auth_failure", dev.device_id, timeout=5).reason
    assert hub.telemetry() == []


def test_no_connect_after_tls_closes_after_connect_timeout(make_hub):
    hub = make_hub(connect_timeout=0.5)
    client = MqttClient.open(hub)
    waited = client.expect_closed(timeout=3)
    assert 0.3 <= waited <= 2
    assert hub.wait_for_event("connect_timeout", timeout=5).detail["seconds"] == 0.5


def test_first_packet_not_connect_closes(hub, dev):
    client = MqttClient.open(hub)
    client.publish(events_topic(dev.device_id), b"too early", qos=1)
    assert_violation_closes(hub, client, None, "not CONNECT")
    assert events_of(hub, "connect") == []


def test_second_connect_closes(hub, dev):
    client = connected(hub, dev)
    client.send(p.Connect(dev.device_id, 60, False, username_for(hub, dev.device_id),
                          sas_token(hub, dev.device_id).encode()))
    assert_violation_closes(hub, client, dev.device_id, "CONNECT")


# ------------------------------------------------------------------------------ PUBLISH violations

@pytest.mark.parametrize("topic, payload, qos, message_part", [
    pytest.param(events_topic("dev1"), b"x", 2, "QoS 2", id="qos2"),
    pytest.param(events_topic("dev2"), b"x", 1, "unsupported topic", id="other-device"),
    pytest.param("devices/dev2/messages/events", b"x", 0, "unsupported topic", id="other-device-qos0"),
    pytest.param("plant/line1/temperature", b"x", 1, "unsupported topic", id="broker-topic"),
    pytest.param("devices/dev1/messages/eventsX", b"x", 1, "unsupported topic", id="events-prefix"),
    pytest.param("$iothub/unknown/?$rid=1", b"x", 1, "unsupported topic", id="iothub-unknown"),
    pytest.param(events_topic("dev1"), b"x" * (MAX_D2C + 1), 1, "256 KB", id="oversize-body"),
    # size counts property names and values too (§3.4): 262140 + len("ab") + len("cdef") > 262144
    pytest.param(events_topic("dev1", "ab=cdef"), b"x" * (MAX_D2C - 4), 1, "256 KB", id="oversize-with-props"),
    pytest.param(events_topic("dev1", "a=1/b=2"), b"x", 1, "'/'", id="slash-in-property-bag"),
])
def test_publish_violation_closes_without_recording(hub, dev, topic, payload, qos, message_part):
    hub.add_device("dev2")
    client = connected(hub, dev)
    client.publish(topic, payload, qos)
    assert_violation_closes(hub, client, dev.device_id, message_part)


def test_publish_at_size_limit_is_accepted(hub, dev):
    client = connected(hub, dev)
    pid = client.publish(events_topic(dev.device_id), b"x" * MAX_D2C)
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert len(t.body) == MAX_D2C


@pytest.mark.parametrize("topic", [
    "devices/dev1/messages/events",
    "devices/dev1/messages/events/",
    # Node SDK output events end the property bag with '/' (§3.1)
    "devices/dev1/messages/events/%24.on=out1&a=1/",
])
def test_telemetry_topic_variants_accepted(hub, dev, topic):
    client = connected(hub, dev)
    pid = client.publish(topic, b"ok")
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert t.body == b"ok"


# ------------------------------------------------------------------------------ SUBSCRIBE

@pytest.mark.parametrize("topic_filter", [
    "#",
    "devices/dev1/messages/#",
    "devices/dev1/messages/devicebound/+",
    "devices/dev2/messages/devicebound/#",
    "$iothub/twin/#",
    "$iothub/methods/POST/reboot/#",
])
def test_unsupported_subscribe_filter_closes(hub, dev, topic_filter):
    hub.add_device("dev2")
    client = connected(hub, dev)
    client.send(p.Subscribe(1, [(topic_filter, 1)]))
    assert_violation_closes(hub, client, dev.device_id, "unsupported topic filter")


def test_subscribe_grants_at_most_qos1_and_is_idempotent(hub, dev):
    client = connected(hub, dev)
    assert client.subscribe(devicebound(dev.device_id), qos=2).return_codes == [1]
    assert client.subscribe(devicebound(dev.device_id), qos=2).return_codes == [1]
    assert client.subscribe("$iothub/twin/res/#", qos=0).return_codes == [0]
    # IoT Hub allows 5 subscriptions (§7), but a device can only name the 4 filters below, so
    # the 6th-subscription SUBACK 0x80 path cannot be reached by a device: re-subscribing all of
    # them, duplicates included, must never be refused.
    all_filters = [devicebound(dev.device_id), "$iothub/twin/res/#",
                   "$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#"]
    assert client.subscribe(*all_filters).return_codes == [1, 1, 1, 1]
    assert client.subscribe(*all_filters, qos=0).return_codes == [0, 0, 0, 0]
    assert client.subscribe(*all_filters).return_codes == [1, 1, 1, 1]
    # a duplicate subscription must not duplicate deliveries
    mid = hub.send_c2d(dev.device_id, b"once")
    msg = client.expect(p.PUBLISH)
    assert f"%24.mid={mid}" in msg.topic and msg.payload == b"once"
    client.send(p.Puback(msg.packet_id))
    client.ping()
    assert hub.wait_for_event("c2d_completed", dev.device_id, timeout=5).detail["message_id"] == mid


def test_unsubscribe_acks_known_and_unknown_filters(hub, dev):
    client = connected(hub, dev)
    client.subscribe(devicebound(dev.device_id))
    client.send(p.Unsubscribe(7, [devicebound(dev.device_id), "never/subscribed"]))
    assert client.expect(p.UNSUBACK).packet_id == 7
    hub.send_c2d(dev.device_id, b"not for you")
    client.ping()


def test_c2d_delivered_at_granted_qos0(hub, dev):
    client = connected(hub, dev)
    assert client.subscribe(devicebound(dev.device_id), qos=0).return_codes == [0]
    hub.send_c2d(dev.device_id, b"fire and forget")
    msg = client.expect(p.PUBLISH)
    assert msg.payload == b"fire and forget"
    assert msg.qos == 0 and msg.packet_id is None


# ------------------------------------------------------------------------------ garbage

def _undecodable(seed: int) -> bytes:
    """Random bytes that the hub's decoder rejects before completing any packet.

    Checked byte by byte so the outcome does not depend on how TLS records split the stream:
    plain random bytes could also be a valid packet, or a packet announcing a length that never
    arrives, which would leave the hub waiting instead of closing. No size limit here, so the
    bytes are malformed MQTT, not merely an oversized announcement.
    """
    rng = random.Random(seed)
    while True:
        data = bytes(rng.getrandbits(8) for _ in range(64))
        decoder = Decoder()
        try:
            if any(decoder.feed(data[i:i + 1]) for i in range(len(data))):
                continue
        except ProtocolError:
            return data


@pytest.mark.parametrize("after_connect", [False, True], ids=["before-connect", "after-connect"])
def test_garbage_closes_only_that_connection(hub, dev, after_connect):
    good_dev = hub.add_device("good")
    good = connected(hub, good_dev)
    pid = good.publish(events_topic("good"), b"before")
    assert good.expect(p.PUBACK).packet_id == pid

    bad = connected(hub, dev) if after_connect else MqttClient.open(hub)
    bad.send_raw(_undecodable(seed=8883))
    bad.expect_closed()
    ev = hub.wait_for_event("protocol_violation", timeout=5)
    assert ev.device_id == (dev.device_id if after_connect else None)
    if after_connect:
        assert hub.wait_for_event("disconnect", dev.device_id, timeout=5).reason == "protocol_violation"

    pid = good.publish(events_topic("good"), b"after")
    assert good.expect(p.PUBACK).packet_id == pid
    assert [t.body for t in hub.wait_for_telemetry(2, timeout=5)] == [b"before", b"after"]
    assert hub.telemetry(dev.device_id) == []
    assert hub.connected_devices() == ["good"]


# ------------------------------------------------------------------------------ sessions

def test_persistent_session_keeps_subscription_and_queue(hub, dev):
    d = dev.device_id
    first = connected(hub, dev, clean_session=False)
    assert first.connack.session_present is False
    first.subscribe(devicebound(d))
    unacked = hub.send_c2d(d, b"while online")
    msg = first.expect(p.PUBLISH)
    assert msg.payload == b"while online" and msg.dup is False and msg.qos == 1
    first.disconnect()  # without acknowledging it
    first.expect_closed()
    assert hub.wait_for_event("disconnect", d, timeout=5).reason == "client"

    queued = hub.send_c2d(d, b"while offline")
    second = connected(hub, dev, clean_session=False)
    assert second.connack.session_present is True
    # no SUBSCRIBE on this connection: the session brings the subscription along (§1.3)
    redelivered = second.expect(p.PUBLISH)
    assert redelivered.payload == b"while online"
    assert redelivered.dup is True and redelivered.packet_id == msg.packet_id
    assert f"%24.mid={unacked}" in redelivered.topic
    fresh = second.expect(p.PUBLISH)
    assert fresh.payload == b"while offline" and fresh.dup is False
    assert f"%24.mid={queued}" in fresh.topic
    # SDKs take topic segment 4 as the property bag, so no raw '/' may appear in it (§4.1)
    assert len(fresh.topic.split("/")) == 5
    second.send(p.Puback(redelivered.packet_id))
    second.send(p.Puback(fresh.packet_id))
    second.ping()
    completed = {e.detail["message_id"]: e.detail["delivery_count"]
                 for e in events_of(hub, "c2d_completed", d)}
    assert completed == {unacked: 2, queued: 1}


def test_clean_session_starts_empty_and_purges_queue(hub, dev):
    d = dev.device_id
    first = connected(hub, dev, clean_session=False)
    first.subscribe(devicebound(d))
    first.disconnect()
    first.expect_closed()
    hub.wait_for_event("disconnect", d, timeout=5)
    hub.send_c2d(d, b"purged")

    clean = connected(hub, dev, clean_session=True)
    assert clean.connack.session_present is False
    clean.ping()  # the old subscription is gone, so nothing was pushed after CONNACK
    clean.subscribe(devicebound(d))
    clean.ping()  # and the queued message was purged, so subscribing delivers nothing either
    hub.send_c2d(d, b"new")
    assert clean.expect(p.PUBLISH).payload == b"new"
    left_at = time.time()
    clean.disconnect()
    clean.expect_closed()
    hub.wait_for_event("disconnect", d, timeout=5, after=left_at)

    # a clean session is not kept after it ends
    again = connected(hub, dev, clean_session=False)
    assert again.connack.session_present is False


def test_second_connection_replaces_first_and_takes_session(hub, dev):
    d = dev.device_id
    first = connected(hub, dev, clean_session=False)
    first.subscribe(devicebound(d))
    mid = hub.send_c2d(d, b"in flight")
    inflight = first.expect(p.PUBLISH)

    second = connected(hub, dev, clean_session=False)
    assert second.connack.session_present is True
    first.expect_closed()
    ev = hub.wait_for_event("disconnect", d, timeout=5)
    assert ev.reason == "replaced"
    assert ev.detail["peer"] == events_of(hub, "connect", d)[0].detail["peer"]
    assert hub.connected_devices() == [d]

    redelivered = second.expect(p.PUBLISH)
    assert redelivered.dup is True and redelivered.packet_id == inflight.packet_id
    assert f"%24.mid={mid}" in redelivered.topic
    second.send(p.Puback(redelivered.packet_id))
    hub.send_c2d(d, b"after takeover")
    assert second.expect(p.PUBLISH).payload == b"after takeover"
    pid = second.publish(events_topic(d), b"still works")
    assert second.expect(p.PUBACK).packet_id == pid


def test_replaced_connection_publishes_its_will(hub, dev):
    d = dev.device_id
    first = connected(hub, dev, will=p.Will(events_topic(d), b"displaced", 1))
    second = connected(hub, dev)
    first.expect_closed()
    assert hub.wait_for_event("disconnect", d, timeout=5).reason == "replaced"
    [will] = hub.wait_for_telemetry(1, timeout=5)
    assert will.body == b"displaced" and will.properties["iothub-MessageType"] == "Will"
    second.ping()


def test_disabling_connected_device_closes_it(hub, dev):
    client = connected(hub, dev)
    hub.set_device_enabled(dev.device_id, False)
    client.expect_closed()
    assert hub.wait_for_event("disconnect", dev.device_id, timeout=5).reason == "device_disabled"
    assert connect(hub, dev).connack.return_code == p.CONNACK_NOT_AUTHORIZED


# ------------------------------------------------------------------------------ keep-alive, expiry

def test_keepalive_silence_closes_after_one_and_a_half_periods(hub, dev):
    will = p.Will(events_topic(dev.device_id), b"silent", 1)
    client = connected(hub, dev, keep_alive=1, will=will)
    waited = client.expect_closed(timeout=3.0)
    assert 1.2 <= waited <= 2.5, f"closed after {waited:.2f} s, expected about 1.5 s"
    ev = hub.wait_for_event("disconnect", dev.device_id, timeout=5)
    assert ev.reason == "keepalive"
    assert ev.detail["idle"] >= 1.5
    # a keep-alive timeout is a close without DISCONNECT, so the will goes out
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert t.body == b"silent" and t.properties["iothub-MessageType"] == "Will"


def test_pingreq_gets_pingresp_and_keeps_connection_alive(hub, dev):
    client = connected(hub, dev, keep_alive=1)
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # longer than the 1.5 s hub timeout
        client.ping()
        with pytest.raises(TimeoutError):  # idle gap: the hub neither sends nor closes
            client.recv(timeout=0.5)
    client.ping()
    assert events_of(hub, "disconnect") == []
    assert hub.is_connected(dev.device_id)


def test_token_expiry_while_connected_closes(make_hub):
    hub = make_hub(token_grace=0)
    dev = hub.add_device("dev1")
    # se is whole seconds; +2 keeps it at least a second ahead so CONNECT itself is accepted
    expiry = int(time.time()) + 2
    client = connected(hub, dev, password=sas_token(hub, dev.device_id, expiry=expiry))
    client.expect_closed(timeout=4.0)
    ev = hub.wait_for_event("disconnect", dev.device_id, timeout=5)
    assert ev.reason == "token_expired"
    assert ev.detail["expiry"] == expiry
    assert ev.at >= expiry - 0.05, "closed before the token expired"
    # the device reconnecting with the same token is refused
    again = connect(hub, dev, password=sas_token(hub, dev.device_id, expiry=expiry))
    assert again.connack.return_code == p.CONNACK_NOT_AUTHORIZED


# ------------------------------------------------------------------------------ telemetry

def test_qos0_telemetry_recorded_without_puback(hub, dev):
    client = connected(hub, dev)
    client.publish(events_topic(dev.device_id), b"fire", qos=0)
    client.ping()  # PINGRESP must be the next packet: no PUBACK for QoS 0
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert (t.body, t.qos, t.dup, t.duplicate) == (b"fire", 0, False, False)


def test_qos1_telemetry_puback_and_dup_flag(hub, dev):
    client = connected(hub, dev)
    pid = client.publish(events_topic(dev.device_id), b"first")
    assert client.expect(p.PUBACK).packet_id == pid
    pid = client.publish(events_topic(dev.device_id), b"resent", packet_id=pid, dup=True)
    assert client.expect(p.PUBACK).packet_id == pid
    first, resent = hub.wait_for_telemetry(2, timeout=5)
    assert (first.qos, first.dup) == (1, False)
    assert (resent.qos, resent.dup) == (1, True)


def test_same_message_id_twice_marked_duplicate(hub, dev):
    client = connected(hub, dev)
    for bag in ("%24.mid=m-1", "%24.mid=m-1", "%24.mid=m-2"):
        pid = client.publish(events_topic(dev.device_id, bag), b"x")
        assert client.expect(p.PUBACK).packet_id == pid
    items = hub.wait_for_telemetry(3, timeout=5)
    assert [(t.message_id, t.duplicate) for t in items] == [("m-1", False), ("m-1", True), ("m-2", False)]


def test_property_bag_decoded(hub, dev):
    client = connected(hub, dev)
    # the wire form the Python SDK produces (§3.2): system properties first, then custom ones
    bag = ("%24.mid=id%201%2F2&%24.cid=corr-7&%24.uid=operator&%24.ct=application%2Fjson"
           "&%24.ce=utf-8&%24.exp=2030-01-01T00%3A00%3A00%2B00%3A00"
           "&b=v%26%3D1&my%20key=a%2Bb&empty=")
    pid = client.publish(events_topic(dev.device_id, bag), b'{"t": 21.5}')
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert t.message_id == "id 1/2"
    sp = t.system_properties
    assert sp["message_id"] == "id 1/2"
    assert sp["correlation_id"] == "corr-7"
    assert sp["user_id"] == "operator"
    assert sp["content_type"] == "application/json"
    assert sp["content_encoding"] == "utf-8"
    assert sp["expiry_time_utc"] == "2030-01-01T00:00:00+00:00"
    # the hub's own stamps, which a device cannot spoof (§3.3)
    assert sp["connection_device_id"] == dev.device_id
    assert json.loads(sp["connection_auth_method"])["type"] == "sas"
    # percent-decoding only: IoT Hub's bag is not form-encoded, so '+' never means a space (§3.2)
    assert t.properties == {"b": "v&=1", "my key": "a+b", "empty": ""}
    assert not any(k.startswith(("$", "%24")) for k in t.properties)


def test_unencoded_dollar_system_property_keys_accepted(hub, dev):
    client = connected(hub, dev)
    pid = client.publish(events_topic(dev.device_id, "$.mid=abc&$.ct=text%2Fplain"), b"x")
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert t.message_id == "abc" and t.system_properties["content_type"] == "text/plain"
    assert t.properties == {}


def test_retain_flag_becomes_property(hub, dev):
    client = connected(hub, dev)
    pid = client.publish(events_topic(dev.device_id, "a=1"), b"kept?", retain=True)
    assert client.expect(p.PUBACK).packet_id == pid
    [t] = hub.wait_for_telemetry(1, timeout=5)
    assert t.properties == {"a": "1", "mqtt-retain": "true"}


# ------------------------------------------------------------------------------ will

@pytest.mark.parametrize("how", ["fin", "reset"])
def test_will_published_on_abrupt_close(hub, dev, how):
    d = dev.device_id
    client = connected(hub, dev, will=p.Will(events_topic(d, "cause=power%20loss"), b"gone", 1))
    if how == "fin":
        client.close()
    else:
        client.reset()
    [will] = hub.wait_for_telemetry(1, timeout=5)
    assert will.device_id == d and will.body == b"gone"
    assert will.properties == {"cause": "power loss", "iothub-MessageType": "Will"}
    assert hub.wait_for_event("disconnect", d, timeout=5).reason == "connection_lost"


def test_no_will_after_graceful_disconnect(hub, dev):
    d = dev.device_id
    client = connected(hub, dev, will=p.Will(events_topic(d), b"gone", 1))
    client.disconnect()
    client.expect_closed()
    assert hub.wait_for_event("disconnect", d, timeout=5).reason == "client"
    hub.connected_devices()  # a round trip through the hub thread: the disconnect is fully handled
    assert hub.telemetry() == []


# ------------------------------------------------------------------------------ direct methods

def test_method_times_out_with_504_when_device_never_answers(hub, dev):
    client = connected(hub, dev)
    client.subscribe("$iothub/methods/POST/#")
    started = time.monotonic()
    result = hub.invoke_method(dev.device_id, "reboot", {"delay": 1}, timeout=0.5)
    assert time.monotonic() - started >= 0.45
    assert result.status == 504
    assert result.payload["errorCode"] == 504101
    request = client.expect(p.PUBLISH)
    assert request.topic.startswith("$iothub/methods/POST/reboot/?$rid=")
    assert json.loads(request.payload) == {"delay": 1}
    # a late answer is dropped without hurting the connection
    rid = request.topic.partition("$rid=")[2]
    pid = client.publish(f"$iothub/methods/res/200/?$rid={rid}", b"{}")
    assert client.expect(p.PUBACK).packet_id == pid
    client.ping()


def test_method_subscription_survives_reconnect(hub, dev):
    # the Python SDK never re-subscribes after a reconnect (§1.3): methods keep working only
    # because the clean_session=0 session carries the subscription
    first = connected(hub, dev, clean_session=False)
    first.subscribe("$iothub/methods/POST/#")
    first.close()
    hub.wait_for_event("disconnect", dev.device_id, timeout=5)
    assert hub.invoke_method(dev.device_id, "reboot", timeout=5).status == 404
    again = connected(hub, dev, clean_session=False)
    assert again.connack.session_present is True
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(hub.invoke_method, dev.device_id, "reboot", {"now": True}, 5.0)
        request = again.expect(p.PUBLISH)
        assert request.topic.startswith("$iothub/methods/POST/reboot/?$rid=")
        again.publish(f"$iothub/methods/res/200/?$rid={request.topic.partition('$rid=')[2]}", b"null", qos=0)
        result = call.result(timeout=5)
    assert (result.status, result.payload) == (200, None)


def test_method_round_trip(hub, dev):
    client = connected(hub, dev)
    client.subscribe("$iothub/methods/POST/#")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(hub.invoke_method, dev.device_id, "getTemp", None, 5.0)
        request = client.expect(p.PUBLISH)
        rid = request.topic.partition("$rid=")[2]
        pid = client.publish(f"$iothub/methods/res/201/?$rid={rid}", b'{"t": 21}')
        assert client.expect(p.PUBACK).packet_id == pid
        result = call.result(timeout=5)
    assert (result.status, result.payload) == (201, {"t": 21})


@pytest.mark.parametrize("state", ["connected-unsubscribed", "subscribed-elsewhere", "offline"])
def test_method_404_when_not_subscribed(hub, dev, state):
    if state != "offline":
        client = connected(hub, dev)
        if state == "subscribed-elsewhere":
            client.subscribe(devicebound(dev.device_id), "$iothub/twin/res/#")
    started = time.monotonic()
    result = hub.invoke_method(dev.device_id, "reboot", timeout=5)
    assert time.monotonic() - started < 2, "404 must be immediate, not after the timeout"
    assert result.status == 404
    assert result.payload["errorCode"] == 404103
    if state != "offline":
        client.ping()  # and no request was published to the device
