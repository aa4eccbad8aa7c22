"""End to end: `iotfailover-hub` running out of file descriptors.

The hub runs as its own process under a low hard limit on open files, so a few dozen connections
use them all up. Devices then connect until the hub refuses one; the refusal must be prompt and
clean (a reset or an end of stream, never a handshake left hanging), a device connected before
keeps working, stderr carries at most one warning per second and no traceback, and the hub stops
on SIGTERM or SIGINT with exit status 0.
"""
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from azure.iot.device import IoTHubDeviceClient, Message
from mqttclient import MqttClient, connect
from sdk_support import bounded

from pytest_iotfailover.connstr import parse_connection_string
from pytest_iotfailover.fakehub.certs import client_context
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.redaction import remember, remember_keys_of
from pytest_iotfailover.sas import make_sas_token

resource = pytest.importorskip("resource")  # POSIX only

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor limits")]

# A hub at rest holds about twenty descriptors (listener, control API, threads' wake-ups, std
# streams), so 64 runs out after a few dozen devices. The soft limit starts lower, for the hub to
# raise it to the hard one as it does for any start.
SOFT_LIMIT, HARD_LIMIT = 40, 64
DEVICES = 80               # more than can ever connect under HARD_LIMIT
START_TIMEOUT = 30.0
# How long one connection may take to be served or refused: asyncio retries a failed accept after
# a second, so a refusal takes up to that, plus whatever this busy machine adds.
ANSWER_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
WARNING = "out of descriptors, new connections are refused"


def _loops():
    loops = [pytest.param("asyncio", signal.SIGTERM, id="asyncio-SIGTERM"),
             pytest.param("asyncio", signal.SIGINT, id="asyncio-SIGINT")]
    try:
        import uvloop  # noqa: F401
        loops.append(pytest.param("uvloop", signal.SIGTERM, id="uvloop-SIGTERM"))
    except ImportError:
        loops.append(pytest.param("uvloop", signal.SIGTERM, id="uvloop-SIGTERM",
                                  marks=pytest.mark.skip(reason="uvloop is not installed ([fast] extra)")))
    return loops


def _low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, HARD_LIMIT))


class _Hub:
    """The hub process, and what tests/mqttclient.py needs to know of a hub to dial it."""

    def __init__(self, tmp_path, loop: str):
        self.info_path = tmp_path / "info.json"
        self.stderr_path = tmp_path / "hub.err"
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < HARD_LIMIT:
            pytest.skip(f"hard descriptor limit {hard} is below {HARD_LIMIT}")
        args = [sys.executable, "-m", "pytest_iotfailover.fakehub", "--info-file", str(self.info_path),
                "--loop", loop, "--tier", "none"]  # unthrottled: a refusal here is the descriptors'
        for i in range(DEVICES):
            args += ["--device", f"dev{i}"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_low_limit)  # noqa: PLW1509 - setrlimit only, before exec
        self.started_at = time.monotonic()
        try:
            self.info = self._wait_for_info()
        except BaseException:
            self.kill()
            raise
        remember(self.info["control_token"])
        remember_keys_of(*self.info["devices"].values())
        self.hostname = self.info["hostname"]
        self.gateway_host = self.info["gateway_host"]
        self.port = self.info["port"]
        self.certificates = self  # mqttclient asks hub.certificates.client_context()
        with open(self.info["ca_pem_path"]) as f:
            self.ca_pem = f.read()

    def _wait_for_info(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.info_path.exists():
                return json.loads(self.info_path.read_text())
            if self.proc.poll() is not None:
                pytest.fail(f"hub exited with {self.proc.returncode} before listening: {self.stderr()}")
            time.sleep(0.02)  # polling interval: the info file appearing is the only readiness signal
        pytest.fail(f"no info file within {START_TIMEOUT:g} s; stderr: {self.stderr()}")

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca_pem)

    def password(self, device_id: str) -> str:
        key = parse_connection_string(self.info["devices"][device_id])["SharedAccessKey"]
        return make_sas_token(f"{self.hostname}/devices/{device_id}", key)

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def kill(self) -> None:
        """Finalizer: never leave a hub behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


@pytest.fixture
def clients():
    opened: list[MqttClient] = []
    yield opened
    for c in opened:
        c.close()


@pytest.fixture
def start_hub(tmp_path):
    """Starts the hub; whatever the test did, its process is gone at teardown."""
    started: list[_Hub] = []

    def start(loop: str) -> _Hub:
        started.append(_Hub(tmp_path, loop))
        return started[-1]
    yield start
    for hub in started:
        hub.kill()


def _dial(hub: _Hub, device_id: str) -> MqttClient | None:
    """A connected, authenticated client; None when the hub refuses the connection."""
    try:
        client = connect(hub, device_id, password=hub.password(device_id), timeout=ANSWER_TIMEOUT)
    except (ConnectionError, ssl.SSLError) as exc:
        # a reset, or the stream ended in the handshake or before CONNACK: a clean refusal
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            raise
        return None
    except TimeoutError:
        pytest.fail(f"the hub neither served nor refused {device_id} within {ANSWER_TIMEOUT:g} s "
                    "(a connection left hanging in the listen backlog)")
    assert client.connack.return_code == 0, f"{device_id}: CONNACK {client.connack.return_code}"
    return client


def _fill_up(hub: _Hub, clients: list[MqttClient], first: int) -> int:
    """Connect devices from dev<first> on until the hub refuses one; that one's number."""
    for i in range(first, DEVICES):
        client = _dial(hub, f"dev{i}")
        if client is None:
            return i
        clients.append(client)
    pytest.fail(f"{DEVICES - first} devices connected under a hard limit of {HARD_LIMIT} descriptors; "
                "the hub was never refused one")


