"""The real-hub backend against local stand-ins for Azure.

* The registry, twin and direct-method calls go through the real azure-iot-hub client (msrest +
  requests) to a local HTTPS stub whose certificate chains to a test CA.
* The built-in endpoint lookup goes through azure-eventhub's own AMQP client to a local AMQP stub
  that answers like IoT Hub: SASL PLAIN, then a link redirect.
* Fault injection goes through a real azure-iot-device client to the embedded FakeHub, which
  honours the service's fault-injection message properties.
* Reading the built-in endpoint (AMQP with partitions, checkpoints, load balancing) has no stub:
  those tests hand the backend a consumer that calls it back with real `EventData` objects, built
  from AMQP bytes as the service sends them.
"""
import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import queue
import re
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

pytest.importorskip("azure.iot.hub", reason="the real-hub backend needs azure-iot-hub (and six)")
pytest.importorskip("azure.eventhub", reason="the real-hub backend needs azure-eventhub")

from azure.eventhub import EventData, PartitionContext
from azure.eventhub._pyamqp import _decode, _encode
from azure.eventhub._pyamqp import performatives as amqp
from azure.eventhub._pyamqp.error import AMQPError
from azure.eventhub._pyamqp.message import Message as AmqpMessage
from azure.eventhub._pyamqp.message import Properties
from azure.eventhub._pyamqp.types import TYPE, VALUE, AMQPTypes
from azure.iot.device import IoTHubDeviceClient

from pytest_iotfailover import FakeHub
from pytest_iotfailover.backends import FaultNotSupported, HubView
from pytest_iotfailover.backends.real import faults as real_faults
from pytest_iotfailover.backends.real.backend import (
    RealBackend,
    RealBackendError,
    derive_eventhub_connection_string,
    telemetry_from_event,
)
from pytest_iotfailover.fakehub.hub import HubOperationError, MethodResponse
from pytest_iotfailover.iothub.auth import parse_sas_token
from pytest_iotfailover.model import SPECS, FaultKind, FaultState, spec_for
from pytest_iotfailover.plugin.factory import run_bounded

pytestmark = pytest.mark.timeout(20)

SERVICE_KEY = base64.b64encode(b"service-policy-key-for-tests-0123").decode()
EH_KEY = base64.b64encode(b"eventhub-policy-key-for-tests-456").decode()
EH_CS = (f"Endpoint=sb://ihsuprodtest.servicebus.windows.net/;SharedAccessKeyName=iothubowner;"
         f"SharedAccessKey={EH_KEY};EntityPath=iothub-ehub-testhub-1-abc")
NOW = 1_750_000_000.0  # a fixed "now" for device ids and the sweep


def assert_clean(text: str, *extra: str) -> None:
    """No key, SAS signature or token in `text`."""
    for secret in (SERVICE_KEY, EH_KEY) + extra:
        assert secret not in text
    assert not re.search(r"sig=[A-Za-z0-9%+/]{3}", text)
    assert not re.search(r"SharedAccessKey=[A-Za-z0-9+/]{8}", text)


def check_service_sas(header: str, audience: str, key: str = SERVICE_KEY, policy: str = "iothubowner") -> None:
    token = parse_sas_token(header)
    assert token.audience == audience and token.key_name == policy and token.expiry > time.time()
    expected = base64.b64encode(hmac.new(base64.b64decode(key), f"{token.sr_raw}\n{token.expiry}".encode(),
                                         hashlib.sha256).digest()).decode()
    assert hmac.compare_digest(expected, token.signature)


def server_context(ca) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


# --- an HTTPS stand-in for the IoT Hub service REST API ------------------------------------------

class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


class RegistryStub:
    """Devices, twins and direct methods as IoT Hub's REST API (api-version 2021-04-12) answers them."""

    def __init__(self, ca):
        self.requests: list[Request] = []
        self.devices: dict[str, dict] = {}
        self.twins: dict[str, dict] = {}
        self.methods: dict[str, tuple] = {}
        self.overrides: dict[tuple, tuple] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                req = Request(self.command, unquote(url.path), parse_qs(url.query), dict(self.headers),
                              json.loads(raw) if raw else None)
                stub.requests.append(req)
                status, payload = stub.route(req)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_DELETE = do_PATCH = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = server_context(ca).wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.hostname = f"localhost:{self.port}"
        self.connection_string = (f"HostName={self.hostname};SharedAccessKeyName=iothubowner;"
                                  f"SharedAccessKey={SERVICE_KEY}")
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def route(self, req: Request):
        for (method, prefix), answer in self.overrides.items():
            if req.method == method and req.path.startswith(prefix):
                return answer
        parts = req.path.strip("/").split("/")
        if parts[0] == "devices" and len(parts) == 1 and req.method == "GET":
            return 200, [dict(d) for d in self.devices.values()]
        if parts[0] == "devices" and len(parts) == 2:
            device_id = parts[1]
            if req.method == "PUT":
                self.devices[device_id] = dict(req.body, etag="AAAAAAAAAAE=", generationId="6380")
                self.twins[device_id] = {"desired": {}, "reported": {}, "dv": 1, "rv": 1}
                return 200, self.devices[device_id]
            if req.method == "DELETE":
                if self.devices.pop(device_id, None) is None:
                    return 404, {"Message": "ErrorCode:DeviceNotFound;Device not found",
                                 "ExceptionMessage": "Tracking ID:0-G:0"}
                return 204, None
        if parts[0] == "twins" and len(parts) == 2:
            twin = self.twins.get(parts[1])
            if twin is None:
                return 404, {"Message": json.dumps({"errorCode": 404001, "message": "device not found"})}
            if req.method == "PATCH":
                twin["desired"].update(req.body["properties"]["desired"])
                twin["dv"] += 1
            return 200, self.twin_document(parts[1], twin)
        if parts[0] == "twins" and parts[2:] == ["methods"] and req.method == "POST":
            return self.methods.get(req.body["methodName"], (404, {"errorCode": 404103,
                                                                  "message": "Timed out waiting for device"}))
        return 400, {"Message": f"stub has no route for {req.method} {req.path}"}

    @staticmethod
    def twin_document(device_id, twin):
        meta = {"$lastUpdated": "2025-01-01T00:00:00Z"}
        return {"deviceId": device_id, "etag": "AAAAAAAAAAI=", "version": 3, "status": "enabled",
                "properties": {
                    "desired": dict(twin["desired"], **{"$metadata": dict(meta), "$version": twin["dv"]}),
                    "reported": dict(twin["reported"], **{"$metadata": dict(meta), "$version": twin["rv"]})}}

    def of(self, method: str, prefix: str = "/") -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry_stub(ca):
    stub = RegistryStub(ca)
    yield stub
    stub.close()


