"""The control API's device routes: bulk create (`POST /devices` with `device_ids`) and
`DELETE /devices/{id}`, through the tier's registry throttle, and the standalone client's
`add_devices`, `remove_device` and `feedback`. Raw HTTP against an in-process ControlServer,
the unmodified SDK where a device is involved, and one StandaloneHub process."""
import http.client
import json
from urllib.parse import urlsplit

import pytest
from azure.iot.device import exceptions
from sdk_support import bounded, make_client, wait_until

from pytest_iotfailover import FakeHub
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.fakehub.control_api import ControlServer
from pytest_iotfailover.fakehub.process import StandaloneHub

pytestmark = pytest.mark.timeout(90)


def call(control, method, path, obj=None, *, token=...):
    url = urlsplit(control.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {} if token is None else {"Authorization": f"Bearer {control.token if token is ... else token}"}
    body = None
    if obj is not None:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
    finally:
        conn.close()


@pytest.fixture
def served():
    # S3: the registry throttle admits every call here at once, so the counts below are calls
    with FakeHub("ctlhub", tier="S3") as hub, ControlServer(hub) as control:
        yield hub, control


def _registry_calls(hub):
    stats = hub.throttle_stats()["registry_operation"]
    return stats.admitted + stats.delayed + stats.rejected


def test_bulk_create_makes_every_device_in_one_registry_call(served):
    hub, control = served
    status, answer, _ = call(control, "POST", "/devices", {"device_ids": ["b1", "b2", "b3"]})
    assert status == 201
    assert [d["device_id"] for d in answer["devices"]] == ["b1", "b2", "b3"]
    assert all(f"DeviceId={d['device_id']};" in d["connection_string"] for d in answer["devices"])
    assert sorted(d.device_id for d in hub.devices) == ["b1", "b2", "b3"]
    assert _registry_calls(hub) == 1
    assert not [e for e in hub.events if e.kind == "throttle_delay"]  # within the burst: at once


@pytest.mark.parametrize("body, status, words", [
    ({"device_ids": []}, 400, "1 to 100 ids"),
    ({"device_ids": [f"d{i}" for i in range(101)]}, 400, "1 to 100 ids"),
    ({"device_ids": "b1"}, 400, "'device_ids' must be an array"),
    ({"device_ids": ["ok", "a/b"]}, 400, "device_ids[1]: invalid device id"),
    ({"device_ids": ["ok", 7]}, 400, "device_ids[1]: invalid device id"),
    ({"device_ids": ["x", "x"]}, 400, "more than once"),
    ({"device_ids": ["new", "taken"]}, 409, "'taken' already exist"),
    ({"device_ids": ["new"], "device_id": "new"}, 400, "unknown field 'device_id'"),
], ids=["empty", "over-100", "not-a-list", "bad-id", "not-a-string", "repeated", "taken", "both-forms"])
def test_a_bad_bulk_create_names_the_problem_creates_nothing_and_books_nothing(served, body, status, words):
    hub, control = served
    hub.add_device("taken", throttle=False)
    got, answer, _ = call(control, "POST", "/devices", body)
    assert got == status and words in answer["error"], answer
    assert [d.device_id for d in hub.devices] == ["taken"]
    assert _registry_calls(hub) == 0


def test_delete_removes_the_identity_and_disconnects_the_sdk_client(served):
    hub, control = served
    dev = hub.add_device("gone", throttle=False)
    client = make_client(hub, dev, connection_retry=False)
    try:
        bounded(client.connect)
        status, answer, _ = call(control, "DELETE", "/devices/gone")
        assert (status, answer) == (200, {"device_id": "gone"})
        assert hub.registry.get("gone") is None
        hub.wait_for_event("disconnect", "gone", where=lambda e: e.detail["reason"] == "device_removed")
        assert _registry_calls(hub) == 1
        # a second delete: 404 at once, no registry call booked
        status, answer, _ = call(control, "DELETE", "/devices/gone")
        assert status == 404 and "no device 'gone'" in answer["error"]
        assert _registry_calls(hub) == 1
    finally:
        try:
            bounded(client.shutdown)
        except exceptions.ClientError:
            pass  # the hub closed the connection; the SDK may say so when it shuts down


def test_delete_follows_the_apis_conventions(served):
    hub, control = served
    hub.add_device("odd:id?x=1", throttle=False)
    assert call(control, "DELETE", "/devices/odd%3Aid%3Fx%3D1")[:2] == (200, {"device_id": "odd:id?x=1"})
    status, _, headers = call(control, "GET", "/devices/whatever")
    assert status == 405 and headers["Allow"] == "DELETE"
    status, answer, _ = call(control, "DELETE", "/devices/x?force=1")
    assert status == 400 and "unknown query parameter 'force'" in answer["error"]
    hub.add_device("kept", throttle=False)
    for token in (None, "wrong"):
        status, _, _ = call(control, "DELETE", "/devices/kept", token=token)
        assert status == 401
    status, _, _ = call(control, "POST", "/devices", {"device_ids": ["z"]}, token=None)
    assert status == 401
    assert hub.registry.get("kept") is not None and hub.registry.get("z") is None


def test_delete_and_bulk_create_are_refused_with_503001_during_a_failover(served):
    hub, control = served
    hub.add_device("d", throttle=False)
    failover = hub.faults.region_failover(outage=60)
    try:
        for method, path, body in (("DELETE", "/devices/d", None), ("POST", "/devices", {"device_ids": ["n"]})):
            status, answer, _ = call(control, method, path, body)
            assert (status, answer["error_code"]) == (503, 503001), answer
    finally:
        failover.cancel()
    assert hub.registry.get("d") is not None and hub.registry.get("n") is None


def test_the_standalone_client_adds_in_bulk_removes_and_reads_feedback():
    with StandaloneHub("--tier", "S3") as standalone:
        ids = [f"s{i:03}" for i in range(150)]
        devices = standalone.add_devices(ids)  # two bulk requests: 100 + 50
        assert list(devices) == ids and all(f"DeviceId={i};" in devices[i] for i in ids)
        events = standalone.request("GET", "/events")
        assert not [e for e in events if e["kind"] == "throttled"]
        standalone.remove_device("s000")
        listed = {d["device_id"] for d in standalone.request("GET", "/devices")}
        assert listed == set(ids[1:])
        with pytest.raises(HubOperationError, match="HTTP 404: no device 's000'"):
            standalone.remove_device("s000")
        # an already expired message with negative feedback: Expired, readable through GET /feedback
        sent = standalone.request("POST", "/devices/s001/c2d", {"body": "late", "ttl": 0, "ack": "negative"})
        records = wait_until(lambda: standalone.feedback(device_id="s001"), 20, "feedback for s001")
        assert [(r["originalMessageId"], r["statusCode"]) for r in records] == [(sent["message_id"], "Expired")]
        assert standalone.feedback(message_id=sent["message_id"]) == records
        assert standalone.feedback(device_id="s002") == []
