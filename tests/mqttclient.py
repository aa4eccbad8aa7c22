"""A small blocking MQTT 3.1.1 client for poking the fake hub at the packet level.

Device SDKs hide exactly what these tests need to see (CONNACK codes, DUP flags, the socket
being closed), so this client speaks raw packets over TLS with the project's own codec and
leaves every protocol decision to the test.
"""
import socket
import ssl
import struct
import time
from collections import deque
from typing import Self

from pytest_iotfailover.fakehub.hub import Device, FakeHub
from pytest_iotfailover.iothub.mqtt import Decoder, encode
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.sas import make_sas_token

__all__ = [
    "API_VERSION",
    "ConnectionClosed",
    "MqttClient",
    "close_all",
    "connect",
    "sas_token",
    "username_for",
]

API_VERSION = "2021-04-12"
DEFAULT_TIMEOUT = 5.0


class ConnectionClosed(ConnectionError):
    """The server closed the connection while a packet was expected."""


# Tests often leave a client open on purpose (to be displaced, timed out, ...). Holding them
# here until a fixture calls close_all() keeps garbage collection from closing them mid-test
# (which the hub would see as a network loss) and keeps sockets from leaking between tests.
_open_clients: "set[MqttClient]" = set()


def close_all() -> None:
    for client in list(_open_clients):
        client.close()


def username_for(hub: FakeHub, device_id: str) -> str:
    return f"{hub.hostname}/{device_id}/?api-version={API_VERSION}"


def sas_token(hub: FakeHub, device_id: str, key: str | None = None, *,
              expiry: float | None = None, ttl: float = 3600) -> str:
    """A device SAS token; `key` defaults to the registered device's primary key."""
    if key is None:
        key = hub.device(device_id).primary_key
    return make_sas_token(f"{hub.hostname}/devices/{device_id}", key, expiry=expiry, ttl=ttl)


