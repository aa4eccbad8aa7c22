"""Real-hub failover through ARM, against a loopback HTTPS stand-in for Azure Resource Manager.

The real `azure.mgmt.iothub.IotHubClient` runs unmodified (pipeline, bearer-token policy, LRO
poller); only the credential is a stub, since no Azure AD exists here. The stand-in speaks TLS
with a trustme CA because azure-core sends bearer tokens over https only.
"""
import json
import ssl
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
from azure.core.credentials import AccessToken

from pytest_iotfailover.backends.real.arm import (
    ArmFailover,
    ArmFailoverError,
    ArmFailoverHandle,
    FailoverInProgress,
    FailoverNotAllowed,
    FailoverQuotaExceeded,
    format_utc,
)
from pytest_iotfailover.model import RecoveryReport

pytestmark = pytest.mark.timeout(15)

SUB = "00000000-1111-2222-3333-444444444444"
RG = "rg-failover"
HUB = "myhub"
FAKE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.fake-arm-bearer-token.c2lnbmF0dXJlLXNlY3JldA"
T0 = 1_700_000_000.0
HOUR = 3600.0
HUB_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Devices/IotHubs/{HUB}"


class FakeCredential:
    def __init__(self):
        self.scopes = []

    def get_token(self, *scopes, **kwargs):
        self.scopes.append(scopes)
        return AccessToken(FAKE_TOKEN, int(time.time()) + 3600)


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


class ArmStub:
    """Just enough of ARM: the hub resource, its failover action and the async operation status."""

    def __init__(self, ca: trustme.CA):
        self.lock = threading.Lock()
        self.requests = []
        self.hub = {"primary": "westeurope", "secondary": "northeurope", "state": "Active",
                    "provisioningState": "Succeeded"}
        self.running_polls = 2          # "Running" answers before the outcome
        self.gate = None                # if set: "Running" also until this event is set
        self.fail_with = None           # an ARM error object: the operation ends Failed with it
        self.reject_post = None         # (status, error object): the POST itself is refused
        self.ops = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go out in two writes
            timeout = 5

            def log_message(self, *args):
                pass

            def _reply(self, status, body=None, headers=()):
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with stub.lock:
                    stub.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                          "body": json.loads(raw) if raw else None,
                                          "authorization": self.headers.get("Authorization")})
                status, body, headers = stub.route(method, url.path)
                self._reply(status, body, headers)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def hub_json(self):
        h = self.hub
        return {"id": HUB_PATH, "name": HUB, "type": "Microsoft.Devices/IotHubs", "location": h["primary"],
                "sku": {"name": "S1", "tier": "Standard", "capacity": 1},
                "properties": {"state": h["state"], "provisioningState": h["provisioningState"],
                               "hostName": f"{HUB}.azure-devices.net",
                               "locations": [{"location": h["primary"], "role": "primary"},
                                             {"location": h["secondary"], "role": "secondary"}]}}

    def route(self, method, path):
        with self.lock:
            if method == "GET" and path == HUB_PATH:
                return 200, self.hub_json(), ()
            if method == "POST" and path == HUB_PATH + "/failover":
                if self.reject_post:
                    status, error = self.reject_post
                    return status, {"error": error}, ()
                op_id = f"op{len(self.ops) + 1}"
                self.ops[op_id] = {"polls": 0, "done": False}
                status_url = (f"{self.url}/subscriptions/{SUB}/providers/Microsoft.Devices/locations/"
                              f"{self.hub['primary']}/operationsStatus/{op_id}?api-version=2023-06-30")
                result_url = f"{self.url}{HUB_PATH}/operationResults/{op_id}?api-version=2023-06-30"
                return 202, None, (("Azure-AsyncOperation", status_url), ("Location", result_url))
            op_id = path.rsplit("/", 1)[-1]
            if method == "GET" and "/operationsStatus/" in path and op_id in self.ops:
                op = self.ops[op_id]
                op["polls"] += 1
                if op["polls"] <= self.running_polls or (self.gate and not self.gate.is_set()):
                    return 200, {"status": "Running"}, ()
                if self.fail_with:
                    return 200, {"status": "Failed", "error": self.fail_with}, ()
                if not op["done"]:
                    op["done"] = True
                    self.hub["primary"], self.hub["secondary"] = self.hub["secondary"], self.hub["primary"]
                return 200, {"status": "Succeeded"}, ()
            if method == "GET" and "/operationResults/" in path and op_id in self.ops:
                return 200, {}, ()
            return 404, {"error": {"code": "NotFound", "message": f"no {method} {path} here"}}, ()

    def seen(self, method=None, suffix=None):
        with self.lock:
            return [r for r in self.requests if (method is None or r["method"] == method)
                    and (suffix is None or r["path"].endswith(suffix))]