# --- the built-in endpoint, through the consumer seam ----------------------------------------------

class FakeConsumer:
    """Stands in for EventHubConsumerClient: `receive()` blocks and calls back like the real one."""

    def __init__(self, connection_string, partitions=("0", "1")):
        self.connection_string = connection_string
        self.partitions = partitions
        self.kwargs: dict[str, Any] = {}
        self.receiving = threading.Event()
        self.closed = threading.Event()
        self.inbox: queue.Queue = queue.Queue()

    def receive(self, **kwargs):
        self.kwargs = kwargs
        for pid in self.partitions:
            kwargs["on_partition_initialize"](self.context(pid))
        self.receiving.set()
        while not self.closed.is_set():
            try:
                pid, item = self.inbox.get(timeout=0.02)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                kwargs["on_error"](self.context(pid), item)
            else:
                kwargs["on_event"](self.context(pid), item)

    @staticmethod
    def context(pid):
        return PartitionContext("ihsuprodtest.servicebus.windows.net", "iothub-ehub-testhub-1-abc", "$Default", pid)

    def deliver(self, event, pid="0"):
        self.inbox.put((pid, event))

    def close(self):
        self.closed.set()


class Consumers(list):
    def __call__(self, connection_string):
        consumer = FakeConsumer(connection_string)
        self.append(consumer)
        return consumer


def _timestamp(ms: int):
    return {TYPE: AMQPTypes.timestamp, VALUE: ms}


_sequence = iter(range(1, 10**6))


def iot_event(device_id: str | None, body: bytes = b'{"n":1}', message_id: str | None = "m1",
              properties=None, hub_ms: int = int(NOW * 1000), eventhub_ms: int | None = None) -> EventData:
    """An event as IoT Hub writes it to the built-in endpoint, through the AMQP encoder and decoder."""
    annotations = {b"iothub-message-source": b"Telemetry", b"iothub-enqueuedtime": _timestamp(hub_ms),
                   b"x-opt-enqueued-time": _timestamp(eventhub_ms or hub_ms + 20),
                   b"x-opt-sequence-number": next(_sequence), b"x-opt-offset": b"4294967296"}
    if device_id is not None:
        annotations.update({b"iothub-connection-device-id": device_id.encode(),
                            b"iothub-connection-auth-method": b'{"scope":"device","type":"sas","issuer":"iothub"}',
                            b"iothub-connection-auth-generation-id": b"638000000000000000"})
    message = AmqpMessage(
        data=[body],
        properties=Properties(message_id=message_id.encode() if message_id else None, correlation_id=b"corr-7",
                              content_type=b"application/json", content_encoding=b"utf-8"),
        application_properties={k.encode(): v.encode() for k, v in (properties or {"temp": "21"}).items()},
        message_annotations=annotations)
    wire = bytearray()
    _encode.encode_payload(wire, message)
    return EventData._from_message(_decode.decode_payload(memoryview(wire)))


def make_backend(registry_stub, ca_file, consumers=None, **kwargs):
    kwargs.setdefault("sweep", False)
    kwargs.setdefault("run_prefix", "20250615000000beef")
    return RealBackend(registry_stub.connection_string, eventhub_connection_string=EH_CS, ca_bundle=ca_file,
                       eventhub_consumer_factory=consumers if consumers is not None else Consumers(), **kwargs)


@pytest.fixture
def consumers():
    return Consumers()


@pytest.fixture
def backend(registry_stub, ca_file, consumers):
    # created a minute before the events the tests make up
    b = make_backend(registry_stub, ca_file, consumers, clock=lambda: NOW - 60)
    yield b
    b.close()


# --- registry over HTTPS ----------------------------------------------------------------------

def test_devices_are_created_and_deleted_through_the_registry(backend, registry_stub):
    dev = backend.create_device("roundtrip-1")
    assert dev.device_id == "iotfo-20250615000000beef-roundtrip-1"
    assert dev.connection_string == (f"HostName={registry_stub.hostname};DeviceId={dev.device_id};"
                                     f"SharedAccessKey={dev.primary_key}")
    [put] = registry_stub.of("PUT", "/devices/")
    assert put.path == f"/devices/{dev.device_id}" and put.query["api-version"] == ["2021-04-12"]
    assert put.body["deviceId"] == dev.device_id and put.body["status"] == "enabled"
    assert put.body["authentication"] == {"type": "sas", "symmetricKey": {
        "primaryKey": dev.primary_key, "secondaryKey": dev.secondary_key}}
    check_service_sas(put.headers["Authorization"], registry_stub.hostname)

    backend.delete_device("roundtrip-1")       # the name the test gave works as well
    backend.delete_device(dev.device_id)       # already gone: fine
    assert [r.path for r in registry_stub.of("DELETE")] == [f"/devices/{dev.device_id}"] * 2
    assert registry_stub.devices == {}


