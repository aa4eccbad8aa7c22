"""End to end: the standalone hub process, its info file and control API, and the real device SDK."""
import base64
import http.client
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse
from sdk_support import Inbox, bounded

from pytest_iotfailover.fakehub import control_api as control
from pytest_iotfailover.fakehub.control_api import ControlServer
from pytest_iotfailover.model import SPECS

pytestmark = pytest.mark.timeout(60)

START_TIMEOUT = 15.0


# --- helpers ---------------------------------------------------------------------------------------

class HubProcess:
    def __init__(self, tmp_path, *args):
        self.dir = tmp_path
        self.info_path = tmp_path / "info.json"
        self.stdout_path = tmp_path / "hub.out"
        self.stderr_path = tmp_path / "hub.err"
        self.args = ["--info-file", str(self.info_path), *args]
        self.proc = None
        self.info = None

    def start(self):
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pytest_iotfailover.fakehub", *self.args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.info = self._wait_for_info()
        return self

    def _wait_for_info(self):
        # the info file appearing is the only readiness signal, so poll it against a deadline
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.info_path.exists():
                return json.loads(self.info_path.read_text())
            if self.proc.poll() is not None:
                pytest.fail(f"hub exited with {self.proc.returncode} before writing its info file: {self.stderr()}")
            time.sleep(0.02)
        pytest.fail(f"no info file within {START_TIMEOUT:g} s; stderr: {self.stderr()}")

    def stderr(self):
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self):
        """Finalizer: never leave a hub behind, but give it the chance to clean up its files first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def hub_factory(tmp_path):
    started = []

    def start(*args, name="hub"):
        d = tmp_path / name
        d.mkdir()
        hub = HubProcess(d, *args)
        started.append(hub)
        return hub.start()
    yield start
    for hub in started:
        hub.kill()


def api(info, method, path, body=None, token=..., raw=None, headers=None):
    """One control API call: (status, decoded JSON, response headers)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(info["control_url"] + path, data=data, method=method)
    token = info["control_token"] if token is ... else token
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def ok(info, method, path, body=None, expect=200):
    status, result, _ = api(info, method, path, body)
    assert status == expect, result
    return result


def poll(info, path, predicate, timeout=10.0):
    """GET `path` until `predicate(result)`: the control API has nothing to block on for these."""
    deadline = time.monotonic() + timeout
    while True:
        result = ok(info, "GET", path)
        if predicate(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"GET {path} did not satisfy the condition within {timeout:g} s: {result!r}")
        time.sleep(0.05)  # polling interval


def make_client(info, cs):
    with open(info["ca_pem_path"]) as f:
        ca_pem = f.read()
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=ca_pem, keep_alive=5, connection_retry_interval=1)


def shutdown(client):
    try:
        bounded(client.shutdown, timeout=10)
    except TimeoutError:
        pass  # a stuck SDK thread is daemonic; the hub process is killed by its fixture anyway


def control_address(info):
    host, port = info["control_url"][len("http://"):].rsplit(":", 1)
    return host, int(port)