@pytest.fixture
def stub(ca, monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    s = ArmStub(ca)
    yield s
    s.close()


@pytest.fixture
def make(stub, ca_file):
    made = []

    def make(**kw):
        kw.setdefault("allowed_hub", HUB)
        kw.setdefault("credential", FakeCredential())
        kw.setdefault("poll_interval", 0.02)
        af = ArmFailover(subscription_id=SUB, resource_group=RG, hub_name=HUB, base_url=stub.url,
                         client_options={"connection_verify": ca_file, "retry_total": 0}, **kw)
        made.append(af)
        return af

    yield make
    for af in made:
        af.close()


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def failover_bodies(stub):
    return [r["body"] for r in stub.seen("POST", "/failover")]


# --- the operation itself ----------------------------------------------------------------------

def test_failover_posts_the_secondary_and_polls_until_succeeded(stub, make):
    lines = []
    stub.running_polls = 4
    stub.gate = threading.Event()

    def progress(line):
        lines.append(line)
        if "state Running" in line:
            stub.gate.set()     # so a loaded machine cannot finish the polls before a line is due

    af = make(progress=progress)
    handle = af.failover()
    assert isinstance(handle, ArmFailoverHandle)
    assert handle.kind == "region_failover" and handle.device_id is None
    assert handle.state == "active" or stub.ops["op1"]["done"]
    assert handle.wait(timeout=10) is handle
    assert handle.state == "ended" and handle.ended_at >= handle.started_at

    get, post = stub.requests[0], stub.requests[1]
    assert (get["method"], get["path"]) == ("GET", HUB_PATH)
    assert (post["method"], post["path"]) == ("POST", HUB_PATH + "/failover")
    assert post["body"] == {"failoverRegion": "northeurope"}
    assert post["query"]["api-version"] == ["2023-06-30"]
    assert all(r["authorization"] == f"Bearer {FAKE_TOKEN}" for r in stub.requests)
    polls = stub.seen("GET", "/operationsStatus/op1")
    assert len(polls) >= 5                                  # Running x4 at least, then Succeeded
    assert stub.seen("GET", "/operationResults/op1")        # the final GET of a POST LRO

    running = [line for line in lines if "state Running" in line]
    assert running, lines
    assert len(running) <= len(polls)                       # at most one line per poll
    assert all(line.startswith("failover of myhub: ") and " elapsed, " in line for line in running)
    assert "done after" in lines[-1] and "Succeeded" in lines[-1]

    assert handle.params == {"operation": "failover", "hub": HUB, "from": "westeurope", "to": "northeurope"}
    report = handle.report()
    assert isinstance(report, RecoveryReport)
    assert (report.fault, report.target, report.devices) == ("region_failover", None, {})
    assert (report.started_at, report.ended_at) == (handle.started_at, handle.ended_at)
    assert [(h["kind"], h["hub"]) for h in af.history] == [("failover", HUB)]
    assert af.history[0]["ended_at"] == handle.ended_at


def test_an_unknown_hub_is_a_readable_error(stub, ca_file):
    af = ArmFailover(subscription_id=SUB, resource_group=RG, hub_name="nohub", allowed_hub="nohub",
                     credential=FakeCredential(), base_url=stub.url, client_options={"connection_verify": ca_file})
    try:
        with pytest.raises(ArmFailoverError) as exc:
            af.failover()
    finally:
        af.close()
    text = str(exc.value)
    assert "cannot read IoT hub 'nohub'" in text and "HTTP 404" in text and "NotFound" in text
    assert FAKE_TOKEN not in full_text(exc.value)
    assert not stub.seen("POST")


def test_locations_come_from_the_hub_resource(stub, make):
    af = make()
    assert af.locations() == ("westeurope", "northeurope")
    stub.hub["primary"], stub.hub["secondary"] = "northeurope", "westeurope"
    assert af.locations() == ("northeurope", "westeurope")
    assert [r["method"] for r in stub.requests] == ["GET", "GET"]


def test_failback_targets_the_original_primary_and_counts_separately(stub, make):
    clock = Clock()
    af = make(clock=clock)
    af.failover().wait(10)
    assert af.locations() == ("northeurope", "westeurope")

    clock.now += HOUR + 1
    handle = af.failback()
    assert handle.params["to"] == "westeurope" and handle.operation == "failback"
    handle.wait(10)
    assert failover_bodies(stub) == [{"failoverRegion": "northeurope"}, {"failoverRegion": "westeurope"}]
    assert [h["kind"] for h in af.history] == ["failover", "failback"]

    # one failover and one failback so far: each kind still has one left today
    clock.now += HOUR + 1
    af.failover().wait(10)
    clock.now += HOUR + 1
    af.failback().wait(10)
    assert [h["kind"] for h in af.history] == ["failover", "failback", "failover", "failback"]


def test_failback_with_nothing_to_undo_sends_nothing(stub, make):
    af = make()
    with pytest.raises(ArmFailoverError, match="nothing to fail back"):
        af.failback()
    assert not stub.seen("POST")


def test_a_second_failover_without_failback_is_refused(stub, make):
    clock = Clock()
    af = make(clock=clock)
    af.failover().wait(10)
    clock.now += 2 * HOUR
    with pytest.raises(ArmFailoverError, match="already failed over.*failback"):
        af.failover()
    assert len(failover_bodies(stub)) == 1


def test_wait_times_out_and_cancel_is_impossible(stub, make):
    stub.running_polls = 10 ** 9
    af = make()
    handle = af.failover()
    # ARM answers Running a billion times: only a wait that honours its own 0.3 s timeout can
    # return at all within this test's timeout, so no clock is read here
    with pytest.raises(TimeoutError, match="still Running.*cannot cancel") as exc:
        handle.wait(timeout=0.3)
    assert handle.state == "active"
    with pytest.raises(RuntimeError, match="cannot be cancelled"):
        handle.cancel()
    stub.running_polls = 0
    handle.wait(10)
    assert handle.state == "ended"
    assert FAKE_TOKEN not in full_text(exc.value)


# --- failures ----------------------------------------------------------------------------------

def test_a_failed_operation_raises_the_arm_error(stub, make):
    stub.fail_with = {"code": "IotHubFailoverFailed", "message": "The secondary region is not available now."}
    af = make()
    handle = af.failover()
    with pytest.raises(ArmFailoverError) as exc:
        handle.wait(10)
    text = str(exc.value)
    assert "failover of myhub failed" in text
    assert "IotHubFailoverFailed" in text and "The secondary region is not available now." in text
    assert exc.value.code == "IotHubFailoverFailed"
    assert handle.state == "failed" and handle.ended_at is not None
    assert FAKE_TOKEN not in full_text(exc.value)
    # ARM accepted it: it counts against the day's quota all the same
    assert af.history[0]["kind"] == "failover" and af.history[0]["outcome"] == "failed"


def test_a_rejected_post_raises_and_is_not_recorded(stub, make):
    stub.reject_post = (400, {"code": "FailoverNotAllowedInRegion",
                              "message": "Manual failover is not supported for this hub."})
    af = make()
    with pytest.raises(ArmFailoverError) as exc:
        af.failover()
    text = str(exc.value)
    assert "did not accept the failover" in text and "HTTP 400" in text
    assert "Manual failover is not supported for this hub." in text
    assert FAKE_TOKEN not in full_text(exc.value)
    assert af.history == []


@pytest.mark.parametrize("state, provisioning", [("FailingOver", "Succeeded"), ("Active", "Transitioning"),
                                                 ("Transitioning", "Updating")])
def test_a_hub_in_transition_is_refused(stub, make, state, provisioning):
    stub.hub.update(state=state, provisioningState=provisioning)
    af = make()
    with pytest.raises(FailoverInProgress, match="not ready for a failover") as exc:
        af.failover()
    assert (state if state != "Active" else provisioning) in str(exc.value)
    assert not stub.seen("POST") and af.history == []


# --- opt-in ------------------------------------------------------------------------------------

@pytest.mark.parametrize("allowed", [None, "", "otherhub"])
def test_failover_is_opt_in_per_hub(stub, make, allowed):
    af = make(allowed_hub=allowed)
    for op in (af.failover, af.failback):
        with pytest.raises(FailoverNotAllowed) as exc:
            op()
        text = str(exc.value)
        assert "--iothub-allow-failover=myhub" in text
        for cost in ("10 minutes to 2 hours", "2 failovers and 2 failbacks a day", "1 h apart",
                     "reconnect", "Event Hub"):
            assert cost in text
        if allowed == "otherhub":
            assert "'otherhub'" in text
        assert FAKE_TOKEN not in full_text(exc.value)
    assert stub.requests == []
    assert af._credential is not None and af._client is None   # nothing was even set up


def test_the_allowed_name_is_case_insensitive(stub, make):
    af = make(allowed_hub="MyHub")
    af.check_allowed()
    af.failover().wait(10)
    assert failover_bodies(stub) == [{"failoverRegion": "northeurope"}]


def test_the_default_credential_is_created_only_when_needed(stub):
    af = ArmFailover(subscription_id=SUB, resource_group=RG, hub_name=HUB, base_url=stub.url)
    with pytest.raises(FailoverNotAllowed):
        af.failover()
    assert af._credential is None


# --- the quota guard ---------------------------------------------------------------------------

def test_a_third_failover_in_24h_is_refused_with_the_next_allowed_time(stub, make):
    clock = Clock()
    af = make(clock=clock)
    for step in range(4):       # failover, failback, failover, failback, 2 h apart
        (af.failover if step % 2 == 0 else af.failback)().wait(10)
        clock.now += 2 * HOUR
    assert len(failover_bodies(stub)) == 4

    with pytest.raises(FailoverQuotaExceeded) as exc:
        af.failover()
    text = str(exc.value)
    assert "3rd failover" in text and "2 failovers and 2 failbacks a day" in text
    assert exc.value.next_allowed == T0 + 24 * HOUR
    assert format_utc(T0 + 24 * HOUR) in text and text.endswith("UTC.")
    assert "2023-11-15 22:13:20 UTC" in text        # T0 + 24 h, spelled out
    with pytest.raises(FailoverQuotaExceeded, match="3rd failback"):
        af.failback()
    assert len(failover_bodies(stub)) == 4 and len(stub.seen("GET", HUB)) == 4

    # once the first failover is 24 h old, one more is allowed
    clock.now = T0 + 24 * HOUR + 1
    af.failover().wait(10)
    assert [h["kind"] for h in af.history] == ["failback", "failover", "failback", "failover"]


def test_an_operation_within_an_hour_of_the_previous_is_refused(stub, make):
    clock = Clock()
    af = make(clock=clock)
    af.failover().wait(10)
    clock.now = T0 + 30 * 60
    with pytest.raises(FailoverQuotaExceeded) as exc:
        af.failback()
    text = str(exc.value)
    assert "at least 1 h" in text and format_utc(T0 + HOUR) in text
    assert exc.value.next_allowed == T0 + HOUR and "1 h" in exc.value.limit
    assert len(failover_bodies(stub)) == 1
    clock.now = T0 + HOUR
    af.failback().wait(10)
    assert len(failover_bodies(stub)) == 2


def test_the_gap_counts_from_the_end_of_a_long_operation(stub, make):
    clock = Clock()
    af = make(clock=clock)
    handle = af.failover()
    clock.now = T0 + 2 * HOUR          # ARM took two hours
    handle.wait(10)
    assert handle.ended_at == T0 + 2 * HOUR
    clock.now = T0 + 2.5 * HOUR
    with pytest.raises(FailoverQuotaExceeded) as exc:
        af.failback()
    assert exc.value.next_allowed == T0 + 3 * HOUR


def test_entries_older_than_24h_are_pruned(stub, make):
    store = {}
    old = [{"kind": kind, "started_at": T0 - 25 * HOUR + i, "ended_at": T0 - 24.5 * HOUR, "hub": HUB}
           for i, kind in enumerate(["failover", "failover", "failback", "failback"])]
    store[f"iotfailover/arm/{HUB}"] = {"ops": old}
    clock = Clock()
    af = make(clock=clock, state_store=store)
    assert af.history == []
    af.failover().wait(10)
    kept = store[f"iotfailover/arm/{HUB}"]["ops"]
    assert [(op["kind"], op["started_at"]) for op in kept] == [("failover", T0)]


class DictStore:
    """Anything with get(key, default) / set(key, value), JSON values, like pytest's cache."""

    def __init__(self):
        self.data = {}

    def get(self, key, default):
        return json.loads(self.data[key]) if key in self.data else default

    def set(self, key, value):
        self.data[key] = json.dumps(value)


def test_state_persists_across_instances_through_the_store(stub, make):
    store, clock = DictStore(), Clock()
    make(clock=clock, state_store=store).failover().wait(10)
    assert list(store.data) == ["iotfailover/arm/myhub"]

    clock.now += HOUR + 1
    second = make(clock=clock, state_store=store)
    assert [h["kind"] for h in second.history] == ["failover"]
    handle = second.failback()       # it knows the original primary from the store
    assert handle.params["to"] == "westeurope"
    handle.wait(10)

    clock.now += 10 * 60
    third = make(clock=clock, state_store=store)
    with pytest.raises(FailoverQuotaExceeded, match="at least 1 h"):
        third.failover()


def test_state_persists_in_the_pytest_cache(stub, make, pytestconfig):
    cache = getattr(pytestconfig, "cache", None)
    if cache is None:
        pytest.skip("pytest's cache is disabled (-p no:cacheprovider)")
    key = f"iotfailover/arm/{HUB}"
    saved = cache.get(key, None)
    cache.set(key, None)
    try:
        clock = Clock(time.time())
        make(clock=clock, state_store=cache).failover().wait(10)
        entry = cache.get(key, None)
        assert entry["original_primary"] == "westeurope"
        assert [op["kind"] for op in entry["ops"]] == ["failover"]
        clock.now += 5 * 60
        with pytest.raises(FailoverQuotaExceeded):
            make(clock=clock, state_store=cache).failback()
    finally:
        cache.set(key, saved)
