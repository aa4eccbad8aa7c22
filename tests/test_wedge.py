"""Clients that die silently: paho's network thread ends with ssl.SSLEOFError, the SDK still says
it is connected, and nothing it sends is acknowledged again.

The death is produced on purpose, with the real SDK client, by the reset timing that triggers it:
a man-in-the-middle proxy between the client and the FakeHub answers a connection with CONNACK and
resets it at once, while the client holds an unacknowledged QoS 1 publish. paho re-sends that
publish from inside its CONNACK handler, the write fails with SSLEOFError, which paho does not
catch, and its network thread ends (pytest_iotfailover/wedge.py explains the path).
"""
import collections
import logging
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import pytest
from azure.iot.device import IoTHubDeviceClient, Message
from sdk_support import bounded

from pytest_iotfailover import DevicePool, FakeHub, Outbox, wedge
from pytest_iotfailover.fakehub.server import HubServer
from pytest_iotfailover.iothub.mqtt import Decoder, encode
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.plugin import reporting
from pytest_iotfailover.plugin.factory import make_client, shutdown_quietly, wedges_of

# The death is reproduced on Python 3.11 and 3.12; on 3.13 the same reset after CONNACK left paho
# 1.6's network thread alive in our runs (the reset surfaces differently in its write path), so
# there is no wedge to reproduce there.
_NO_WEDGE_HERE = pytest.mark.skipif(sys.version_info >= (3, 13),
                                    reason="the reset after CONNACK does not kill paho's thread on Python 3.13")
# the deliberate deaths of paho's thread are reported by threading.excepthook; expected here
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

# Unthreaded TLS reads need an upper bound; a healthy SDK client answers within milliseconds.
_IO_TIMEOUT = 30.0


class ProxiedDevice(NamedTuple):
    device_id: str
    connection_string: str


