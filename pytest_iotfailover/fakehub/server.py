"""The asyncio TLS listener: bytes in, packets to the hub core, its actions out. No IoT Hub rules.

The core (iothub/core.py) decides everything and returns actions; this module only executes
them: writes, closes, resets, pauses and timers (`loop.call_later`, on the wall clock the core
is given). It keeps no fault or session state.

TLS is done with `ssl.MemoryBIO` on a plain TCP protocol instead of asyncio's own SSL transport:
asyncio's SSL layer keeps a 256 KiB read buffer per connection, which makes thousands of idle
devices cost hundreds of megabytes, and owning the TLS layer also lets faults pause, drop or
reset a connection at the byte level.
"""
import asyncio
import errno
import ipaddress
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ..iothub.actions import Action, Close, Pause, Reply, Reset, Send, Timer
from ..iothub.core import MAX_D2C_SIZE, IoTHubCore
from ..iothub.mqtt import Decoder, PacketTooLarge, ProtocolError
from ..iothub.session import Connection
from .nap import nap_for, wants_nap

_TLS_READ = 16384  # one TLS record's worth of plaintext
_READ_SIZE = 256 * 1024  # what asyncio reads at once for a plain Protocol
_MAX_HELD = 1 << 20  # what a silenced connection may buffer before TCP back-pressure takes over
_CLOSE_GRACE = 10.0  # how long a closed connection may take to deliver its last output
_FLUSH_AT = 64 * 1024  # hand output to the transport mid-batch, so its back-pressure can act
# Over IoT Hub's 256 KB message limit plus a full topic, so an oversized message is still parsed
# and refused by the hub's own size rule; anything larger is refused unread.
MAX_PACKET_SIZE = MAX_D2C_SIZE + 70_000

# Limits on what a peer can make the hub hold (README "Limits and memory bounds"); FakeHub
# takes each as a keyword argument of the same name in lower case.
# A CONNECT carries ids, a SAS token and at most a will message; 64 KiB is far more than any
# SDK sends and bounds what an unauthenticated peer can park in the hub.
MAX_CONNECT_SIZE = 64 * 1024
# TCP connections that have not (yet) authenticated; a storm of SDK reconnects stays far below.
MAX_UNAUTHENTICATED = 1000
# Unsent output per connection: past the first the hub stops reading that peer (its requests
# are what make output), past the second it closes the connection.
SEND_BUFFER_PAUSE = 256 * 1024
SEND_BUFFER_LIMIT = 4 << 20  # over a full C2D queue (50 x 64 KB) on top of the pause mark