def raw_request(info, head, body=b"", host=None, token=...):
    """`head` (request line and extra header lines) sent as is on a new connection: the answer's
    (status, JSON). Host and Authorization are added unless given."""
    address = control_address(info)
    token = info["control_token"] if token is ... else token
    lines = [head]
    if host is not False:
        lines.append(f"Host: {host or f'{address[0]}:{address[1]}'}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(address, timeout=15) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read())


def read_answer(sock):
    """Everything the server sends until it closes; a reset counts as a close."""
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


def address_free(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# --- the shared hub and device -------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    proc = HubProcess(tmp_path_factory.mktemp("standalone"), "--device", "d1")
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def info(hub):
    return hub.info


@pytest.fixture(scope="module")
def device(info):
    """d1 connected through the real SDK, with every service-side handler recording what it gets."""
    client = make_client(info, info["devices"]["d1"])
    inbox = {"c2d": Inbox(), "methods": Inbox(), "desired": Inbox()}

    def on_method(request):
        inbox["methods"](request)
        client.send_method_response(MethodResponse.create_from_method_request(
            request, 200, {"echo": request.payload, "method": request.name}))
    try:
        bounded(client.connect, timeout=15)
        client.on_message_received = inbox["c2d"]
        client.on_method_request_received = on_method
        client.on_twin_desired_properties_patch_received = inbox["desired"]
        yield client, inbox
    finally:
        shutdown(client)


# --- tests ---------------------------------------------------------------------------------------

def test_info_file_describes_the_hub(hub, info):
    assert stat.S_IMODE(os.stat(hub.info_path).st_mode) == 0o600
    assert info["hostname"] == "testhub.azure-devices.net"
    assert info["port"] == 8883
    assert info["gateway_host"].startswith("127.")
    assert set(info["devices"]) == {"d1"}
    assert f"GatewayHostName={info['gateway_host']}" in info["devices"]["d1"]
    assert info["control_url"].startswith(f"http://{info['gateway_host']}:")
    with open(info["ca_pem_path"]) as f:
        assert f.read().startswith("-----BEGIN CERTIFICATE-----")
    line = hub.stderr().strip()
    assert line.startswith(f"iotfailover-hub: testhub.azure-devices.net listening on {info['gateway_host']}:8883")
    assert info["control_url"] in line and str(hub.info_path) in line
    assert "SharedAccessKey" not in line and info["control_token"] not in line


def test_telemetry_sent_by_the_sdk_is_listed(info, device):
    client, _ = device
    msg = Message('{"temp": 21.5}', message_id="m-1", content_encoding="utf-8", content_type="application/json")
    msg.custom_properties["unit"] = "C"
    bounded(client.send_message, msg)

    items = ok(info, "GET", "/telemetry?device_id=d1")
    sent = [t for t in items if t["message_id"] == "m-1"]
    assert len(sent) == 1
    t = sent[0]
    assert t["device_id"] == "d1"
    assert base64.b64decode(t["body_base64"]) == b'{"temp": 21.5}'
    assert t["properties"] == {"unit": "C"}
    assert t["system_properties"]["content_type"] == "application/json"
    assert t["dup"] is False and t["duplicate"] is False
    assert abs(t["enqueued_at"] - time.time()) < 60
    assert sent[0] in ok(info, "GET", "/telemetry")


def test_added_device_connects_and_sends(info):
    created = ok(info, "POST", "/devices", {"device_id": "d2"}, expect=201)
    assert created["device_id"] == "d2"
    assert "DeviceId=d2;" in created["connection_string"]
    status, err, _ = api(info, "POST", "/devices", {"device_id": "d2"})
    assert status == 409 and "already exists" in err["error"]

    client = make_client(info, created["connection_string"])
    try:
        bounded(client.connect, timeout=15)
        bounded(client.send_message, Message("hello", message_id="d2-1"))
    finally:
        shutdown(client)
    items = ok(info, "GET", "/telemetry?device_id=d2")
    assert [(t["message_id"], base64.b64decode(t["body_base64"])) for t in items] == [("d2-1", b"hello")]


def test_c2d_reaches_the_device(info, device):
    _, inbox = device
    result = ok(info, "POST", "/devices/d1/c2d", {"body": "reboot please", "properties": {"prio": "high"}})
    msg = inbox["c2d"].wait_for(lambda m: m.message_id == result["message_id"])
    assert msg.data == b"reboot please"
    assert msg.custom_properties["prio"] == "high"


def test_direct_method_is_answered_by_the_device(info, device):
    result = ok(info, "POST", "/devices/d1/methods/reboot", {"payload": {"delay": 1}, "timeout": 10})
    assert result == {"status": 200, "payload": {"echo": {"delay": 1}, "method": "reboot"}}


def test_direct_method_to_an_offline_device_reports_404_status(info):
    ok(info, "POST", "/devices", {"device_id": "offline-1"}, expect=201)
    result = ok(info, "POST", "/devices/offline-1/methods/ping", {"timeout": 5})
    assert result["status"] == 404


def test_twin_get_and_desired_patch_reach_the_device(info, device):
    client, inbox = device
    twin = ok(info, "GET", "/devices/d1/twin")
    before = twin["desired"]["$version"]

    result = ok(info, "PATCH", "/devices/d1/twin/desired", {"led": "on", "rate": 5})
    assert result == {"version": before + 1}
    patch = inbox["desired"].wait_for(lambda p: p.get("led") == "on")
    assert patch["rate"] == 5 and patch["$version"] == before + 1

    bounded(client.patch_twin_reported_properties, {"led": "on"})
    twin = ok(info, "GET", "/devices/d1/twin")
    assert twin["desired"]["led"] == "on" and twin["desired"]["$version"] == before + 1
    assert twin["reported"]["led"] == "on"
    assert bounded(client.get_twin)["desired"]["led"] == "on"


def test_events_list_the_device_connection(info, device):
    events = ok(info, "GET", "/events")
    assert events[0]["kind"] == "hub_started"
    assert all(set(e) == {"kind", "device_id", "at", "detail"} for e in events)
    connects = ok(info, "GET", "/events?kind=connect&device_id=d1")
    assert connects and all(e["kind"] == "connect" and e["device_id"] == "d1" for e in connects)


@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["missing", "wrong", "empty"])
def test_requests_without_the_token_are_refused(info, token):
    status, err, headers = api(info, "GET", "/telemetry", token=token)
    assert status == 401
    assert "Bearer" in err["error"] and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = api(info, "POST", "/devices", {"device_id": "sneaky"}, token=token)
    assert status == 401
    assert "sneaky" not in [d["device_id"] for d in ok(info, "GET", "/devices")]


def test_basic_auth_with_the_token_is_refused(info):
    status, _, _ = api(info, "GET", "/events", token=None,
                       headers={"Authorization": f"Basic {info['control_token']}"})
    assert status == 401


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/devices", b"{not json", 400, "not valid JSON"),
    ("POST", "/devices", b"", 400, "empty"),
    ("POST", "/devices", b"[1, 2]", 400, "JSON object"),
    ("POST", "/devices", b"{}", 400, "missing field 'device_id'"),
    ("POST", "/devices", b'{"device_id": 7}', 400, "'device_id' must be a string"),
    ("POST", "/devices", b'{"device_id": "x", "colour": 1}', 400, "unknown field 'colour'"),
    ("POST", "/devices", b'{"device_id": "a/b"}', 400, "invalid device id"),
    ("POST", "/devices/d1/c2d", b'{"body": 5}', 400, "'body' must be a string"),
    ("POST", "/devices/d1/c2d", b'{"body": "x", "properties": {"a": 1}}', 400, "property 'a'"),
    ("POST", "/devices/nope/c2d", b'{"body": "x"}', 404, "no device 'nope'"),
    ("POST", "/devices/d1/methods/m", b'{"timeout": "soon"}', 400, "'timeout' must be a number"),
    ("POST", "/devices/d1/methods/m", b'{"timeout": true}', 400, "'timeout' must be a number"),
    ("POST", "/devices/d1/methods/m", b'{"timeout": 0}', 400, "'timeout'"),
    ("POST", "/devices/nope/methods/m", b"{}", 404, "no device 'nope'"),
    ("GET", "/devices/nope/twin", None, 404, "no device 'nope'"),
    ("PATCH", "/devices/nope/twin/desired", b'{"a": 1}', 404, "no device 'nope'"),
    ("PATCH", "/devices/d1/twin/desired", b'"a"', 400, "JSON object"),
    ("GET", "/telemetry?device_id=nope", None, 404, "no device 'nope'"),
    ("GET", "/telemetry?colour=red", None, 400, "unknown query parameter 'colour'"),
    ("GET", "/nowhere", None, 404, "no route '/nowhere'"),
    ("GET", "/devices/d1/shadow", None, 404, "no route"),
    ("DELETE", "/devices", None, 405, "use GET or POST"),
    ("POST", "/telemetry", b"{}", 405, "use GET"),
    ("GET", "/devices/d1/twin/desired", None, 405, "use PATCH"),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else None)
def test_bad_requests_get_json_errors(info, method, path, body, status, words):
    got, err, _ = api(info, method, path, raw=body)
    assert got == status, err
    assert words in err["error"]


def test_405_names_the_allowed_methods(info):
    status, _, headers = api(info, "PUT", "/devices/d1/twin")
    assert status == 405 and headers["Allow"] == "GET"


def test_hub_refusals_map_to_http_status(info):
    status, err, _ = api(info, "POST", "/devices/d1/methods/bad%23name", {"timeout": 1})
    assert status == 400 and "invalid method name" in err["error"]
    status, err, _ = api(info, "POST", "/devices/d1/c2d", {"body": "x" * (64 * 1024 + 1)})
    assert status == 400 and "64 KB" in err["error"]


def test_oversized_body_is_refused(info):
    status, err, _ = api(info, "POST", "/devices", raw=b" " * (1024 * 1024 + 1))
    assert status == 413 and "exceeds" in err["error"]


def test_device_ids_in_paths_are_url_decoded(info):
    odd = "x:y?z=1"
    ok(info, "POST", "/devices", {"device_id": odd}, expect=201)
    twin = ok(info, "GET", "/devices/" + urllib.request.quote(odd, safe="") + "/twin")
    assert twin["desired"]["$version"] == 1
    result = ok(info, "POST", "/devices/x%3Ay%3Fz%3D1/c2d", {"body": "queued"})
    assert result["message_id"]


def test_server_survives_garbage(info):
    host, port = info["control_url"][len("http://"):].rsplit(":", 1)
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET /events HTTP/1.1\r\nContent-Length: nope\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.recv(4096)
    assert ok(info, "GET", "/events")


def test_keep_alive_connection_serves_several_requests(info):
    host, port = info["control_url"][len("http://"):].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    auth = {"Authorization": f"Bearer {info['control_token']}"}
    try:
        conn.request("HEAD", "/events", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        conn.request("GET", "/devices", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200 and "d1" in [d["device_id"] for d in json.loads(resp.read())]
    finally:
        conn.close()


def back_after(device_id):
    return lambda fault: (fault["report"]["devices"].get(device_id) or {}).get("reconnected_at") is not None


def test_drop_started_through_the_api_and_the_device_reconnects(info, device):
    client, _ = device
    fault = ok(info, "POST", "/faults/drop", {"device_id": "d1"}, expect=201)
    assert set(fault) == {"id", "kind", "device_id", "params", "state", "started_at", "ended_at"}
    assert fault["kind"] == "drop" and fault["device_id"] == "d1"
    assert fault["params"] == {"graceful": False, "reason": "drop"}
    assert fault["state"] == "ended"  # a drop is over once the connection is reset
    assert fault["started_at"] <= fault["ended_at"]

    got = poll(info, f"/faults/{fault['id']}", back_after("d1"))
    report = got.pop("report")
    assert got == fault
    assert report["fault"] == "drop" and report["target"] == "d1"
    d1 = report["devices"]["d1"]
    assert fault["started_at"] <= d1["disconnected_at"] <= d1["reconnected_at"]
    bounded(client.send_message, Message("after the drop", message_id="after-drop"))

    listed = ok(info, "GET", "/faults")
    assert [f["id"] for f in listed] == list(range(len(listed)))
    assert listed[fault["id"]] == fault


def test_region_failover_through_the_api_and_wait_for_its_end(info):
    # Takes 1-2 s: a 1 s outage, then up to the SDK's 1 s retry interval. Its own device, as the
    # failover takes the device's MQTT session (subscriptions) with it.
    created = ok(info, "POST", "/devices", {"device_id": "fo1"}, expect=201)
    client = make_client(info, created["connection_string"])
    try:
        bounded(client.connect, timeout=15)
        fault = ok(info, "POST", "/faults/region_failover", {"outage": 1, "device_id": "fo1"}, expect=201)
        assert fault["state"] == "active" and fault["ended_at"] is None
        # a failover of one device can only refuse at CONNACK: TCP cannot tell who is knocking
        assert fault["params"] == {"outage": 1.0, "keep_sessions": False, "refuse": "connack",
                                   "existing": "reset", "connect": "connack3", "unread": 1.0,
                                   "keep_c2d": False, "rpo": 0.0, "dns": False, "dns_stale": 0.0}

        done = ok(info, "POST", f"/faults/{fault['id']}/wait", {"timeout": 10})
        assert done["state"] == "ended"
        # a lower bound that holds on any machine: the hub's 1 s timer starts after started_at
        assert done["ended_at"] - done["started_at"] >= 1
        assert done["report"]["ended_at"] == done["ended_at"]

        back = poll(info, f"/faults/{fault['id']}", back_after("fo1"))
        assert back["report"]["devices"]["fo1"]["reconnected_at"] >= done["ended_at"]
        assert back["report"]["time_to_recover"] is not None
        bounded(client.send_message, Message("after the failover", message_id="fo-1"))
    finally:
        shutdown(client)


def test_service_calls_get_503_during_a_region_failover(info):
    ok(info, "POST", "/devices", {"device_id": "svc1"}, expect=201)
    fault = ok(info, "POST", "/faults/region_failover", {"outage": 60, "device_id": "svc1"}, expect=201)
    try:
        for method, path, body in [("POST", "/devices/svc1/c2d", {"body": "x"}),
                                   ("GET", "/devices/svc1/twin", None),
                                   ("PATCH", "/devices/svc1/twin/desired", {"a": 1}),
                                   ("POST", "/devices/svc1/methods/m", {"timeout": 1})]:
            status, err, _ = api(info, method, path, body)
            assert (status, "failing over" in err["error"]) == (503, True), (method, path, err)
    finally:
        api(info, "DELETE", f"/faults/{fault['id']}")


def test_delete_cancels_a_pending_fault(info):
    fault = ok(info, "POST", "/faults/drop", {"device_id": "d1", "at": 30}, expect=201)
    path = f"/faults/{fault['id']}"
    try:
        assert fault["state"] == "pending" and fault["started_at"] is None
        status, err, _ = api(info, "POST", path + "/wait", {"timeout": 0.2})
        assert status == 504 and "still pending after 0.2 s" in err["error"]
        for body, words in [({"timeout": 301}, "at most 300 s"), ({"timeout": "soon"}, "'timeout' must be a number"),
                            ({"until": 3}, "unknown field 'until'")]:
            status, err, _ = api(info, "POST", path + "/wait", body)
            assert status == 400 and words in err["error"], err
    finally:
        cancelled = ok(info, "DELETE", path)
    assert cancelled == dict(fault, state="cancelled")
    got = ok(info, "GET", path)
    assert got["state"] == "cancelled" and got["report"]["started_at"] is None and got["report"]["devices"] == {}
    assert ok(info, "POST", path + "/wait")["state"] == "cancelled"  # an empty body waits the default time
    assert ok(info, "DELETE", path) == cancelled  # cancelling again changes nothing
    assert ok(info, "GET", "/events?kind=fault_cancelled&device_id=d1")


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/faults/meltdown", b"{}", 404, "unknown fault kind 'meltdown'; the kinds are region_failover, drop,"),
    ("POST", "/faults/meltdown", b"{not json", 404, "unknown fault kind"),
    ("POST", "/faults/0", b"{}", 404, "unknown fault kind '0'"),
    ("POST", "/faults/drop", b'{"colour": 1}', 400, "unknown argument 'colour' for drop (allowed: device_id,"),
    ("POST", "/faults/expire_tokens", b'{"seconds": 1}', 400, "unknown argument 'seconds' for expire_tokens"),
    ("POST", "/faults/drop", b'{"graceful": "yes"}', 400, "'graceful' of drop must be a boolean, not string"),
    ("POST", "/faults/drop", b'{"device_id": 5}', 400, "'device_id' of drop must be a string or null, not number"),
    ("POST", "/faults/drop", b'{"after_messages": 1.5}', 400, "'after_messages' of drop must be an integer or null, not 1.5"),
    ("POST", "/faults/drop", b'{"at": "soon"}', 400, "'at' of drop must be a number or null, not string"),
    ("POST", "/faults/drop", b'{"at": 1e400}', 400, "'at' of drop must be a number or null, not a number out of range"),
    ("POST", "/faults/drop_before_ack", b'{"count": 1e20}', 400, "'count' of drop_before_ack must be an integer, not 1e+20"),
    ("POST", "/faults/drop_before_ack", b'{"count": 100000000000000000000}', 400, "not a number out of range"),
    ("POST", "/faults/refuse", b'{"code": true}', 400, "'code' of refuse must be an integer, not boolean"),
    ("POST", "/faults/region_failover", b'{"outage": null}', 400, "'outage' of region_failover must be a number, not null"),
    ("POST", "/faults/throttle", b'{"rate": [2]}', 400, "'rate' of throttle must be a number or null, not array"),
    ("POST", "/faults/throttle", b'{"burst": true}', 400, "'burst' of throttle must be an integer, not boolean"),
    ("POST", "/faults/throttle", b'{"burst": 2.0}', 400, "'burst' of throttle must be an integer, not 2.0"),
    ("POST", "/faults/region_failover", b'{"keep_sessions": 1}', 400,
     "'keep_sessions' of region_failover must be a boolean, not number"),
    ("POST", "/faults/region_failover", b'{"refuse": 1}', 400, "'refuse' of region_failover must be a string or null"),
    ("POST", "/faults/delay_acks", b"{}", 400, "missing argument 'seconds' for delay_acks (a number)"),
    ("POST", "/faults/throttle", b'{"burst": 2}', 400, "POST /faults/throttle: burst= only apply with rate="),
    ("POST", "/faults/drop", b"[]", 400, "JSON object"),
    # range and combination checks are the fault spec's own (model.py), named after the request
    ("POST", "/faults/refuse", b'{"code": 7}', 400, "POST /faults/refuse: code must be at most 5, got 7"),
    ("POST", "/faults/region_failover", b'{"refuse": "udp"}', 400,
     "POST /faults/region_failover: refuse must be one of 'tcp', 'connack', got 'udp'"),
    ("POST", "/faults/drop", b'{"at": 1, "after_messages": 2}', 400, "give at= or after_messages=, not both"),
    ("POST", "/faults/blackhole", b'{"seconds": -1}', 400, "seconds must be a non-negative number"),
    ("POST", "/faults/drop", b'{"device_id": "nobody"}', 400,
     "POST /faults/drop: device_id='nobody': no such device on this hub"),
    ("GET", "/faults/99999", None, 404, "no fault '99999'"),
    ("GET", "/faults/drop", None, 404, "no fault 'drop'"),
    ("DELETE", "/faults/-1", None, 404, "no fault '-1'"),
    ("POST", "/faults/99999/wait", b"{}", 404, "no fault '99999'"),
    ("GET", "/faults?kind=drop", None, 400, "unknown query parameter 'kind'"),
    ("POST", "/faults", b"{}", 405, "use GET"),
    ("PUT", "/faults/0", b"{}", 405, "use GET or POST or DELETE"),
    ("GET", "/faults/0/wait", None, 405, "use POST"),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else None)
def test_bad_fault_requests_are_refused_and_start_nothing(info, method, path, body, status, words):
    before = ok(info, "GET", "/faults")
    got, err, _ = api(info, method, path, raw=body)
    assert got == status, err
    assert words in err["error"]
    assert ok(info, "GET", "/faults") == before


def test_every_fault_argument_has_the_json_type_of_its_spec():
    # the API's argument checks come from the fault vocabulary, not from a table of its own
    assert control.FAULT_KINDS == tuple(k.value for k in SPECS)
    assert control._FAULT_ARGS["throttle"] == {
        "device_id": ("string", True, False), "at": ("number", True, False),
        "after_messages": ("integer", True, False), "rate": ("number", True, False),
        "seconds": ("number", True, False), "burst": ("integer", False, False),
        "max_delay": ("number", False, False)}
    assert control._FAULT_ARGS["delay_acks"]["seconds"] == ("number", False, True)
    assert control._FAULT_ARGS["region_failover"]["keep_sessions"] == ("boolean", False, False)
    for kind, cls in SPECS.items():
        assert list(control._FAULT_ARGS[kind.value]) == cls.parameter_names()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_control_api_refuses_non_loopback_addresses(host):
    with pytest.raises(ValueError, match="loopback|not an IP address"):
        ControlServer(None, host)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_hub_cleanly(hub_factory, sig):
    hub = hub_factory("--port", "0", "--device", "s1")
    info = hub.info
    host = info["gateway_host"]
    control_port = int(info["control_url"].rsplit(":", 1)[1])
    ca_path = info["ca_pem_path"]
    # open connections must not hold the shutdown up
    mqtt = socket.create_connection((host, info["port"]), timeout=5)
    http = socket.create_connection((host, control_port), timeout=5)
    try:
        http.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{control_port}\r\nAuthorization: Bearer {info['control_token']}\r\n\r\n"
                     .encode())
        assert http.recv(4096).startswith(b"HTTP/1.1 200")
        # a stop held up by the connections kept open here would outlast these 20 s (room for a
        # busy machine); wait() raises TimeoutExpired then
        assert hub.stop(sig, timeout=20) == 0, hub.stderr()
    finally:
        mqtt.close()
        http.close()
    assert "Traceback" not in hub.stderr()
    assert not hub.info_path.exists() and not os.path.exists(ca_path)
    assert address_free(host, info["port"]) and address_free(host, control_port)


def test_without_info_file_only_a_private_file_path_goes_to_stdout(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pytest_iotfailover.fakehub", "--port", "0", "--device", "d"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        info_path = proc.stdout.readline().decode().strip()
        assert stat.S_IMODE(os.stat(info_path).st_mode) == 0o600
        with open(info_path) as f:
            info = json.load(f)
        ca_path = info["ca_pem_path"]
        assert os.path.exists(ca_path)
        assert ok(info, "GET", "/devices") != []
        proc.terminate()
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert not os.path.exists(info_path) and not os.path.exists(os.path.dirname(ca_path))
        assert b"SharedAccessKey" not in out + err and info["control_token"].encode() not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


@pytest.mark.parametrize("args,words", [
    (["--hub-name", "Not_A_Hub"], "invalid hub_name"),
    (["--device", "ok", "--device", "bad#id"], "bad#id"),
    (["--device", "twice", "--device", "twice"], "given twice"),
    (["--port", "65536"], "out of range"),
    (["--control-port", "-1"], "out of range"),
    (["--host", "192.0.2.1"], "not a loopback address"),
    (["--bogus"], "unrecognized arguments"),
    ("in-use", "cannot listen on"),
], ids=["hub-name", "device-id", "duplicate-device", "port", "control-port", "remote-host", "unknown-option",
        "address-in-use"])
def test_invalid_arguments_exit_2(info, tmp_path, args, words):
    if args == "in-use":
        args = ["--host", info["gateway_host"], "--port", str(info["port"])]
    proc = subprocess.run([sys.executable, "-m", "pytest_iotfailover.fakehub", *args,
                           "--info-file", str(tmp_path / "info.json")],
                          check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("iotfailover-hub: error:")
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "info.json").exists()


# --- robustness of the control API -----------------------------------------------------------------

def nested(depth, leaf="1"):
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("method,path,body,words", [
    ("PATCH", "/devices/d1/twin/desired", '{"a": ' + nested(100_000) + "}", "nested deeper than 64 levels"),
    ("PATCH", "/devices/d1/twin/desired", '{"a": ' * 100_000 + "1" + "}" * 100_000, "nested deeper than 64"),
    ("POST", "/devices/d1/methods/m", '{"payload": ' + nested(100_000) + "}", "nested deeper than 64"),
    # deep enough to trouble recursive code, not deep enough for the parser to refuse
    ("POST", "/devices/d1/methods/m", '{"payload": ' + nested(900) + "}", "nested deeper than 64"),
    ("PATCH", "/devices/d1/twin/desired", '{"a": ' + nested(64) + "}", "nested deeper than 64"),
    ("POST", "/faults/drop", '{"device_id": ' + nested(100_000) + "}", "nested deeper than 64"),
    ("POST", "/devices/d1/c2d", '{"body": "\\ud800"}', "unpaired UTF-16 surrogate"),
    ("POST", "/devices/d1/c2d", '{"body": "x", "properties": {"\\udfff": "v"}}', "surrogate"),
    ("POST", "/devices/d1/c2d", '{"body": "x", "message_id": "\\ud83d"}', "surrogate"),
    ("PATCH", "/devices/d1/twin/desired", '{"a": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("PATCH", "/devices/d1/twin/desired", '{"a": NaN}', "NaN is not valid JSON"),
    ("POST", "/devices", "\ufeff{}".encode("utf-8"), "not valid JSON"),
    ("POST", "/devices", b"\xff\xfe{}", "not UTF-8"),
], ids=["desired-array-100k", "desired-object-100k", "method-payload-100k", "method-payload-900",
        "desired-65", "fault-arg-100k", "c2d-body-surrogate", "c2d-property-surrogate", "c2d-id-surrogate",
        "huge-integer", "nan", "bom", "not-utf8"])
def test_malformed_bodies_get_400_and_nothing_on_stderr(hub, info, method, path, body, words):
    before = hub.stderr()
    faults = ok(info, "GET", "/faults")
    status, err, _ = api(info, method, path, raw=body if isinstance(body, bytes) else body.encode())
    assert status == 400, err
    assert words in err["error"]
    assert ok(info, "GET", "/faults") == faults
    assert hub.stderr() == before


def test_json_at_the_depth_limit_is_accepted(info, device):
    # a method payload, as twins have IoT Hub's own, smaller depth limit
    payload = json.loads(nested(63, '"deep"'))  # inside the request object: 64 levels
    result = ok(info, "POST", "/devices/d1/methods/deep", {"payload": payload, "timeout": 10})
    assert result == {"status": 200, "payload": {"echo": payload, "method": "deep"}}


@pytest.mark.parametrize("header,words", [
    ("Content-Length: +5", "invalid Content-Length '+5'"),
    ("Content-Length: 1_0", "invalid Content-Length '1_0'"),
    ("Content-Length: -1", "invalid Content-Length"),
    ("Content-Length: 99999999999999999999", "invalid Content-Length"),
    ("Content-Length: 2\r\nContent-Length: 2", "more than one Content-Length"),
], ids=["plus", "underscore", "negative", "huge", "twice"])
def test_malformed_content_length_gets_400(hub, info, header, words):
    before = hub.stderr()
    status, err = raw_request(info, f"POST /devices HTTP/1.1\r\n{header}", b"{}")
    assert status == 400 and words in err["error"], err
    assert hub.stderr() == before


@pytest.mark.parametrize("host_header,status,words", [
    ("evil.example:{port}", 421, "is not this control API"),
    ("evil.example", 421, "is not this control API"),
    ("{host}", 421, "is not this control API"),  # without the port
    ("{host}:1", 421, "is not this control API"),
    ("127.9.9.9:{port}", 421, "is not this control API"),
    (False, 400, "missing Host header"),
], ids=["rebound-name", "rebound-name-no-port", "no-port", "other-port", "other-address", "missing"])
def test_foreign_host_header_is_refused(info, host_header, status, words):
    host, port = control_address(info)
    if host_header:
        host_header = host_header.format(host=host, port=port)
    got, err = raw_request(info, "GET /devices HTTP/1.1", host=host_header)
    assert got == status and words in err["error"], err
    # refused before the token is even looked at
    got, err = raw_request(info, "POST /devices HTTP/1.1\r\nContent-Length: 2", b"{}", host=host_header, token=None)
    assert got == status, err


def test_two_host_headers_are_refused(info):
    host, port = control_address(info)
    got, err = raw_request(info, f"GET /devices HTTP/1.1\r\nHost: {host}:{port}", host=f"{host}:{port}")
    assert got == 400 and "more than one Host" in err["error"]


@pytest.mark.parametrize("name", ["{host}:{port}", "localhost:{port}", "LOCALHOST:{port}"])
def test_loopback_host_headers_are_served(info, name):
    host, port = control_address(info)
    got, result = raw_request(info, "GET /devices HTTP/1.1", host=name.format(host=host, port=port))
    assert got == 200 and "d1" in [d["device_id"] for d in result]


def trickle(sock, data, lines):
    """Send `data` and then one of `lines` every 0.2 s until the server answers or closes; what it
    sent, or None if every line went out without the server ending the request."""
    sock.sendall(data)
    for line in lines:
        # the wait paces the trickle: it is what a slow client does, not a synchronisation
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            return read_answer(sock)
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            return read_answer(sock)
    return None


@pytest.fixture(scope="module")
def quick_hub(tmp_path_factory):
    """A hub whose control API allows 1 s per request, so a deadline is reached in a test's time."""
    proc = HubProcess(tmp_path_factory.mktemp("quick"), "--port", "0", "--control-request-timeout", "1")
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


def test_request_trickling_its_headers_is_ended_by_the_deadline(quick_hub):
    info = quick_hub.info
    host, port = control_address(info)
    # every line arrives well within any per-read timeout; 150 of them span 30 s
    lines = [f"X-Slow-{i}: x\r\n".encode() for i in range(150)]
    with socket.create_connection((host, port), timeout=15) as s:
        answer = trickle(s, f"GET /devices HTTP/1.1\r\nHost: {host}:{port}\r\n".encode(), lines)
    assert answer is not None, "the server kept reading a request trickled over 30 s"
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"not complete within 1 s of its first byte" in answer
    assert ok(info, "GET", "/devices") == []  # and the API still serves
    assert quick_hub.stderr().count("\n") == 1, quick_hub.stderr()  # only the start-up line


def test_request_line_trickled_is_ended_by_the_deadline(quick_hub):
    host, port = control_address(quick_hub.info)
    with socket.create_connection((host, port), timeout=15) as s:
        answer = trickle(s, b"GET /dev", [b"i"] * 150)
    assert answer is not None, "the server kept reading a request line trickled over 30 s"
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert quick_hub.stderr().count("\n") == 1, quick_hub.stderr()


def test_request_trickling_its_body_is_ended_by_the_deadline(quick_hub):
    info = quick_hub.info
    host, port = control_address(info)
    head = (f"POST /devices HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {info['control_token']}\r\n"
            f"Content-Length: 1000\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=15) as s:
        answer = trickle(s, head, [b" "] * 150)
    assert answer is not None, "the server kept reading a body trickled over 30 s"
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert "Traceback" not in quick_hub.stderr()


def test_connections_beyond_the_limit_get_503_and_no_thread(quick_hub):
    info = quick_hub.info
    address = control_address(info)
    request = (f"GET /devices HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
               f"Authorization: Bearer {info['control_token']}\r\n\r\n").encode()
    held = []
    try:
        # each served once and kept open: then the server has taken up every one of them
        for _ in range(control.MAX_CONNECTIONS):
            s = socket.create_connection(address, timeout=15)
            held.append(s)
            s.sendall(request)
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 200
            resp.read()
        threads = len(os.listdir(f"/proc/{quick_hub.proc.pid}/task")) if os.path.isdir("/proc") else None
        for _ in range(100):
            with socket.create_connection(address, timeout=15) as extra:
                try:
                    extra.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    continue  # closed already: refused as well
                answer = read_answer(extra)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer
            if answer:
                assert b"limit of 64 connections" in answer
        if threads is not None:
            assert len(os.listdir(f"/proc/{quick_hub.proc.pid}/task")) <= threads
    finally:
        for s in held:
            s.close()
    # the slots come back as the held connections close
    deadline = time.monotonic() + 15
    while True:
        try:
            assert ok(info, "GET", "/devices") == []
            break
        except (urllib.error.URLError, ConnectionError, AssertionError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling interval while the server notices the closes
    assert "Traceback" not in quick_hub.stderr()


# --- files the standalone hub writes ----------------------------------------------------------------

def run_hub(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pytest_iotfailover.fakehub", "--port", "0", *args],
                          check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("existing", ["info.json", "info-ca.pem"])
def test_existing_files_are_never_replaced(tmp_path, existing):
    mine = tmp_path / existing
    mine.write_text("the user's own file\n")
    proc = run_hub(tmp_path, "--info-file", str(tmp_path / "info.json"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("iotfailover-hub: error:")
    assert f"{mine} already exists" in proc.stderr and "does not replace or remove" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert mine.read_text() == "the user's own file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_dangling_symlink_in_the_way_is_not_followed(tmp_path):
    (tmp_path / "info-ca.pem").symlink_to(tmp_path / "elsewhere.pem")
    proc = run_hub(tmp_path, "--info-file", str(tmp_path / "info.json"))
    assert proc.returncode == 2 and "info-ca.pem already exists" in proc.stderr, proc.stderr
    assert not (tmp_path / "elsewhere.pem").exists()
    assert (tmp_path / "info-ca.pem").is_symlink()


def test_a_file_replaced_while_the_hub_ran_is_left_alone(hub_factory):
    hub = hub_factory("--port", "0")
    ca_path = hub.info["ca_pem_path"]
    # somebody swaps their own file in under the hub's CA file name
    replacement = ca_path + ".new"
    with open(replacement, "w") as f:
        f.write("someone else's\n")
    os.replace(replacement, ca_path)
    assert hub.stop() == 0, hub.stderr()
    with open(ca_path) as f:
        assert f.read() == "someone else's\n"
    assert "left " + ca_path + " in place" in hub.stderr()
    assert not hub.info_path.exists()  # its own file it still removes


@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="reads /proc/<pid>/limits")
def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard descriptor limit {hard} leaves nothing to raise")

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    hub = HubProcess(tmp_path, "--port", "0")
    with open(hub.stdout_path, "wb") as out, open(hub.stderr_path, "wb") as err:
        hub.proc = subprocess.Popen([sys.executable, "-m", "pytest_iotfailover.fakehub", *hub.args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=low_soft_limit)  # noqa: PLW1509 - setrlimit only, before exec
    try:
        hub._wait_for_info()
        with open(f"/proc/{hub.proc.pid}/limits") as f:
            soft_now = next(line.split()[3] for line in f if line.startswith("Max open files"))
        expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert soft_now == expected or (hard == resource.RLIM_INFINITY and int(soft_now) > 256)
        assert hub.stop() == 0, hub.stderr()
    finally:
        hub.kill()


def test_the_former_module_path_still_starts_the_hub():
    # `python -m pytest_iotfailover.hub` is what earlier releases documented
    result = subprocess.run([sys.executable, "-m", "pytest_iotfailover.hub", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "iotfailover-hub" in result.stdout
    from pytest_iotfailover.fakehub import FakeHub
    from pytest_iotfailover.hub import FakeHub as Former
    assert Former is FakeHub