class HostileProxy:
    """A TLS-terminating proxy on its own loopback address (port 8883) in front of a FakeHub.

    Each new client connection takes the next step of `plan` (then "forward"):
    * "forward": relay bytes both ways to the hub;
    * "swallow": answer CONNECT with CONNACK itself, read (never acknowledge) until the first
      PUBLISH, then reset the connection: the client is left with an unacknowledged publish;
    * "connack_reset": answer CONNECT with CONNACK (session present) and reset at once: the client
      is writing its re-sent publishes when the reset hits it.

    The death is a race: when the reset reaches the client before paho has read the CONNACK, paho
    sees a plain ECONNRESET, reconnects as usual and its thread lives. `connack_reset_until(dead)`
    answers every further connection with "connack_reset" until `dead()` holds, so a test waits
    for the death rather than hoping for it on the first try.
    """

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self._listener = HubServer.bind(None, 8883)
        self._listener.setblocking(True)
        self.address = self._listener.getsockname()[0]
        cert = hub.certificates.ca.issue_cert(self.address, hub.hostname)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self._ctx)
        self.plan: collections.deque[str] = collections.deque()
        self._until: Callable[[], bool] | None = None
        self.steps: list[str] = []          # the step each connection took, in order
        self._cond = threading.Condition()
        self._live: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, name="hostile-proxy", daemon=True).start()

    def device(self, device) -> ProxiedDevice:
        cs = device.connection_string.replace(f"GatewayHostName={self.hub.gateway_host}",
                                              f"GatewayHostName={self.address}")
        assert cs != device.connection_string
        return ProxiedDevice(device.device_id, cs)

    def connack_reset_until(self, dead: Callable[[], bool]) -> None:
        """Once `plan` is used up, reset after CONNACK until `dead()`, then forward for good."""
        with self._cond:
            self._until = dead

    def _next_step(self) -> str:
        if self.plan:
            return self.plan.popleft()
        if self._until is not None:
            if not self._until():
                return "connack_reset"
            self._until = None
        return "forward"

    def wait_steps(self, count: int, timeout: float = _IO_TIMEOUT) -> list[str]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.steps) >= count, timeout):
                raise TimeoutError(f"expected {count} connections to the proxy, saw {self.steps}")
            return list(self.steps)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            live = list(self._live)
        try:
            self._listener.close()
        except OSError:
            pass
        for s in live:
            _close(s)

    # --- the connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._cond:
                if self._stopped:
                    raw.close()
                    return
                step = self._next_step()
            threading.Thread(target=self._serve, args=(raw, step), daemon=True,
                             name=f"hostile-proxy:{step}").start()

    def _track(self, s: socket.socket) -> None:
        with self._cond:
            self._live.append(s)

    def _serve(self, raw: socket.socket, step: str) -> None:
        self._track(raw)
        raw.settimeout(_IO_TIMEOUT)
        try:
            client = self._ctx.wrap_socket(raw, server_side=True)
        except OSError:
            _close(raw)
            return
        self._track(client)
        with self._cond:
            self.steps.append(step)
            self._cond.notify_all()
        try:
            if step == "forward":
                self._forward(client)
                return
            decoder = Decoder()
            packets: list = []
            while not any(x.type == p.CONNECT for x in packets):
                packets += decoder.feed(_recv(client))
            client.sendall(encode(p.Connack(0, True)))
            if step == "swallow":
                while not any(x.type == p.PUBLISH for x in packets):
                    packets += decoder.feed(_recv(client))
            _reset(client)
        except (OSError, EOFError):
            _close(client)

    def _forward(self, client: ssl.SSLSocket) -> None:
        ctx = self.hub.certificates.client_context()
        upstream_raw = socket.create_connection((self.hub.gateway_host, self.hub.port), timeout=_IO_TIMEOUT)
        self._track(upstream_raw)
        upstream = ctx.wrap_socket(upstream_raw, server_hostname=self.hub.hostname)
        self._track(upstream)
        # one thread for both directions: an SSL socket must not be read and written concurrently
        peer = {client: upstream, upstream: client}
        try:
            while True:
                ready = [x for x in peer if x.pending()]
                if not ready:
                    ready, _, _ = select.select(list(peer), [], [], _IO_TIMEOUT)
                for src in ready:
                    data = _recv_now(src)
                    if data is None:
                        continue  # only TLS housekeeping arrived (see _recv_now)
                    if not data:
                        return
                    peer[src].sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _recv_now(s: ssl.SSLSocket) -> bytes | None:
    """What `s` has for the application now, None if nothing. A socket select() calls readable may
    hold only TLS records with no data in them (the hub's TLS 1.3 session tickets arrive right
    after the handshake): a blocking recv() there waited for data that the other direction, which
    this same thread relays, had to bring first, and the relay stood still for _IO_TIMEOUT."""
    s.settimeout(0)
    try:
        return s.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        s.settimeout(_IO_TIMEOUT)


def _recv(s: ssl.SSLSocket) -> bytes:
    data = s.recv(65536)
    if not data:
        raise EOFError("the client closed the connection")
    return data


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass


@pytest.fixture
def proxy(hub):
    prox = HostileProxy(hub)
    yield prox
    prox.stop()


def _client(hub, device, **kwargs):
    options = dict(server_verification_cert=hub.ca_pem, keep_alive=60, connection_retry_interval=1)
    options.update(kwargs)
    return IoTHubDeviceClient.create_from_connection_string(device.connection_string, **options)