def test_requests_ca_bundle_is_honoured_too(registry_stub, ca_file, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    b = RealBackend(registry_stub.connection_string, eventhub_connection_string=EH_CS, sweep=False,
                    eventhub_consumer_factory=Consumers())
    try:
        assert b.create_device("env-ca").device_id in registry_stub.devices
    finally:
        b.close()


def test_hubview_removes_what_it_created(backend, registry_stub):
    view = HubView(backend, "test_view[1]")
    dev = view.add_device()
    assert dev.device_id.startswith("iotfo-20250615000000beef-test-view-1-")
    view.close()
    assert registry_stub.devices == {} and len(registry_stub.of("DELETE")) == 1


def test_sweep_deletes_only_old_plugin_devices(registry_stub, ca_file):
    def stamp(age):
        return time.strftime("%Y%m%d%H%M%S", time.gmtime(NOW - age))
    for device_id in (f"iotfo-{stamp(7200)}0a0b-old", f"iotfo-{stamp(4000)}ffff-older-than-an-hour",
                      f"iotfo-{stamp(600)}0a0b-recent", f"iotfo-{stamp(7200)}-no-random-part",
                      f"other-{stamp(7200)}0a0b-old", "iotfo-manual", f"IOTFO-{stamp(7200)}0a0b-old"):
        registry_stub.devices[device_id] = {"deviceId": device_id, "status": "enabled"}
    b = make_backend(registry_stub, ca_file, sweep=True, clock=lambda: NOW, run_prefix=None)
    try:
        assert [r.query.get("top") for r in registry_stub.of("GET", "/devices")] == [["1000"]]
        assert sorted(r.path for r in registry_stub.of("DELETE")) == sorted([
            f"/devices/iotfo-{stamp(4000)}ffff-older-than-an-hour", f"/devices/iotfo-{stamp(7200)}0a0b-old"])
        assert b.run_prefix.startswith(time.strftime("%Y%m%d%H%M%S", time.gmtime(NOW))) and len(b.run_prefix) == 18
    finally:
        b.close()


def test_sweep_failures_are_warnings(registry_stub, ca_file):
    registry_stub.overrides[("GET", "/devices")] = (403, {"Message": "ErrorCode:IotHubUnauthorizedAccess;no"})
    with pytest.warns(RuntimeWarning, match="could not list devices"):
        make_backend(registry_stub, ca_file, sweep=True).close()
    del registry_stub.overrides[("GET", "/devices")]
    registry_stub.devices["iotfo-20000101000000abcd-x"] = {"deviceId": "iotfo-20000101000000abcd-x"}
    registry_stub.overrides[("DELETE", "/devices/")] = (403, {"Message": "ErrorCode:IotHubUnauthorizedAccess;no"})
    with pytest.warns(RuntimeWarning, match="could not delete leftover device 'iotfo-20000101000000abcd-x'") as rec:
        make_backend(registry_stub, ca_file, sweep=True).close()
    assert_clean(str(rec[0].message))


def test_twin_read_and_desired_update(backend, registry_stub):
    dev = backend.create_device("twin")
    registry_stub.twins[dev.device_id]["reported"] = {"fw": "1.2", "nested": {"a": 1}}
    assert backend.get_twin("twin") == {"desired": {"$version": 1},
                                        "reported": {"fw": "1.2", "nested": {"a": 1}, "$version": 1}}
    assert backend.update_desired(dev.device_id, {"rate": 5, "mode": None}) == 2
    [patch] = registry_stub.of("PATCH", "/twins/")
    assert patch.path == f"/twins/{dev.device_id}"
    assert patch.body == {"properties": {"desired": {"rate": 5, "mode": None}}}
    assert patch.headers["If-Match"] == '"*"'   # azure-iot-hub quotes every etag, "*" included
    check_service_sas(patch.headers["Authorization"], registry_stub.hostname)
    with pytest.raises(HubOperationError) as err:
        backend.get_twin("not-created")
    assert err.value.error_code == 404001


def test_direct_method_outcomes(backend, registry_stub):
    dev = backend.create_device("methods")
    registry_stub.methods["reboot"] = (200, {"status": 201, "payload": {"ok": True}})
    registry_stub.methods["slow"] = (504, {"errorCode": 504101, "message": "Timed out waiting for the response"})
    registry_stub.methods["gone"] = (404, {"errorCode": 404001, "message": "Device not found"})

    assert backend.invoke_method("methods", "reboot", {"delay": 1}, timeout=1) == MethodResponse(201, {"ok": True})
    [call] = registry_stub.of("POST")
    assert call.path == f"/twins/{dev.device_id}/methods"
    assert call.body == {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 5,
                         "connectTimeoutInSeconds": 0}
    check_service_sas(call.headers["Authorization"], registry_stub.hostname)

    offline = backend.invoke_method(dev.device_id, "unknown-to-stub")
    assert offline.status == 404 and offline.payload["errorCode"] == 404103
    late = backend.invoke_method(dev.device_id, "slow", timeout=7.5)
    assert late == MethodResponse(504, {"errorCode": 504101, "message": "Timed out waiting for the response"})
    assert registry_stub.of("POST")[-1].body["responseTimeoutInSeconds"] == 8
    assert len(registry_stub.of("POST")) == 3, "a 504 is an answer, not something to retry"
    with pytest.raises(HubOperationError) as err:
        backend.invoke_method(dev.device_id, "gone")
    assert err.value.error_code == 404001
    with pytest.raises(ValueError):
        backend.invoke_method(dev.device_id, "reboot", timeout=301)


def test_registry_errors_carry_the_hub_error_and_no_secret(backend, registry_stub):
    registry_stub.overrides[("PUT", "/devices/")] = (
        409, {"Message": json.dumps({"errorCode": 409001, "message": "DeviceAlreadyExists"}),
              "ExceptionMessage": f"echo {SERVICE_KEY}"})
    with pytest.raises(HubOperationError) as err:
        backend.create_device("dupe")
    assert err.value.error_code == 409001 and "HTTP 409" in str(err.value)
    assert_clean(str(err.value))


def test_c2d_goes_to_the_registry_manager():
    """Seam, not stub: azure-iot-hub sends C2D over AMQP with uamqp, whose client it builds with no way
    to trust a test CA or pick a port, so only this call gets an injected registry object."""
    sent = []

    class C2DRegistry:
        def send_c2d_message(self, device_id, message, properties):
            sent.append((device_id, message, dict(properties)))

    b = RealBackend(f"HostName=testhub.azure-devices.net;SharedAccessKeyName=service;SharedAccessKey={SERVICE_KEY}",
                    eventhub_connection_string=EH_CS, registry=C2DRegistry(), sweep=False,
                    eventhub_consumer_factory=Consumers(), run_prefix="20250615000000beef")
    try:
        mid = b.send_c2d("iotfo-20250615000000beef-c2d", "hello", {"contentType": "text/plain", "n": 3})
        mine = b.send_c2d("iotfo-20250615000000beef-c2d", b"\x00\x01", {"messageId": "chosen"})
        assert sent == [("iotfo-20250615000000beef-c2d", b"hello", {"contentType": "text/plain", "n": "3",
                                                                    "messageId": mid}),
                        ("iotfo-20250615000000beef-c2d", b"\x00\x01", {"messageId": "chosen"})]
        assert mid.startswith("c2d-") and mine == "chosen"
        with pytest.raises(HubOperationError):
            b.send_c2d("c2d", b"x" * (64 * 1024 + 1))
    finally:
        b.close()


# --- the ledger, through the consumer seam ----------------------------------------------------------

def test_ledger_reader_starts_at_backend_creation(registry_stub, ca_file):
    consumers = Consumers()
    b = make_backend(registry_stub, ca_file, consumers, clock=lambda: NOW)
    try:
        [consumer] = consumers
        assert consumer.receiving.wait(5) and consumer.connection_string == EH_CS
        start = consumer.kwargs["starting_position"]
        assert start.tzinfo is not None and abs(start.timestamp() - NOW) <= 5
        assert consumer.kwargs["starting_position_inclusive"] is True
    finally:
        b.close()
    assert consumer.closed.is_set()


def test_events_become_telemetry_like_the_fake_hubs():
    t = telemetry_from_event(iot_event("dev-a", b'{"t":21}', "msg-9", {"temp": "21", "unit": "C"}), "3")
    assert (t.device_id, t.message_id, t.body) == ("dev-a", "msg-9", b'{"t":21}')
    assert t.properties == {"temp": "21", "unit": "C"}
    assert t.enqueued_at == pytest.approx(NOW) and t.dup is False and t.duplicate is False
    sp = t.system_properties
    assert sp["message_id"] == "msg-9" and sp["correlation_id"] == "corr-7"
    assert sp["content_type"] == "application/json" and sp["content_encoding"] == "utf-8"
    assert sp["connection_device_id"] == "dev-a" and sp["message_source"] == "Telemetry"
    assert json.loads(sp["connection_auth_method"])["type"] == "sas"
    assert sp["enqueued_time_utc"] == datetime.datetime.fromtimestamp(NOW, datetime.UTC).isoformat()
    assert sp["sequence_number"].isdigit() and sp["partition_id"] == "3"
    assert telemetry_from_event(iot_event(None)) is None


def test_ledger_keeps_our_devices_marks_duplicates_and_drops_replays(backend, consumers):
    view = HubView(backend, "t")
    mine = view.add_device("ledger")
    [consumer] = consumers
    first = iot_event(mine.device_id, message_id="a", hub_ms=int(NOW * 1000))
    consumer.deliver(iot_event("someone-else", message_id="x"))
    consumer.deliver(iot_event(None, message_id="y"))
    consumer.deliver(first)
    consumer.deliver(iot_event(mine.device_id, message_id="a", hub_ms=int(NOW * 1000) + 900), pid="1")  # re-sent
    consumer.deliver(iot_event(mine.device_id, message_id="a", hub_ms=int(NOW * 1000)))  # the same event again
    consumer.deliver(iot_event(mine.device_id, message_id="b", hub_ms=int(NOW * 1000) + 1000))
    assert backend.wait_until(lambda: any(t.message_id == "b" for t in backend.telemetry()), 5)
    got = backend.telemetry(["ledger"])
    assert [(t.message_id, t.duplicate) for t in got] == [("a", False), ("a", True), ("b", False)]
    assert backend.telemetry() == got and backend.events() == [] and view.events == []
    assert len(view.wait_for_telemetry(3, timeout=1)) == 3


def test_wait_until_wakes_when_telemetry_arrives(backend, consumers):
    dev = backend.create_device("waiter")
    threading.Timer(0.2, consumers[0].deliver, [iot_event(dev.device_id)]).start()
    # with 300 s only a wait that wakes on the arrival can return within this test's timeout
    assert backend.wait_until(lambda: len(backend.telemetry([dev.device_id])) == 1, 300)
    assert backend.wait_until(lambda: len(backend.telemetry([dev.device_id])) == 2, 0.2) is False


def test_reconnect_ledger_resumes_before_the_last_event_without_double_counting(backend, consumers):
    dev = backend.create_device("failover")
    old = consumers[0]
    seen = [iot_event(dev.device_id, message_id=f"m{i}", hub_ms=int(NOW * 1000) + i * 1000) for i in range(3)]
    for i, event in enumerate(seen):
        old.deliver(event, pid=str(i % 2))
    assert backend.wait_until(lambda: len(backend.telemetry()) == 3, 5)
    moved = EH_CS.replace("ihsuprodtest", "ihsuprodsecondary")
    backend.reconnect_ledger(moved)
    assert old.closed.is_set() and len(consumers) == 2
    new = consumers[1]
    assert new.receiving.wait(5) and new.connection_string == moved
    # partition 1 was last seen at NOW+1 s: re-read from 30 s before that
    assert new.kwargs["starting_position"].timestamp() == pytest.approx(NOW + 1.02 - 30, abs=0.01)
    for event in seen[1:]:                               # the new endpoint repeats what was read
        new.deliver(iot_event(dev.device_id, message_id=event.message_id,
                              hub_ms=int(NOW * 1000) + int(event.message_id[1:]) * 1000, eventhub_ms=1))
    new.deliver(iot_event(dev.device_id, message_id="m3", hub_ms=int(NOW * 1000) + 3000))
    assert backend.wait_until(lambda: len(backend.telemetry()) == 4, 5)
    assert [(t.message_id, t.duplicate) for t in backend.telemetry()] == [
        ("m0", False), ("m1", False), ("m2", False), ("m3", False)]


def test_reader_errors_are_kept_without_secrets(backend, consumers):
    consumers[0].deliver(ConnectionError(f"auth failed for SharedAccessKey={EH_KEY}"), pid="1")
    deadline = time.monotonic() + 5
    while not backend.ledger_errors and time.monotonic() < deadline:
        time.sleep(0.02)
    [error] = backend.ledger_errors
    assert "partition 1" in error and "ConnectionError" in error
    assert_clean(error)


# --- the built-in endpoint's address, from the hub's AMQP redirect ------------------------------------

class AmqpRedirectStub:
    """IoT Hub's AMQP front door, as far as the lookup needs it: SASL PLAIN, open, begin, attach, and
    then a detach carrying `amqp:link:redirect` (or another error)."""

    def __init__(self, ca, error: AMQPError):
        self.error = error
        self.sasl: list[Any] = []
        self.sources: list[bytes] = []
        self.context = server_context(ca)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.hostname = f"localhost:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            try:
                raw.settimeout(5)
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self._session(conn)
            except (OSError, EOFError):
                pass

    @staticmethod
    def _read(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _frame(self, conn):
        header = self._read(conn, 8)
        body = self._read(conn, struct.unpack(">I", header[:4])[0] - 8)
        return struct.unpack(">H", header[6:])[0], _decode.decode_frame(memoryview(body))

    @staticmethod
    def _send(conn, frame, channel=0, frame_type=b"\x00"):
        header, body = _encode.encode_frame(frame, frame_type=frame_type)
        conn.sendall(header + struct.pack(">H", channel) + body)

    def _session(self, conn):
        assert self._read(conn, 8) == b"AMQP\x03\x01\x00\x00"
        conn.sendall(b"AMQP\x03\x01\x00\x00")
        self._send(conn, amqp.SASLMechanism(sasl_server_mechanisms=[b"PLAIN"]), frame_type=b"\x01")
        _, (_, fields) = self._frame(conn)
        self.sasl.append(fields)
        self._send(conn, amqp.SASLOutcome(code=0, additional_data=None), frame_type=b"\x01")
        assert self._read(conn, 8) == b"AMQP\x00\x01\x00\x00"
        conn.sendall(b"AMQP\x00\x01\x00\x00")
        while True:
            channel, (code, fields) = self._frame(conn)
            if code == 0x10:
                self._send(conn, amqp.OpenFrame("stub", None, 65536, 8, None, None, None, None, None, None))
            elif code == 0x11:
                self._send(conn, amqp.BeginFrame(channel, 0, 5000, 5000, 255, None, None, None))
            elif code == 0x12:
                self.sources.append(fields[5][0])
                self._send(conn, amqp.AttachFrame(fields[0], fields[1], False, None, None, None, None, None, None,
                                                  0, None, None, None, None))
                self._send(conn, amqp.DetachFrame(handle=fields[1], closed=True, error=self.error))
            elif code == 0x18:
                self._send(conn, amqp.CloseFrame(error=None))
                return

    def close(self):
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


REDIRECT = AMQPError(condition=b"amqp:link:redirect", description=b"redirect to the Event Hub-compatible endpoint",
                     info={b"hostname": b"ihsuprodam01res.servicebus.windows.net",
                           b"network-host": b"ihsuprodam01res.servicebus.windows.net", b"port": 5671,
                           b"address": b"amqps://ihsuprodam01res.servicebus.windows.net:5671/iothub-ehub-testhub-"
                                       b"2417-0c5e6f1a2b/ConsumerGroups/$Default/Partitions/0"})


@pytest.fixture
def redirect_stub(ca):
    stub = AmqpRedirectStub(ca, REDIRECT)
    yield stub
    stub.close()


def test_built_in_endpoint_is_looked_up_through_the_hubs_redirect(redirect_stub, ca_file):
    service_cs = f"HostName={redirect_stub.hostname};SharedAccessKeyName=service;SharedAccessKey={SERVICE_KEY}"
    consumers = Consumers()
    b = RealBackend(service_cs, sweep=False, ca_bundle=ca_file, eventhub_consumer_factory=consumers)
    try:
        [consumer] = consumers
        assert consumer.connection_string == (
            f"Endpoint=sb://ihsuprodam01res.servicebus.windows.net/;SharedAccessKeyName=service;"
            f"SharedAccessKey={SERVICE_KEY};EntityPath=iothub-ehub-testhub-2417-0c5e6f1a2b")
        [(mechanism, response, _)] = redirect_stub.sasl
        _, user, password = response.split(b"\0")
        assert mechanism == b"PLAIN" and user == b"service@sas.root.localhost"
        check_service_sas(password.decode(), redirect_stub.hostname, policy="service")
        assert redirect_stub.sources == [
            f"amqps://{redirect_stub.hostname}/messages/events/ConsumerGroups/$Default/Partitions/0".encode()]
        b.reconnect_ledger()   # after a failover: asked again
        assert len(redirect_stub.sources) == 2 and consumers[1].connection_string == consumer.connection_string
    finally:
        b.close()


def test_failed_lookup_names_the_option_and_no_secret(ca, ca_file):
    stub = AmqpRedirectStub(ca, AMQPError(condition=b"amqp:unauthorized-access",
                                          description=f"bad token sig=abc SharedAccessKey={SERVICE_KEY}".encode()))
    try:
        with pytest.raises(RealBackendError, match="--iothub-eventhub-connection") as err:
            derive_eventhub_connection_string(
                f"HostName={stub.hostname};SharedAccessKeyName=service;SharedAccessKey={SERVICE_KEY}",
                ca_bundle=ca_file, timeout=5)
        assert "unauthorized" in str(err.value)
        assert_clean(str(err.value))
    finally:
        stub.close()


# --- a device connection string -------------------------------------------------------------------

DEVICE_KEY = base64.b64encode(b"device-key-for-the-single-device").decode()
DEVICE_CS = f"HostName=testhub.azure-devices.net;DeviceId=bench-7;SharedAccessKey={DEVICE_KEY}"


def test_device_connection_string_gives_exactly_one_device():
    consumers = Consumers()
    b = RealBackend(DEVICE_CS, eventhub_connection_string=EH_CS, eventhub_consumer_factory=consumers)
    try:
        dev = b.create_device("whatever-the-test-asks")
        assert (dev.device_id, dev.connection_string) == ("bench-7", DEVICE_CS)
        with pytest.raises(RealBackendError, match=r"count>1.*SharedAccessKeyName") as err:
            b.create_device("second")
        assert "a device connection string gives one device" in str(err.value)
        consumers[0].deliver(iot_event("bench-7", message_id="t1"))
        assert b.wait_until(lambda: len(b.telemetry(["whatever-the-test-asks"])) == 1, 5)
        b.delete_device(dev.device_id)          # nothing to delete: it is not ours
        again = b.create_device("next-test")     # the next test gets it again, with a fresh view
        assert again is dev and b.telemetry([dev.device_id]) == []
        for call in (lambda: b.send_c2d("bench-7", "x"), lambda: b.invoke_method("bench-7", "m"),
                     lambda: b.get_twin("bench-7"), lambda: b.update_desired("bench-7", {"a": 1})):
            with pytest.raises(RealBackendError, match="needs a service connection string"):
                call()
    finally:
        b.close()


def test_device_connection_string_needs_the_eventhub_option():
    with pytest.raises(RealBackendError, match="--iothub-eventhub-connection") as err:
        RealBackend(DEVICE_CS, eventhub_consumer_factory=Consumers())
    assert_clean(str(err.value), DEVICE_KEY)


def test_bad_connection_strings_say_why_without_the_key():
    for cs, why in ((f"HostName=h;SharedAccessKey={DEVICE_KEY}", "expected a service connection string"),
                    (f"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={DEVICE_KEY}", "module"),
                    (f"HostName=h;DeviceId=d;SharedAccessKey={DEVICE_KEY};Bogus=1", "unknown key 'Bogus'")):
        with pytest.raises(RealBackendError, match=why) as err:
            RealBackend(cs, eventhub_connection_string=EH_CS, eventhub_consumer_factory=Consumers())
        assert_clean(str(err.value), DEVICE_KEY)
    with pytest.raises(RealBackendError, match="lacks EntityPath") as err:
        RealBackend(DEVICE_CS, eventhub_connection_string=EH_CS.rsplit(";", 1)[0],
                    eventhub_consumer_factory=Consumers())
    assert_clean(str(err.value), DEVICE_KEY)


def test_reprs_hold_no_secrets(backend):
    dev = backend.create_device("repr")
    handle_backend = RealBackend(DEVICE_CS, eventhub_connection_string=EH_CS, eventhub_consumer_factory=Consumers())
    try:
        for obj in (backend, dev, handle_backend, handle_backend.create_device("d")):
            assert_clean(repr(obj), dev.primary_key, dev.secondary_key, DEVICE_KEY)
    finally:
        handle_backend.close()


# --- faults -------------------------------------------------------------------------------------

class RecordingClient:
    """A device client the hub answers at once: what a hub that ignores fault requests looks like."""

    def __init__(self):
        self.connected = True
        self.sent = []

    def send_message(self, message):
        self.sent.append(message)


def start(backend, kind, **kwargs):
    return backend.start_fault(spec_for(kind, kwargs))


@pytest.fixture
def single():
    b = RealBackend(DEVICE_CS, eventhub_connection_string=EH_CS, eventhub_consumer_factory=Consumers(),
                    fault_watch=2)
    yield b
    b.close()


def test_fault_kinds_map_to_the_services_fault_injection_properties(single):
    dev = single.create_device("faults")
    client = RecordingClient()
    single.register_client(dev.device_id, client)
    cases = [("drop", {}, {"AzIoTHub_FaultOperationType": "KillTcp", "AzIoTHub_FaultOperationCloseReason": "boom",
                           "AzIoTHub_FaultOperationDelayInSecs": "1"}),
             ("drop", {"graceful": True, "at": 0}, {"AzIoTHub_FaultOperationType": "ShutDownMqtt",
                                                    "AzIoTHub_FaultOperationCloseReason": "boom",
                                                    "AzIoTHub_FaultOperationDelayInSecs": "0"}),
             ("throttle", {"seconds": 2.5, "at": 0},
              {"AzIoTHub_FaultOperationType": "InvokeThrottling", "AzIoTHub_FaultOperationCloseReason": "boom",
               "AzIoTHub_FaultOperationDelayInSecs": "0", "AzIoTHub_FaultOperationDurationInSecs": "3"}),
             ("expire_tokens", {"device_id": dev.device_id, "at": 0},
              {"AzIoTHub_FaultOperationType": "InvokeAuthError", "AzIoTHub_FaultOperationCloseReason": "boom",
               "AzIoTHub_FaultOperationDelayInSecs": "0", "AzIoTHub_FaultOperationDurationInSecs": "5"})]
    handles = [start(single, kind, **kwargs) for kind, kwargs, _ in cases]
    for handle, (kind, _, expected) in zip(handles, cases):
        handle.wait_recovered(5)
        assert handle.kind == kind and handle.params["operation"] == expected["AzIoTHub_FaultOperationType"]
        # acknowledged on the spot and nobody disconnected: the hub took it for ordinary telemetry
        assert handle.ignored == {dev.device_id} and handle.state == "ended"
    by_type = {m.custom_properties["AzIoTHub_FaultOperationType"]: m for m in client.sent}
    assert len(client.sent) == 4 and all(m.message_id.startswith("iotfo-fault-") for m in client.sent)
    assert [by_type[expected["AzIoTHub_FaultOperationType"]].custom_properties for _, _, expected in cases] == \
        [expected for _, _, expected in cases]


def test_faults_a_real_hub_cannot_produce(single):
    for kind in ("blackhole", "refuse", "drop_before_ack", "delay_acks"):
        with pytest.raises(FaultNotSupported, match=f"{kind} cannot be produced on a real IoT Hub: it needs"):
            single.start_fault(spec_for(kind, {"seconds": 1} if kind != "drop_before_ack" else {}))
    with pytest.raises(FaultNotSupported) as err:
        start(single, "region_failover", outage=2.0)
    for option in ("--iothub-allow-failover", "--iothub-subscription", "--iothub-resource-group"):
        assert option in str(err.value)
    with pytest.raises(FaultNotSupported, match=r"drop\(after_messages=3\) cannot be honoured .*use at="):
        start(single, "drop", after_messages=3)
    with pytest.raises(RealBackendError, match="register_client"):
        start(single, "drop")
    with pytest.raises(TypeError, match="start\\(\\) takes a FaultSpec"):
        single.start_fault("drop")


# every kind x parameter: (kwargs, honoured on a real hub?); a parameter left at its default asks nothing
REAL_CASES = [
    ("drop", {"graceful": True}, True), ("drop", {"at": 2}, True), ("drop", {"after_messages": 2}, False),
    ("throttle", {"seconds": 3}, True), ("throttle", {"at": 0}, True),
    ("throttle", {"rate": 10}, False), ("throttle", {"rate": 10, "burst": 5}, False),
    ("throttle", {"rate": 10, "max_delay": 1}, False), ("throttle", {"after_messages": 1}, False),
    ("expire_tokens", {"at": 0}, True), ("expire_tokens", {"after_messages": 1}, False),
    ("region_failover", {"outage": 5}, False), ("region_failover", {"keep_sessions": True}, False),
    ("region_failover", {"refuse": "connack"}, False), ("region_failover", {"at": 5}, False),
    ("region_failover", {"after_messages": 5}, False), ("region_failover", {"device_id": "faults"}, False),
    ("blackhole", {}, False), ("refuse", {}, False), ("drop_before_ack", {}, False), ("delay_acks", {"seconds": 1}, False),
]


@pytest.mark.parametrize("kind, kwargs, honoured", REAL_CASES, ids=lambda v: str(v) if not isinstance(v, bool) else "")
def test_a_real_hub_refuses_what_it_cannot_honour_and_names_it(single, kind, kwargs, honoured):
    dev = single.create_device("faults")
    single.register_client(dev.device_id, RecordingClient())
    spec = spec_for(kind, dict(kwargs, device_id=dev.device_id) if kind not in ("region_failover",) else kwargs)
    if honoured:
        handle = single.start_fault(spec).wait_recovered(5)
        for name, value in kwargs.items():
            if name == "at":
                assert handle.params["delay"] == value
            elif name == "seconds":
                assert handle.params["duration"] == value and handle.params["seconds"] == value
            else:
                assert handle.params[name] == value
        assert handle.spec is spec and handle.state == FaultState.ENDED
        return
    with pytest.raises(FaultNotSupported) as err:
        single.start_fault(spec)
    text = str(err.value)
    if real_faults.SUPPORT[FaultKind(kind)].missing:
        assert text.startswith(f"{kind} cannot be produced on a real IoT Hub: it needs ")
    else:
        name = next(n for n in spec.changed_params() if n not in real_faults.SUPPORT[spec.kind].honours)
        assert text.startswith(f"{kind}({name}=") and "cannot be honoured on a real IoT Hub: " in text
        assert real_faults.SUPPORT[spec.kind].cannot[name] in text


def test_the_old_drift_is_gone():
    # the real backend used to take expire_tokens(seconds=) and ignore throttle(rate=, burst=, max_delay=)
    with pytest.raises(TypeError, match=r"expire_tokens\(\) got an unexpected keyword argument 'seconds'"):
        spec_for("expire_tokens", {"seconds": 5}, what="expire_tokens()")
    with pytest.raises(FaultNotSupported, match=r"throttle\(rate=10.0\) cannot be honoured on a real IoT Hub: its "
                                                r"fault injection \(InvokeThrottling\) has no rate; use the embedded hub"):
        real_faults.FaultInjector(lambda d: d, lambda ids: []).start(spec_for("throttle", {"rate": 10}))


def test_every_backend_declares_every_kind_and_parameter():
    # nothing a backend meets can fall through its table unexplained
    from pytest_iotfailover.backends import fake
    for table in (fake.SUPPORT, real_faults.SUPPORT):
        assert set(table) == set(FaultKind)
        for kind, support in table.items():
            if support.missing is None:
                assert set(support.honours) | set(support.cannot) == set(SPECS[kind].parameter_names()), kind
                assert not set(support.honours) & set(support.cannot), kind


def test_region_failover_goes_to_arm_and_moves_the_ledger(registry_stub, ca_file, consumers):
    class ArmHandle:
        state = "active"
        waited = False

        def wait(self, timeout=None):
            self.waited, self.state = True, "ended"
            return self

    class Arm:
        def __init__(self):
            self.handles = []

        def failover(self):
            self.handles.append(ArmHandle())
            return self.handles[-1]

        failback = failover

    arm = Arm()
    b = make_backend(registry_stub, ca_file, consumers, arm=arm)
    try:
        b.finish(failback=True)
        assert arm.handles == [], "nothing to fail back before a failover"
        with pytest.raises(FaultNotSupported, match="whole hub"):
            start(b, "region_failover", device_id="x")
        handle = start(b, "region_failover", outage=2.0)
        assert handle.kind == "region_failover" and handle.state == "active" and len(consumers) == 1
        assert handle.wait(5) is handle and arm.handles[0].waited and handle.state == "ended"
        assert len(consumers) == 2 and consumers[0].closed.is_set()
        b.finish(failback=True)
        assert len(arm.handles) == 2 and arm.handles[1].waited
    finally:
        b.close()


def test_region_failover_not_opted_in_is_an_error_naming_the_flag_and_the_cost():
    from pytest_iotfailover.backends.real.arm import ArmFailover, FailoverNotAllowed
    arm = ArmFailover(subscription_id="00000000-0000-0000-0000-000000000000", resource_group="rg",
                      hub_name="testhub", allowed_hub=None)
    b = RealBackend(DEVICE_CS, eventhub_connection_string=EH_CS, eventhub_consumer_factory=Consumers(), arm=arm)
    try:
        with pytest.raises(FailoverNotAllowed, match="--iothub-allow-failover=testhub") as err:
            start(b, "region_failover")
        assert "2 failovers" in str(err.value) and "10 min" in str(err.value)
    finally:
        b.close()


@pytest.fixture
def fakehub():
    with FakeHub("realbackendhub") as hub:
        yield hub


def test_kill_tcp_goes_through_the_devices_own_client(fakehub):
    """The request is an ordinary D2C message with the service's properties; the FakeHub honours
    it as a whitelisted IoT Hub does: no PUBACK, a TCP reset after DelayInSecs, the SDK reconnects
    and re-sends the request, which is then just telemetry."""
    fake_dev = fakehub.add_device("killme")
    b = RealBackend(fake_dev.connection_string, eventhub_connection_string=EH_CS,
                    eventhub_consumer_factory=Consumers(), fault_watch=10)
    dev = b.create_device("killme")
    client = IoTHubDeviceClient.create_from_connection_string(
        dev.connection_string, server_verification_cert=fakehub.ca_pem, keep_alive=5, connection_retry_interval=1)
    try:
        run_bounded(client.connect, 10, "connect")
        b.register_client(dev.device_id, client)
        t0 = time.time()
        handle = start(b, "drop", device_id=dev.device_id)
        request = fakehub.wait_for_event("fault_injection_requested", dev.device_id, timeout=5)
        assert request.detail == {"type": "KillTcp", "delay": 1.0, "duration": 0.0}
        drop = fakehub.wait_for_event("disconnect", dev.device_id, timeout=5)
        assert drop.reason == "drop" and drop.at - t0 >= 1.0
        handle.wait(5)
        handle.wait_recovered(10)
        assert fakehub.wait_for_event("connect", dev.device_id, timeout=5, after=drop.at)
        report = handle.report()
        assert report.recovered and report.devices[dev.device_id].disconnected_at >= t0
        assert handle.ignored == set() and handle.send_errors == {}
        resent = fakehub.wait_for_telemetry(1, dev.device_id, timeout=5)[0]
        assert resent.dup and resent.properties["AzIoTHub_FaultOperationType"] == "KillTcp"
        assert resent.properties["AzIoTHub_FaultOperationCloseReason"] == "boom"
    finally:
        run_bounded(client.shutdown, 10, "shutdown")
        b.close()


def test_drop_through_an_aio_client_keeps_its_own_state_handler(fakehub):
    fake_dev = fakehub.add_device("aio")
    b = RealBackend(fake_dev.connection_string, eventhub_connection_string=EH_CS,
                    eventhub_consumer_factory=Consumers(), fault_watch=10)

    async def scenario():
        from azure.iot.device.aio import IoTHubDeviceClient as AioClient
        client = AioClient.create_from_connection_string(fake_dev.connection_string, keep_alive=5,
                                                         server_verification_cert=fakehub.ca_pem,
                                                         connection_retry_interval=1)
        states = []

        async def on_state():
            states.append(client.connected)
        client.on_connection_state_change = on_state
        await asyncio.wait_for(client.connect(), 10)
        try:
            b.register_client(b.create_device("aio").device_id, client)
            handle = start(b, "drop", device_id="aio", at=0)
            await asyncio.get_running_loop().run_in_executor(None, handle.wait_recovered, 10)
            return handle, len(states), client.on_connection_state_change is on_state
        finally:
            await asyncio.wait_for(client.shutdown(), 10)

    try:
        handle, changes, restored = asyncio.run(scenario())
        assert handle.report().recovered and handle.send_errors == {} and handle.ignored == set()
        assert changes == 3 and restored, "the test's own handler saw connect, drop, reconnect and is back"
        assert fakehub.wait_for_event("fault_injection_requested", "aio", timeout=1).detail["delay"] == 0
    finally:
        b.close()


def test_drop_through_a_device_pool_uses_its_current_client(fakehub):
    from pytest_iotfailover.devices.pool import DevicePool
    fake_dev = fakehub.add_device("pooled")
    b = RealBackend(fake_dev.connection_string, eventhub_connection_string=EH_CS,
                    eventhub_consumer_factory=Consumers(), fault_watch=10)
    pool = DevicePool([b.create_device("pooled")], server_verification_cert=fakehub.ca_pem, keep_alive=5)
    try:
        pool.connect(timeout=10)
        b.register_client("pooled", pool)
        before = pool.clients["pooled"]
        handle = start(b, "drop", device_id="pooled", at=0).wait_recovered(10)
        assert handle.report().recovered and handle.send_errors == {} and handle.ignored == set()
        assert pool.clients["pooled"] is not before and len(pool.recreations) == 1
        assert len([e for e in fakehub.events if e.kind == "fault_injection_requested"]) == 1, \
            "the request went out once: the replacement client does not send it again"
    finally:
        pool.close()
        b.close()