def _sdk_client(hub: _Hub, device_id: str) -> IoTHubDeviceClient:
    return IoTHubDeviceClient.create_from_connection_string(
        hub.info["devices"][device_id], server_verification_cert=hub.ca_pem, keep_alive=5,
        connection_retry_interval=1)


def _dial_until_served(hub: _Hub, device_id: str) -> MqttClient:
    """Dial until the hub serves the device: it frees a closed connection's descriptor only when
    it has seen the close, which may come after the next dial."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while time.monotonic() < deadline:
        client = _dial(hub, device_id)
        if client is not None:
            return client
    pytest.fail(f"the hub still refused {device_id} {ANSWER_TIMEOUT:g} s after connections closed")


def _wait_for_warning(hub: _Hub) -> None:
    """Until stderr says the hub is out of descriptors (on uvloop the hub looks once a second)."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while WARNING not in hub.stderr():
        if time.monotonic() > deadline:
            pytest.fail(f"nothing on stderr says the hub ran out of descriptors: {hub.stderr()[-3000:]}")
        time.sleep(0.05)  # polling interval: stderr is a file


def _assert_control_api_refuses(hub: _Hub) -> None:
    """At the limit the control API turns a client away at once too, rather than leaving it waiting
    (and itself spinning on the connection it cannot accept)."""
    host, port = hub.info["control_url"][len("http://"):].rsplit(":", 1)
    try:
        # on loopback the reset may come before connect() returns
        with socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT) as sock:
            sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            answer = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return
    except TimeoutError:
        pytest.fail(f"the control API neither answered nor refused within {ANSWER_TIMEOUT:g} s at the limit")
    assert answer == b"", f"the control API answered at the limit: {answer[:200]!r}"


def _api(hub: _Hub, path: str):
    import urllib.request
    req = urllib.request.Request(hub.info["control_url"] + path,
                                 headers={"Authorization": f"Bearer {hub.info['control_token']}"})
    with urllib.request.urlopen(req, timeout=ANSWER_TIMEOUT) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("loop, stop_signal", _loops())
def test_hub_out_of_descriptors_refuses_new_devices_and_serves_connected_ones(start_hub, clients, loop,
                                                                                stop_signal):
    hub = start_hub(loop)
    sdk = _sdk_client(hub, "dev0")
    try:
        bounded(sdk.connect, timeout=ANSWER_TIMEOUT)
        refused = _fill_up(hub, clients, first=1)
        assert clients, "not one raw device connected beside the SDK client"

        # connected devices are still served while new ones are turned away
        bounded(sdk.send_message, Message("at the limit", message_id="at-limit"), timeout=ANSWER_TIMEOUT)
        clients[0].ping(timeout=ANSWER_TIMEOUT)
        assert _dial(hub, f"dev{refused}") is None, "a second try at the limit was not refused"
        assert clients[-1].publish(f"devices/dev{refused - 1}/messages/events/", b"x") is not None
        assert clients[-1].expect(p.PUBACK, ANSWER_TIMEOUT)
        _wait_for_warning(hub)
        _assert_control_api_refuses(hub)

        # descriptors freed: the hub accepts again (its accept loop survived the shortage)
        for _ in range(3):
            gone = clients.pop()
            gone.disconnect()
            gone.close()
        clients.append(_dial_until_served(hub, f"dev{refused}"))
        assert "at-limit" in [t["message_id"] for t in _api(hub, "/telemetry?device_id=dev0")]
        connects = [e for e in _api(hub, "/events?device_id=dev0") if e["kind"] == "connect"]
        assert len(connects) == 1, f"the SDK client was connected {len(connects)} times: it lost its connection"
    finally:
        try:
            bounded(sdk.shutdown, timeout=ANSWER_TIMEOUT)
        except TimeoutError:
            pass  # a stuck SDK thread is a daemon; the hub is checked below either way
    hub.proc.send_signal(stop_signal)
    code = hub.proc.wait(STOP_TIMEOUT)
    ran_for = time.monotonic() - hub.started_at
    err = hub.stderr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    warnings = [line for line in err.splitlines() if "EMFILE" in line or "Too many open files" in line]
    assert len(warnings) <= 1 + ran_for, f"{len(warnings)} descriptor warnings in {ran_for:.0f} s"
    assert not os.path.exists(hub.info_path), "the hub left its info file behind"