def _wait(predicate, timeout: float, what: str) -> None:
    """Poll a condition of the SDK's that no event reports (that is the whole problem)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def _send_in_background(client, message):
    done = threading.Event()
    errors = []

    def run():
        try:
            client.send_message(message)
        except Exception as exc:  # reported to the test through `errors`
            errors.append(exc)
        finally:
            done.set()
    threading.Thread(target=run, daemon=True).start()
    return done, errors


def _delivered(hub, device_id):
    return {t.message_id for t in hub.telemetry(device_id)}


@_NO_WEDGE_HERE
def test_reset_after_connack_kills_the_network_thread_and_revive_brings_the_client_back(hub, proxy):
    """The reproduction itself, and the cure: the SDK's own disconnect path, then its own retry."""
    dev = proxy.device(hub.add_device("wedge-bare"))
    client = _client(hub, dev)
    try:
        assert wedge.watch(client, dev.device_id), "the SDK's paho client was not found"
        died = threading.Event()
        proxy.plan.append("swallow")
        proxy.connack_reset_until(died.is_set)
        bounded(client.connect)
        # the SDK may fail this call (NoConnectionError) while its retry races the reset; paho
        # keeps the publish regardless and re-sends it from its CONNACK handler, which is the point
        _send_in_background(client, Message("held", message_id="held-1"))
        assert proxy.wait_steps(2)[:2] == ["swallow", "connack_reset"]
        _wait(lambda: wedge.diagnose(client) is not None, _IO_TIMEOUT, "the network thread to die")
        died.set()
        at_death = len(proxy.steps)
        assert set(proxy.steps[1:]) == {"connack_reset"}
        found = wedge.diagnose(client)
        assert client.connected, "the SDK should still claim to be connected: that is the hazard"
        assert found.error == "SSLEOFError", found
        assert "wedge-bare: the SDK's network thread died at" in found.text
        assert found.text.endswith("(SSLEOFError); it still reports connected")
        # nothing can answer this call now: no thread reads the socket
        done, _errors = _send_in_background(client, Message("stuck", message_id="stuck-1"))

        paho = wedge.paho_of(client)
        dead = [paho._sock, paho._sockpairR, paho._sockpairW]
        assert wedge.revive(client)
        assert [x.fileno() for x in dead] == [-1, -1, -1], "the dead connection's sockets stay open"
        # the call returns: acknowledged after the reconnect, or (the SDK's race again) failed with
        # NoConnectionError while paho re-sends the publish anyway
        assert done.wait(_IO_TIMEOUT)
        hub.wait_for_telemetry(2, device_id=dev.device_id, timeout=_IO_TIMEOUT)
        assert {"held-1", "stuck-1"} <= _delivered(hub, dev.device_id)
        assert proxy.wait_steps(at_death + 1)[at_death] == "forward"
        # the SDK sets `connected` from its own callback thread, after paho has already re-sent
        # the held publish from its CONNACK handler: the telemetry can be in before the flag is
        _wait(lambda: client.connected, _IO_TIMEOUT, "the SDK to report connected again")
        assert wedge.diagnose(client) is None
        assert not wedge.revive(client), "a second revive of a healthy client must do nothing"
    finally:
        bounded(client.shutdown, timeout=15)


@_NO_WEDGE_HERE
def test_outbox_over_a_bare_client_survives_a_wedge(hub, proxy):
    """The README headline, `Outbox(device_client)`, across a silent death: nothing is lost."""
    dev = proxy.device(hub.add_device("wedge-outbox"))
    client = _client(hub, dev)
    proxy.plan.append("swallow")
    try:
        bounded(client.connect)
        with Outbox(client, send_timeout=60) as outbox:
            proxy.connack_reset_until(lambda: bool(outbox.wedges))
            ids = [outbox.send({"seq": i}) for i in range(20)]
            outbox.flush(timeout=60)
            assert [w.error for w in outbox.wedges] == ["SSLEOFError"], outbox.wedges
            assert "wedge-outbox: the SDK's network thread died at" in outbox.wedges[0].text
        assert set(ids) <= _delivered(hub, dev.device_id)
        assert proxy.steps[:2] == ["swallow", "connack_reset"]
    finally:
        bounded(client.shutdown, timeout=15)