class MqttClient:
    """One TLS connection to a FakeHub. Not thread-safe; every call blocks with a timeout."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.connack: p.Connack | None = None
        self._decoder = Decoder()
        self._pending: deque[object] = deque()
        self._next_id = 0
        self._eof = False
        _open_clients.add(self)

    @classmethod
    def open(cls, hub: FakeHub, timeout: float = DEFAULT_TIMEOUT, *,
             rcvbuf: int | None = None) -> "MqttClient":
        """TLS handshake done, nothing sent: for tests that misbehave before CONNECT.

        `rcvbuf` shrinks the socket's receive buffer (SO_RCVBUF, set before connecting), for
        tests of a device that does not read: the hub's output then backs up sooner.
        """
        ctx = hub.certificates.client_context()
        family = socket.AF_INET6 if ":" in hub.gateway_host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            raw.settimeout(timeout)
            raw.connect((hub.gateway_host, hub.port))
        except BaseException:
            raw.close()
            raise
        try:
            sock = ctx.wrap_socket(raw, server_hostname=hub.hostname)
        except BaseException:
            raw.close()
            raise
        return cls(sock)

    # --- sending ------------------------------------------------------------------------------

    def send(self, packet) -> None:
        self.send_raw(encode(packet))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_and_hang_up(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send `data`, end the TCP stream (FIN) and wait until the hub closes its side.

        The hub handles every byte that came before the FIN before it sees the end of the
        stream, so when this returns the hub has dealt with all of `data`, whatever it was.
        """
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the hub closed first: it has already made up its mind
        raw = socket.socket(fileno=self.sock.detach())  # plain TCP from here: no TLS close_notify
        self.sock = raw
        try:
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the hub did not close the connection within {timeout:g} s")
            raw.settimeout(remaining)
            try:
                if not raw.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 1, *,
                packet_id: int | None = None, dup: bool = False, retain: bool = False) -> int | None:
        """Send a PUBLISH; returns its packet id (None for QoS 0). Does not wait for PUBACK."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if qos and packet_id is None:
            packet_id = self.packet_id()
        self.send(p.Publish(topic, payload, qos, packet_id if qos else None, dup, retain))
        return packet_id if qos else None

    def subscribe(self, *filters, qos: int = 1, timeout: float = DEFAULT_TIMEOUT) -> p.Suback:
        """SUBSCRIBE and wait for the matching SUBACK (which must be the next packet)."""
        pid = self.packet_id()
        self.send(p.Subscribe(pid, [(f, qos) for f in filters]))
        suback = self.expect(p.SUBACK, timeout)
        assert suback.packet_id == pid, f"SUBACK for packet id {suback.packet_id}, sent {pid}"
        return suback

    def ping(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """PINGREQ, then insist the very next packet is PINGRESP.

        The hub handles a connection's packets in order, so this doubles as a barrier: anything
        the hub sent in answer to earlier packets has arrived before the PINGRESP.
        """
        self.send(p.Pingreq())
        self.expect(p.PINGRESP, timeout)

    def disconnect(self) -> None:
        self.send(p.Disconnect())

    # --- receiving ----------------------------------------------------------------------------

    def recv(self, timeout: float = DEFAULT_TIMEOUT):
        """The next packet; TimeoutError if none arrives in time, ConnectionClosed on close."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no packet from the hub within {timeout:g} s")
            data = self._read(remaining)
            if data is None:
                raise TimeoutError(f"no packet from the hub within {timeout:g} s")
            if not data:
                raise ConnectionClosed("the hub closed the connection")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def expect(self, packet_type: int, timeout: float = DEFAULT_TIMEOUT):
        packet = self.recv(timeout)
        assert packet.type == packet_type, \
            f"expected {p.PACKET_NAMES[packet_type]}, got {packet!r}"
        return packet

    def expect_closed(self, timeout: float = DEFAULT_TIMEOUT) -> float:
        """Assert the hub closes the socket within `timeout`, sending no packet first.

        Returns the seconds waited. A clean TLS close, a bare TCP FIN and a reset all count.
        """
        start = time.monotonic()
        deadline = start + timeout
        got: list[object] = list(self._pending)
        self._pending.clear()
        while not got:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the hub did not close the connection within {timeout:g} s")
            data = self._read(remaining)
            if data is None:
                raise AssertionError(f"the hub did not close the connection within {timeout:g} s")
            if not data:
                return time.monotonic() - start
            try:
                got.extend(self._decoder.feed(data))
            except Exception as exc:
                raise AssertionError(f"the hub sent undecodable bytes instead of closing: {exc}") from None
        raise AssertionError(f"expected the hub to close the connection, got {got!r}")

    def _read(self, timeout: float) -> bytes | None:
        """Bytes, b'' when the peer closed, None on timeout."""
        if self._eof:
            return b""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                ssl.SSLEOFError, ssl.SSLZeroReturnError):
            data = b""
        except ssl.SSLError as exc:
            # an abortive close can surface as a TLS record error rather than an EOF
            if "EOF" in str(exc) or "eof" in str(exc):
                data = b""
            else:
                raise
        if not data:
            self._eof = True
        return data

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the socket without DISCONNECT or TLS close_notify: what a network loss looks like."""
        try:
            self.sock.close()
        except OSError:
            pass
        _open_clients.discard(self)

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(hub: FakeHub, device: Device | str, *, clean_session: bool = False,
            keep_alive: int = 60, username: str | None = None,
            password: str | bytes | None = None, client_id: str | None = None,
            will: p.Will | None = None, protocol_level: int = 4,
            timeout: float = DEFAULT_TIMEOUT, rcvbuf: int | None = None) -> MqttClient:
    """Open a connection, send CONNECT and wait for CONNACK (kept in `client.connack`).

    Returns the client whatever the return code, so refusals can be asserted. `username` and
    `password` default to what a device SDK sends; override them to send wrong credentials.
    """
    device_id = device.device_id if isinstance(device, Device) else device
    if username is None:
        username = username_for(hub, device_id)
    if password is None:
        password = sas_token(hub, device_id)
    if isinstance(password, str):
        password = password.encode("utf-8")
    client = MqttClient.open(hub, timeout, rcvbuf=rcvbuf)
    try:
        client.send(p.Connect(client_id if client_id is not None else device_id, keep_alive,
                              clean_session, username, password, will, "MQTT", protocol_level))
        client.connack = client.expect(p.CONNACK, timeout)
    except BaseException:
        client.close()
        raise
    return client