class MqttTlsProtocol(asyncio.BufferedProtocol):
    """One device socket: TLS and MQTT framing, and the actions the core addresses to it."""

    def __init__(self, server: "HubServer"):
        self.server = server
        self.loop = server.loop
        self.transport: Any = None
        self.conn: Any = None
        self.closing = False
        self.blackholed = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._in_batch = False
        self._processing = False
        self._handshaken = False
        self._held: list[bytes] = []
        self._held_size = 0
        self._held_over = False      # a silenced peer sent more than _MAX_HELD
        self._write_paused = False   # the transport's unsent output is over send_buffer_pause
        self._reading_paused = False
        self._backlog: deque[Any] = deque()  # packets decoded but not yet handled (handling was paused)
        self._bad_stream = False  # the decoder hit garbage after the packets it returned
        self._queued = False  # in server.ready: its packets wait for the end of the loop iteration
        self._pause_logged = False

    # --- asyncio side ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        server.last_open = time.perf_counter()  # no nap during a connection storm: see nap.wants_nap
        peer = transport.get_extra_info("peername") or ("?", 0)
        if server.dark is not None and server.refuse_if_dark(self, peer):
            return
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = server.ssl_context.wrap_bio(self._in, self._out, server_side=True)
        # ssl.SSLObject's read/write/pending are one-line Python wrappers around this C object;
        # called directly they cost three Python frames less per message (same exceptions)
        self._tlsc = getattr(self._tls, "_sslobj", self._tls)
        self._decoder = Decoder(MAX_PACKET_SIZE, first_packet_max=server.max_connect_size)
        self.conn, actions = server.core.open(f"{peer[0]}:{peer[1]}", time.time())
        server.links[self.conn] = self
        server.protocols.add(self)
        # the transport calls pause_writing()/resume_writing() around this mark
        transport.set_write_buffer_limits(high=server.send_buffer_pause)
        server.execute(actions)

    def get_buffer(self, sizehint: int) -> memoryview:
        # One read buffer per server, shared by its connections: each read is consumed by
        # buffer_updated before the loop reads again. As a plain Protocol, asyncio would allocate
        # 256 KiB per read, which glibc serves with mmap, mremap and munmap on every wake-up.
        view = self.server.read_view
        if view is None:
            view = self.server.read_view = memoryview(bytearray(_READ_SIZE))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self.server.read_view
        assert view is not None  # get_buffer made it
        if self._handshaken and not (self.closing or self.blackholed):
            # straight from the read buffer into the TLS layer, without a bytes copy per read
            self._in.write(view[:nbytes])
            server = self.server
            if not server.nap:
                self._process()
                return
            if not self._queued:
                # decrypt and decode the first record now; the core takes every connection's
                # packets of this loop iteration back to back, at its end (HubServer.take_nap)
                if not (self._write_paused or self._backlog or self._bad_stream):
                    self._read_packets()
                self._queued = True
                server.ready.append(self)
            if server.nap_peer is not self:
                server.nap_mixed = server.nap_peer is not None
                server.nap_peer = self
            if not server.nap_due:
                server.nap_due = True  # once per loop iteration
                server.schedule_nap(server.take_nap)
        else:
            self.data_received(bytes(view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.blackholed:
            # held, not read: the hub "hears nothing", yet still notices the client hanging up
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > _MAX_HELD:
                self._held_over = True
                self._update_reading()
            return
        self._in.write(data)
        if not self._handshaken:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._write_tls()
                return
            except (ssl.SSLError, OSError) as exc:
                self._write_tls()
                self.server.execute(self.server.core.transport_error(self.conn, "tls_error", str(exc), time.time()))
                return
            self._handshaken = True
        self._process()

    def _process(self, finish: bool = True) -> None:
        """Handle what the peer sent, in order, until it runs out or output must drain first;
        `finish=False` leaves the output for `_finish` (HubServer.take_nap)."""
        if self._processing:
            return  # resume_writing() can fire from inside a flush of this very loop
        self._processing = True
        self._in_batch = True
        backlog = self._backlog
        server = self.server
        execute, receive = server.execute, server.core.receive
        try:
            while not (self.closing or self.blackholed or self._write_paused):
                if backlog:
                    # one packet: the per-message path, kept in this frame
                    execute(receive(self.conn, backlog.popleft(), time.time()))
                    if self._pending_size >= _FLUSH_AT:
                        self._flush()
                elif not (self._bad_stream or self._in.pending or self._tlsc.pending()) \
                        or not self._read_packets():
                    break
        finally:
            self._in_batch = False
            self._processing = False
            if finish:
                self._finish()

    def _finish(self) -> None:
        self._flush()
        if (self._write_paused or self._held_over) != self._reading_paused:
            self._update_reading()

    def _read_packets(self) -> bool:
        """Decode what TLS has; False when there is nothing more to do for now."""
        server, conn = self.server, self.conn
        if self._bad_stream:
            server.execute(server.core.violation(conn, f"malformed MQTT: {self._decoder.error}", time.time()))
            return False
        # Read only while the TLS layer has bytes: once a wake-up's records are consumed, one
        # more read would only raise SSLWantReadError, an exception per wake-up for nothing.
        # Without read-ahead (Python never enables it) OpenSSL takes no more from the BIO than
        # the record it is decrypting, so nothing complete can hide behind these two counts.
        if not (self._in.pending or self._tlsc.pending()):
            return False
        try:
            chunk = self._tlsc.read(_TLS_READ)
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLZeroReturnError:
            self.close()
            return False
        except ssl.SSLError as exc:
            server.execute(server.core.transport_error(conn, "tls_error", str(exc), time.time()))
            return False
        if not chunk:
            self.close()
            return False
        decoder = self._decoder
        try:
            self._backlog.extend(decoder.feed(chunk))
        except PacketTooLarge as exc:
            server.execute(server.core.violation(conn, f"packet too large: {exc}", time.time()))
            return False
        except ProtocolError as exc:
            server.execute(server.core.violation(conn, f"malformed MQTT: {exc}", time.time()))
            return False
        # packets before garbage come back with the error set: handle them, then report it
        self._bad_stream = decoder.error is not None
        return True

    def pause_writing(self) -> None:
        # the peer does not read what it asked for: stop reading its requests until it does
        self._write_paused = True
        self._update_reading()
        if not self._pause_logged and not self.closing:
            self._pause_logged = True
            self.server.execute(self.server.core.note(self.conn, "send_paused", time.time(),
                                                      buffered=self.transport.get_write_buffer_size()))

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.closing:
            return
        self._update_reading()
        if self._handshaken and not self.blackholed:
            self._process()

    def eof_received(self) -> None:
        return None  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        if self.conn is None:
            return  # refused at a dark address: the core never saw it
        self._backlog.clear()
        server = self.server
        if server.nap_peer is self:
            server.nap_peer = None  # not kept alive by the nap's bookkeeping
        server.protocols.discard(self)
        server.links.pop(self.conn, None)
        server.execute(server.core.connection_lost(self.conn, time.time()))

    # --- what the core's actions do --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.closing or self.blackholed:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        buffered = self._pending_size + self.transport.get_write_buffer_size()
        if buffered > self.server.send_buffer_limit:
            # reading is already paused, so this is service-side output piling up (C2D, desired
            # patches, method calls) for a peer that reads nothing: give up on it
            self.server.execute(self.server.core.close(self.conn, "send_buffer_full", time.time(), abort=True,
                                                       buffered=buffered, limit=self.server.send_buffer_limit))
            return
        if not self._in_batch:
            self._flush()

    def close(self, abort: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        if abort:
            # SO_LINGER 0 turns close() into a TCP reset, like the real hub's KillTcp
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()
        else:
            self._flush(force=True)
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # asyncio keeps the socket until its output drains: not for ever
                self.loop.call_later(_CLOSE_GRACE, self._abort_if_open)

    def set_blackhole(self, on: bool) -> None:
        """Silence: nothing read, nothing sent, the socket stays open. Off again: what the device
        sent meanwhile arrives late, as after a healed network partition."""
        if on == self.blackholed:
            return
        self.blackholed = on
        if on:
            self._pending.clear()
            self._pending_size = 0
            return
        self._held_over = False
        self._update_reading()
        held, self._held, self._held_size = b"".join(self._held), [], 0
        if self.closing:
            return
        if held:
            self.data_received(held)
        elif self._handshaken:
            self._process()  # packets decoded before the silence began

    # --- internals ---------------------------------------------------------------------------

    def _abort_if_open(self) -> None:
        if self in self.server.protocols:  # connection_lost() has not run yet
            self.transport.abort()

    def _update_reading(self) -> None:
        want = self._write_paused or self._held_over
        if want == self._reading_paused or self.closing or self.transport.is_closing():
            return
        self._reading_paused = want
        if want:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _flush(self, force: bool = False) -> None:
        pending = self._pending
        if pending and (force or not self.closing):
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._pending_size = 0
            try:
                self._tlsc.write(data)
            except ssl.SSLError:
                return
        self._write_tls()

    def _write_tls(self) -> None:
        out = self._out.read()
        if out and not self.transport.is_closing():
            self.transport.write(out)


def loopback_candidates(count: int = 254) -> Iterable[str]:
    for i in range(1, count + 1):
        yield f"127.0.0.{i}"


class HubServer:
    def __init__(self, core: IoTHubCore, ssl_context: ssl.SSLContext, loop: asyncio.AbstractEventLoop, *,
                 max_connect_size: int = MAX_CONNECT_SIZE, send_buffer_pause: int = SEND_BUFFER_PAUSE,
                 send_buffer_limit: int = SEND_BUFFER_LIMIT, nap: float = 0.0):
        self.core = core
        self.ssl_context = ssl_context
        self.read_view: memoryview | None = None  # shared by the connections; see get_buffer
        self.loop = loop
        self.max_connect_size = max_connect_size
        self.send_buffer_pause = send_buffer_pause
        self.send_buffer_limit = send_buffer_limit
        self.nap = nap  # fakehub/nap.py; 0: never
        self.nap_due = False
        # who sent last, and whether another connection sent since the last nap check: one
        # connection alone (a test's Outbox: send, PUBACK, send) gains nothing from waiting
        self.nap_peer: Any = None
        self.nap_mixed = False
        self.naps = 0  # naps taken, for tests and diagnostics
        self.ready: list[MqttTlsProtocol] = []  # connections whose packets wait for take_nap
        # The nap must come after this iteration's callbacks and before the next poll. uvloop
        # runs call_soon callbacks just before it polls; asyncio's own loop polls first and runs
        # them ahead of what the poll brought, which would hold those messages for the nap too,
        # but it runs due timers after them.
        self.schedule_nap: Callable[[Callable[[], None]], Any] = \
            (lambda fn: loop.call_later(0, fn)) if isinstance(loop, asyncio.BaseEventLoop) else loop.call_soon
        self._nap_checked = self.last_open = time.perf_counter()
        self.protocols: set[MqttTlsProtocol] = set()
        self.links: dict[Connection, MqttTlsProtocol] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._servers: list[asyncio.AbstractServer] = []  # one listener per address (dns failovers add some)
        # region_failover(dns=True): addresses where nothing answers any more (fakehub/dns.py),
        # and who hears of each connection refused there
        self.dark: Callable[[str], bool] | None = None
        self.on_dark: Callable[[str, str], None] | None = None

    # --- executing the core's actions ------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One step of the core at the wall clock's time: its actions executed, its value returned
        (the core's service calls return (value, actions), the others just actions)."""
        result = fn(*args, time.time())
        value, actions = result if isinstance(result, tuple) else (None, result)
        self.execute(actions)
        return value

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Send:  # nearly every action is one (a PUBACK)
                proto = self.links.get(action.conn)
                if proto is not None:
                    proto.send(action.data)
            elif kind is Timer:
                self._arm(action.key, action.deadline)
            elif kind is Reply:
                action.notify(action.response)
            else:
                proto = self.links.get(action.conn)
                if proto is None:
                    continue  # its socket is gone already
                if kind is Close:
                    proto.close()
                elif kind is Reset:
                    proto.close(abort=True)
                elif kind is Pause:
                    proto.set_blackhole(action.on)

    def take_nap(self) -> None:
        """Handle the packets this loop iteration read, then sleep `nap` s when nap.wants_nap says
        so, so that the next poll returns what several connections sent meanwhile. Device data
        that arrives during the nap waits for its end; timers and service calls may run up to a
        nap late.

        The packets are handled here, not as each connection's read comes in: first the core
        takes every connection's packets back to back, then every connection's output is
        encrypted and written. The core's code then runs warm for all but the first message
        instead of between one connection's TLS work and the next (bench/README.md, "Where the
        hub's cost sits"). Each connection's packets keep their order."""
        self.nap_due = False
        ready, self.ready = self.ready, []
        for proto in ready:
            proto._queued = False
            proto._process(finish=False)
        for proto in ready:
            proto._finish()
        mixed, self.nap_mixed = self.nap_mixed, False
        now = time.perf_counter()
        nap = nap_for(self.nap, len(ready))
        if wants_nap(nap, mixed, now - self._nap_checked, now - self.last_open):
            time.sleep(nap)
            self.naps += 1
            now = time.perf_counter()
        self._nap_checked = now

    def _arm(self, key: Hashable, deadline: float | None) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        if deadline is not None:
            # the core keeps wall-clock deadlines; the loop's clock only measures the wait
            self._timers[key] = self.loop.call_later(max(deadline - time.time(), 0.0), self._fire, key, deadline)

    def _fire(self, key: Hashable, deadline: float) -> None:
        left = deadline - time.time()
        if left > 0:
            # uvloop keeps time in whole milliseconds and runs a timer up to about a millisecond
            # early; a deadline is a promise on the wall clock (a fault starts no sooner than asked)
            self._timers[key] = self.loop.call_later(left, self._fire, key, deadline)
            return
        self._timers.pop(key, None)
        self.execute(self.core.timer_fired(key, time.time()))

    @staticmethod
    def bind(host: str | None, port: int) -> socket.socket:
        """Bind `host:port`, or with no host the first free loopback address of 127.0.0.1, .2, ..."""
        candidates = [host] if host else loopback_candidates()
        last: OSError | None = None
        for candidate in candidates:
            family = socket.AF_INET6 if ":" in candidate else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((candidate, port))
                sock.listen(4096)
                sock.setblocking(False)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if host or exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    raise OSError(exc.errno, f"cannot listen on {candidate}:{port}: {exc.strerror}") from None
        raise OSError(getattr(last, "errno", None),
                      f"no free loopback address for port {port} (tried 127.0.0.1 to 127.0.0.254): {last}")

    async def serve(self, sock: socket.socket) -> None:
        """Listen on `sock` too: the hub answers on every address it serves."""
        self._servers.append(await self.loop.create_server(lambda: MqttTlsProtocol(self), sock=sock))

    def refuse_if_dark(self, proto: MqttTlsProtocol, peer: Any) -> bool:
        """Reset a connection made to a dark address before TLS: to the client the same as a
        refused connection. The listener stays, so no other hub on the machine takes the address
        while devices still dial it (they would meet a stranger's certificate instead)."""
        local = proto.transport.get_extra_info("sockname")
        if not local or self.dark is None or not self.dark(local[0]):
            return False
        proto.close(abort=True)
        if self.on_dark is not None:
            self.on_dark(local[0], f"{peer[0]}:{peer[1]}")
        return True

    async def close(self) -> None:
        for listener in self._servers:
            listener.close()
        for proto in list(self.protocols):
            self.execute(self.core.close(proto.conn, "hub_stopped", time.time()))
            if proto.transport.get_write_buffer_size():
                # a graceful close waits for unsent output to drain, which a peer that never
                # reads would make last for ever
                proto.transport.abort()
        for listener in self._servers:
            await listener.wait_closed()
        # let connection_lost callbacks run so every disconnect is logged
        for _ in range(3):
            if not self.protocols:
                break
            await asyncio.sleep(0)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