@_NO_WEDGE_HERE
def test_pool_replaces_a_wedged_client_and_resends(hub, proxy, caplog):
    """A pool's client that reconnects by itself (as the SDK does to renew its token) and dies on
    the way: the pool takes it back as healthy, the watchdog sees the dead thread and replaces it,
    and the send waiting on it goes out again on the new client. The dead client's shutdown
    finishes instead of running into its deadline, which held the device off the hub 5 s."""
    caplog.set_level(logging.DEBUG, logger="pytest_iotfailover.devices.pool")
    dev = proxy.device(hub.add_device("wedge-pool"))
    # a long first backoff keeps the pool from replacing the client before it reconnects itself,
    # and a 1 s retry interval gives the client several reconnects in it: each is a race that
    # kills paho's thread only sometimes (HostileProxy), and the SDK's default 10 s left it two
    pool = DevicePool([dev], server_verification_cert=hub.ca_pem, keep_alive=60, connection_retry_interval=1,
                      min_backoff=5.0, delta_backoff=0.1, connect_timeout=30)
    proxy.plan.append("swallow")
    try:
        pool.connect()
        old = pool.clients[dev.device_id]
        outbox = Outbox(pool, send_timeout=60)
        first = outbox.send("first")
        proxy.wait_steps(1)
        # the swallowed publish stays in paho's store; the reset leaves the client disconnected
        _wait(lambda: not old.connected, _IO_TIMEOUT, "the client to notice the reset")
        proxy.connack_reset_until(lambda: wedge.diagnose(old) is not None or bool(pool.wedges))
        bounded(old.connect, timeout=30)
        # the watchdog may find the dead thread first: the pool then reports the loss to the SDK,
        # and the old client no longer claims to be connected
        _wait(lambda: wedge.diagnose(old) is not None or bool(pool.wedges), _IO_TIMEOUT,
              "the network thread to die")
        more = [outbox.send(f"after {i}") for i in range(5)]
        outbox.flush(timeout=90)
        outbox.close()
        assert set([first] + more) <= _delivered(hub, dev.device_id)
        assert [w.device_id for w in pool.wedges] == [dev.device_id], pool.wedges
        assert "SSLEOFError" in pool.wedges[0].text
        assert pool.clients[dev.device_id] is not old
        assert any("wedged: wedge-pool: the SDK's network thread died" in r.reason for r in pool.recreations)
        assert old._mqtt_pipeline is not None and wedge.paho_of(old)._sock is None, "its socket was not closed"
        stuck = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
        assert not stuck, stuck
    finally:
        pool.close()


@pytest.fixture
def session_proxy(iothub):
    if iothub.fake is None:
        pytest.skip("needs the embedded hub")
    prox = HostileProxy(iothub.fake)
    yield prox
    prox.stop()


@_NO_WEDGE_HERE
def test_plugin_client_is_revived_and_named(iothub, failover, session_proxy):
    proxy = session_proxy
    device = iothub.add_device()
    dev = proxy.device(device)
    client = make_client(iothub, dev, keep_alive=60)
    try:
        bounded(client.connect, timeout=30)
        with Outbox(client, send_timeout=60) as outbox:
            outbox.send("before")
            outbox.flush(timeout=30)
            proxy.plan.append("swallow")
            proxy.connack_reset_until(lambda: bool(wedges_of(client)) or bool(outbox.wedges))
            handle = failover.drop(device_id=device.device_id)
            ids = [outbox.send(f"m{i}") for i in range(10)]
            outbox.flush(timeout=60)
        assert set(ids) <= {t.message_id for t in iothub.telemetry(device.device_id)}
        [found] = wedges_of(client)
        assert found.error == "SSLEOFError"
        report = handle.report()
        assert report.wedged[device.device_id] == found.text
        assert f"wedged: {found.text}" in str(report)
        record = reporting.TestRecord("t")
        record.faults = [report]
        [line] = reporting.summary_lines([("t", "passed", record.summary())])
        assert f"WEDGED {found.text}" in line
    finally:
        with pytest.warns(pytest.PytestWarning, match=f"{device.device_id}: the SDK's network thread died"):
            shutdown_quietly(client, "device_client")
