"""Loopback HTTP control API over a running FakeHub, for the standalone hub process.

Tests written in other languages (the Node SDK, shell scripts) drive a standalone hub through this
API: read the telemetry ledger and event log, add devices, send C2D messages, call direct methods
and patch desired properties, and start, watch and cancel faults.

It is built on the standard library's `http.server.ThreadingHTTPServer` rather than a web
framework: it serves a handful of JSON routes to one local client, so a framework would add a
dependency to every install of a pytest plugin and buy nothing. The trade-offs of `http.server`
(no TLS, modest throughput) are acceptable because the API only ever binds a loopback address and
every request must carry the bearer token the hub prints into its 0600 info file.

Routes (JSON in and out; errors are `{"error": "..."}` with a 4xx/5xx status, plus IoT Hub's
`"error_code"` when the hub refused the call):

    GET   /telemetry[?device_id=ID]              accepted telemetry, in acceptance order
    GET   /devices                               registered devices
    POST  /devices                {"device_id"}  -> 201 {"device_id", "connection_string"}
    POST  /devices                {"device_ids": [...]}  -> 201 {"devices": [{"device_id", "connection_string"}]}
                                                 in bulk, at most 100 (FakeHub.add_devices)
    DELETE /devices/{id}                         -> {"device_id"}: delete the identity (404 if unknown)
    POST  /devices/{id}/c2d       {"body", "properties", "ttl", "expiry_time", "ack"} -> {"message_id"}
    GET   /feedback[?device_id=ID&message_id=M]  C2D feedback records (iothub-ack), oldest first
    POST  /devices/{id}/methods/{name}  {"payload", "timeout"} -> {"status", "payload"}
    GET   /devices/{id}/twin
    PATCH /devices/{id}/twin/desired    {patch}  -> {"version"}
    GET   /events[?kind=K&device_id=ID]          the hub's event log
    POST  /faults/{kind}          {kwargs}       -> 201 {fault}: start hub.faults.<kind>(**kwargs)
    GET   /faults                                every fault started so far, in order
    GET   /faults/{id}                           {fault, "report"}
    DELETE /faults/{id}                          -> {fault}: cancel it (a no-op once it is over)
    POST  /faults/{id}/wait       {"timeout"}    -> {fault, "report"} once it is over; 504 if not in time

`POST /devices` (one device or a bulk call), `DELETE /devices/{id}` and `POST /devices/{id}/c2d` go
through the tier's throttles (fakehub/shaping.py): a request beyond the rate is answered later, one
past the shaping queue gets 429 with the hub's 429001; one refused for its arguments is answered at once.

A fault is `{"id", "kind", "device_id", "params", "state", "started_at", "ended_at"}`; its id is its
position in the hub's fault history, which only grows, so an id never changes meaning. The body of
`POST /faults/{kind}` holds the arguments of that kind's fault spec (model.py), which are those of
the `Faults` method of that name (an empty body takes the defaults); `report` is the fault's
`RecoveryReport` as nested objects.

Every request must name this API in `Host` (its address or `localhost`, with the port; 421
otherwise) and be complete within `request_timeout` of its first byte (408 otherwise). At most
`max_connections` connections are served at once; further ones get a 503 and are closed.
"""
import base64
import binascii
import concurrent.futures
import dataclasses
import errno
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import socket
import sys
import threading
import time
import typing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..iothub.auth import redact
from ..iothub.core import HubOperationError
from ..iothub.registry import check_device_id
from ..model import SPECS, FaultKind, FaultSpec, spec_for
from .descriptors import Reserve
from .faults import FaultHandle
from .shaping import BULK_REGISTRY_LIMIT

__all__ = [
    "FAULT_KINDS",
    "MAX_BODY_SIZE",
    "MAX_CONNECTIONS",
    "MAX_JSON_DEPTH",
    "REQUEST_TIMEOUT",
    "ControlServer",
]

log = logging.getLogger(__name__)

MAX_BODY_SIZE = 1024 * 1024
# Bounded so a forgotten call cannot pin a handler thread; IoT Hub itself allows at most 300 s.
MAX_METHOD_TIMEOUT = 300.0
# Idle keep-alive connections are dropped after this, so stray clients cannot hold threads forever.
IDLE_TIMEOUT = 60.0
# From a request's first byte to the end of its body, however the client paces its bytes: a
# per-read timeout alone lets a client that trickles a header line now and then hold a thread
# indefinitely.
REQUEST_TIMEOUT = 10.0
# Connections served at once, each by its own thread; further ones get a 503 from the accepting
# thread and are closed, so a flood of connections costs no thread each.
MAX_CONNECTIONS = 64
# Deeper JSON is refused before it reaches code that walks it recursively (the twin merge, the
# encoder). The figure is this API's choice; IoT Hub's own limit for twins is 10 levels (Microsoft
# Learn, "Understand and use device twins in IoT Hub"), which is the hub core's to enforce.
MAX_JSON_DEPTH = 64
# Limits of the lingering close after a refused request body (see _Handler._drain).
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 16 * 1024 * 1024

# The fault vocabulary's kinds (model.FaultKind); each is the {kind} of POST /faults/{kind}.
FAULT_KINDS = tuple(kind.value for kind in FaultKind)
MAX_FAULT_WAIT = 300.0
DEFAULT_FAULT_WAIT = 60.0
# A waiting handler wakes this often to notice that the server or the hub is going away.
_WAIT_SLICE = 0.25
# Beyond this, JSON integers stop being portable and some fault arithmetic would overflow a float.
_MAX_JSON_INT = 2 ** 53
_FAULT_ID = re.compile(r"0|[1-9][0-9]{0,15}")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")



def _json_types(cls: type) -> dict[str, tuple[str, bool, bool]]:
    """(JSON type, nullable, required) of each argument of a fault spec, from its annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        base = next(a for a in args if a is not type(None))
        out[f.name] = (_JSON_NAMES[base], type(None) in args, f.default is dataclasses.MISSING)
    return out


_JSON_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string"}
# JSON types of each kind's arguments: the spec's own field types, held to strictly
_FAULT_ARGS = {kind.value: _json_types(cls) for kind, cls in SPECS.items()}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _hub_error_status(exc: HubOperationError) -> int:
    code = getattr(exc, "error_code", None)
    if code == 404001:
        return 404
    if code == 403004:
        return 409
    if code == 503001:  # ServiceUnavailable: the hub is failing over
        return 503
    if code == 403009:  # InvalidMessageExpiryTime: the code's own HTTP status (D-ERR)
        return 403
    if isinstance(code, int) and code // 1000 in (403, 429):  # 403010 not in this tier, 429xxx throttled
        return code // 1000
    return 400


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_json(obj: Any) -> None:
    """ApiError unless `obj` nests at most MAX_JSON_DEPTH deep and all its strings are encodable.

    Iterative, as the point is to refuse depths that recursion could not handle. JSON's \\ud800
    escapes decode to lone surrogates, which no UTF-8 encoder (MQTT topic, C2D body) accepts.
    """
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ApiError(400, "request body holds a string with an unpaired UTF-16 surrogate escape "
                                    "(\\ud800-\\udfff), which is not valid Unicode")
            continue
        if isinstance(value, dict):
            items = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            items = value
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((item, depth + 1) for item in items)


def _one_line(exc: BaseException, secret: str) -> str:
    """`exc` as one line naming where it came from, with secrets hidden, for the last-resort log."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else ""
    text = " ".join(str(exc).split())[:300]
    text = redact(f"{type(exc).__name__}{where}: {text}")
    return text.replace(secret, "<redacted>") if secret else text


def _loopback_address(host: str) -> str:
    """The literal address to bind, or ValueError when `host` is not a loopback address."""
    if host == "localhost":
        return "127.0.0.1"  # "localhost" may resolve elsewhere; the literal is unambiguous
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"control API host {host!r} is not an IP address or 'localhost'") from None
    if not addr.is_loopback:
        raise ValueError(f"control API host {host!r} is not a loopback address; "
                         "the control API only listens on loopback")
    return str(addr)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # a burst of connections beyond the default backlog of 5 would wait out SYN retransmits
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], control: "ControlServer"):
        self.control = control
        self.open_sockets: set = set()
        self.sockets_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.reserve = Reserve()
        super().__init__(address, _Handler)
        self.reserve.take()

    def process_request(self, request, client_address):
        with self.sockets_lock:
            busy = len(self.open_sockets) >= self.control.max_connections
            if not busy:
                self.open_sockets.add(request)
        if busy:
            self._refuse_busy(request)
            return
        super().process_request(request, client_address)

    def _refuse_busy(self, request) -> None:
        """Answer 503 and close, on the accepting thread, without ever blocking it."""
        body = json.dumps({"error": f"the control API is serving its limit of {self.control.max_connections} "
                                    "connections; retry later"}).encode() + b"\n"
        try:
            request.setblocking(False)
            request.send(_BUSY_RESPONSE % (len(body), body))
            request.shutdown(socket.SHUT_WR)
            # reading what has already arrived lets the close end with a FIN rather than a reset
            # that could destroy the answer before the client reads it
            for _ in range(16):
                if not request.recv(65536):
                    break
        except OSError:
            pass
        finally:
            request.close()
        log.debug("control API: refused a connection: %d already open", self.control.max_connections)

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            # out of descriptors the waiting connection stays ready, and serve_forever would spin
            # on it (a core's worth of CPU beside the hub): refuse it with the reserve instead
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.reserve.refuse(self.socket, at_most=1)
            raise

    def server_close(self):
        super().server_close()
        self.reserve.close()

    def close_open_connections(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # the default prints a traceback to stderr; one line says enough, and never a secret
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("control API: connection from %s failed: %s", client_address[0], exc)
        elif exc is not None:
            log.warning("control API: error serving a connection: %s", _one_line(exc, self.control.token))


class _DeadlineReader(io.RawIOBase):
    """The connection's input, where every read gives up at `deadline` (a monotonic time).

    A socket timeout bounds one read only; this bounds the sum of them. While `idle`, the
    deadline is the wait for a request's first byte; that byte restarts it at `request_timeout`
    for the rest of the request.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float, request_timeout: float):
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self.deadline: float | None = None
        self.idle = False
        self.expired = False  # the last request ran out of time after its first byte

    def readable(self) -> bool:
        return True

    def await_request(self) -> None:
        self.idle, self.expired = True, False
        self.deadline = time.monotonic() + self._idle_timeout

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.expired = not self.idle
                raise TimeoutError("request deadline passed")
            self._sock.settimeout(remaining)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = not self.idle
            raise
        if n and self.idle:
            self.idle = False
            self.deadline = time.monotonic() + self._request_timeout
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # a response's headers and body leave as two segments; with Nagle and delayed ACKs the second
    # waits ~40 ms, which made every control call that slow
    disable_nagle_algorithm = True
    server_version = "iotfailover-hub"
    timeout = IDLE_TIMEOUT
    server: _Server

    # --- plumbing ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # an open socket file would keep the socket from closing with the connection
        control = self.server.control
        self._reader = _DeadlineReader(self.connection, IDLE_TIMEOUT, control.request_timeout)
        self.rfile = io.BufferedReader(self._reader, 65536)

    def handle_one_request(self) -> None:
        self._reader.await_request()
        self._responded = False
        # what parse_request would set, for a 408 to a request line that never ended (no command yet)
        self.command = None  # type: ignore[assignment]
        self.requestline, self.request_version = "", self.protocol_version
        super().handle_one_request()
        if self._reader.expired and not self._responded:
            # http.server drops a request that times out in its headers without a word
            self.close_connection = True
            try:
                self._send_json(408, {"error": f"the request was not complete within "
                                               f"{self.server.control.request_timeout:g} s of its first byte"})
                self._drain()  # the client may still be sending
            except OSError:
                pass

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:
        log.debug("control API %s: " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server calls this for malformed requests and unknown methods; keep answers JSON
        self.close_connection = True
        try:
            text = message or HTTPStatus(code).phrase
        except ValueError:
            text = f"HTTP error {code}"
        self._send_json(code, {"error": text})

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._responded = True
        # the request is in; writes get the idle timeout, as a bound on a client that stops reading
        self._reader.deadline = None
        self.connection.settimeout(IDLE_TIMEOUT)
        body = (json.dumps(obj, default=str) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        # a request that declares no body counts as read: nothing can follow it unparsed
        self._body_read = not (self.headers.get("Transfer-Encoding")
                               or self.headers.get("Content-Length", "").strip() not in ("", "0"))
        try:
            self._check_host()
            self._authorize()
            body = self._read_body()
            status, result, headers = self._route(body)
        except ApiError as exc:
            status, result, headers = exc.status, {"error": exc.message}, exc.headers
        except HubOperationError as exc:
            # IoT Hub's six-digit code too: 429 alone does not say 429001 from 429003
            status, headers = _hub_error_status(exc), {}
            result = {"error": str(exc), "error_code": exc.error_code}
        except (TimeoutError, concurrent.futures.TimeoutError):
            status, result, headers = 504, {"error": "the hub did not answer in time"}, {}
        except Exception as exc:
            if not self.server.control.hub.running:
                status, result = 503, {"error": "the hub is not running"}
            else:
                # one line and no traceback: a log is often shown whole in CI, and a frame's
                # locals or a message could carry a key
                log.warning("control API: %s %s failed: %s", self.command, redact(urlsplit(self.path).path),
                            _one_line(exc, self.server.control.token))
                status, result = 500, {"error": f"internal error ({type(exc).__name__}); the hub's log has "
                                                "one line about it"}
            headers = {}
        if not self._body_read:
            self.close_connection = True  # the unread body would be parsed as the next request
        try:
            self._send_json(status, result, headers)
            if not self._body_read:
                self._drain()
        except OSError:
            self.close_connection = True  # the client went away; nothing left to tell it

    def _drain(self) -> None:
        """Close gently after answering without reading the body (401, 413, ...).

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        response before a client that is still sending its body reads it. So stop writing, then
        read and discard for a bounded time and amount, as web servers' lingering close does.
        """
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        self._reader.deadline = time.monotonic() + DRAIN_SECONDS
        self._reader.idle = False
        left = DRAIN_BYTES
        while left > 0:
            try:
                chunk = self.rfile.read1(min(left, 65536))
            except TimeoutError:
                break
            if not chunk:
                break
            left -= len(chunk)

    def _check_host(self) -> None:
        """Only the names this API is reached by on loopback: a page whose DNS name was rebound to
        127.0.0.x sends its own name, and must not reach the hub through the browser."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise ApiError(400, "missing Host header" if not hosts else "more than one Host header")
        if hosts[0].strip().lower() not in self.server.control.host_names:
            raise ApiError(421, f"Host {hosts[0].strip()[:100]!r} is not this control API; "
                                f"use {self.server.control.host_names[0]!r}")

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.strip().partition(" ")
        expected = self.server.control.token.encode("utf-8")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode("utf-8", "surrogateescape"), expected)
        if not ok:
            why = "missing Authorization header" if not header else "wrong bearer token"
            raise ApiError(401, f"{why}: send 'Authorization: Bearer <control_token>' from the hub's info file",
                           {"WWW-Authenticate": 'Bearer realm="iotfailover-hub"'})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._body_read = True
            return b""
        if len(values) > 1:
            raise ApiError(400, "more than one Content-Length header")
        raw = values[0].strip()
        # int() would also take "+5", "1_0" and non-ASCII digits
        if not _CONTENT_LENGTH.fullmatch(raw):
            raise ApiError(400, f"invalid Content-Length {raw[:40]!r}: expected a decimal number of bytes")
        length = int(raw)
        if length > MAX_BODY_SIZE:
            raise ApiError(413, f"request body of {length} bytes exceeds the {MAX_BODY_SIZE}-byte limit")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the request was not complete within "
                                f"{self.server.control.request_timeout:g} s of its first byte") from None
        except OSError:
            raise ApiError(400, "failed reading the request body") from None
        if len(body) != length:
            raise ApiError(400, f"request body ended after {len(body)} of {length} bytes")
        self._body_read = True
        return body

    # --- routing -------------------------------------------------------------------------------

    def _route(self, body: bytes):
        url = urlsplit(self.path)
        try:
            segments = [unquote(s, errors="strict") for s in url.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise ApiError(400, "request path is not valid percent-encoded UTF-8") from None
        if segments and segments[-1] == "" and len(segments) > 1:
            segments.pop()  # tolerate a trailing slash
        query = url.query
        api = self.server.control
        # HEAD is GET without the body, which _send_json leaves out
        m = "GET" if self.command == "HEAD" else self.command

        if segments == ["telemetry"]:
            _allow(m, "GET")
            params = _params(query, "device_id")
            return 200, api.telemetry(params.get("device_id")), None
        if segments == ["feedback"]:
            _allow(m, "GET")
            params = _params(query, "device_id", "message_id")
            return 200, api.feedback(params.get("device_id"), params.get("message_id")), None
        if segments == ["events"]:
            _allow(m, "GET")
            params = _params(query, "kind", "device_id")
            return 200, api.events(params.get("kind"), params.get("device_id")), None
        if segments == ["devices"]:
            _allow(m, "GET", "POST")
            _params(query)
            if m == "GET":
                return 200, api.list_devices(), None
            obj = _json_object(body)
            return 201, api.add_devices(obj) if "device_ids" in obj else api.add_device(obj), None
        if len(segments) == 2 and segments[0] == "devices":
            _allow(m, "DELETE")
            _params(query)
            return 200, api.remove_device(segments[1]), None
        found = None
        if len(segments) >= 3 and segments[0] == "devices":
            found = self._device_route(m, segments[1], segments[2:], query, body)
        elif segments and segments[0] == "faults":
            found = self._fault_route(m, segments[1:], query, body)
        if found is not None:
            return found
        raise ApiError(404, f"no route {url.path!r}; see the module documentation of "
                            "pytest_iotfailover.fakehub.control_api for the routes")

    def _device_route(self, m: str, device_id: str, rest: list[str], query: str, body: bytes) -> Any:
        api = self.server.control
        if rest == ["c2d"]:
            _allow(m, "POST")
            _params(query)
            return 200, api.send_c2d(device_id, _json_object(body)), None
        if len(rest) == 2 and rest[0] == "methods":
            _allow(m, "POST")
            _params(query)
            return 200, api.invoke_method(device_id, rest[1], _json_object(body)), None
        if rest == ["twin"]:
            _allow(m, "GET")
            _params(query)
            return 200, api.get_twin(device_id), None
        if rest == ["twin", "desired"]:
            _allow(m, "PATCH")
            _params(query)
            return 200, api.update_desired(device_id, _json_object(body)), None
        return None

    def _fault_route(self, m: str, rest: list[str], query: str, body: bytes) -> Any:
        api = self.server.control
        if not rest:
            _allow(m, "GET")
            _params(query)
            return 200, api.list_faults(), None
        if len(rest) == 1:
            # POST names a kind to start; the other methods name a fault already started
            _allow(m, "GET", "POST", "DELETE")
            _params(query)
            if m == "POST":
                api.check_fault_kind(rest[0])
                return 201, api.start_fault(rest[0], _json_object(body, allow_empty=True)), None
            if m == "DELETE":
                return 200, api.cancel_fault(rest[0]), None
            return 200, api.get_fault(rest[0]), None
        if len(rest) == 2 and rest[1] == "wait":
            _allow(m, "POST")
            _params(query)
            return 200, api.wait_fault(rest[0], _json_object(body, allow_empty=True)), None
        return None


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise ApiError(405, f"method {method} not allowed here; use {' or '.join(allowed)}",
                       {"Allow": ", ".join(allowed)})


def _params(query: str, *known: str) -> dict[str, str]:
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "query string is not valid percent-encoded UTF-8") from None
    out = {}
    for name, values in parsed.items():
        if name not in known:
            allowed = ", ".join(known) if known else "none"
            raise ApiError(400, f"unknown query parameter {name!r} (allowed: {allowed})")
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name!r} given {len(values)} times")
        out[name] = values[0]
    return out


def _json_object(body: bytes, allow_empty: bool = False) -> dict[str, Any]:
    if not body.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # includes integers beyond the interpreter's digit limit
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(obj).__name__}")
    _check_json(obj)
    return obj

def _field(obj: dict[str, Any], name: str, types, type_name: str, required: bool = True,
           default: Any = None) -> Any:
    if name not in obj:
        if required:
            raise ApiError(400, f"missing field {name!r} ({type_name})")
        return default
    value = obj[name]
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int subclass, but true/false is never a valid number here
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ApiError(400, f"field {name!r} must be {type_name}, not {type(value).__name__}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _fault_arg_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # bool is an int subclass, but true/false is never a valid number here
    if isinstance(value, int):
        return abs(value) <= _MAX_JSON_INT
    # json reads 1e400 as infinity, which no fault argument can mean
    return kind == "number" and isinstance(value, float) and math.isfinite(value)


def _fault_spec(kind: str, obj: dict[str, Any]) -> FaultSpec:
    """The fault spec of `obj`, its JSON types held to strictly (true is no number, 2.0 no
    integer); ranges and combinations are the spec's own checks, named after this request."""
    args = _FAULT_ARGS[kind]
    extra = sorted(set(obj) - set(args))
    if extra:
        raise ApiError(400, f"unknown argument{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                            f"for {kind} (allowed: {', '.join(args) or 'none'})")
    for name, (want, nullable, required) in args.items():
        what = f"{'an' if want == 'integer' else 'a'} {want}{' or null' if nullable else ''}"
        if name not in obj:
            if required:
                raise ApiError(400, f"missing argument {name!r} for {kind} ({what})")
            continue
        value = obj[name]
        if value is None and nullable:
            continue
        if not _fault_arg_ok(want, value):
            got = _json_type(value)
            if got == "number" and want in ("integer", "number"):
                out_of_range = isinstance(value, int) or not math.isfinite(value)
                got = "a number out of range" if out_of_range else repr(value)
            raise ApiError(400, f"argument {name!r} of {kind} must be {what}, not {got}")
    try:
        return spec_for(kind, obj, what=f"POST /faults/{kind}")
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None


def _fault_json(index: int, handle: FaultHandle) -> dict[str, Any]:
    return {"id": index, "kind": handle.kind, "device_id": handle.device_id, "params": handle.params,
            "state": handle.state, "started_at": handle.started_at, "ended_at": handle.ended_at}


def _fault_with_report(index: int, handle: FaultHandle) -> dict[str, Any]:
    out = _fault_json(index, handle)
    out["report"] = dataclasses.asdict(handle.report())
    return out


def _no_extra_fields(obj: dict[str, Any], *known: str) -> None:
    extra = sorted(set(obj) - set(known))
    if extra:
        raise ApiError(400, f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                            f"(allowed: {', '.join(known)})")


class ControlServer:
    """The HTTP control API for `hub`, served from its own daemon thread on a loopback address."""

    def __init__(self, hub, host: str | None = "127.0.0.1", port: int = 0, token: str | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        self.hub = hub
        self.host = _loopback_address(host or "127.0.0.1")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"invalid control API port {port!r}: expected 0-65535")
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) \
                or not 0 < request_timeout <= 3600:
            raise ValueError(f"invalid control API request timeout {request_timeout!r}: "
                             "expected more than 0 and at most 3600 seconds")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
                or not 1 <= max_connections <= 10000:
            raise ValueError(f"invalid control API connection limit {max_connections!r}: expected 1-10000")
        self.request_timeout = float(request_timeout)
        self.max_connections = max_connections
        if token is None:
            token = secrets.token_urlsafe(32)
        if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable() \
                or " " in token:
            raise ValueError("control token must be a non-empty printable ASCII string without spaces")
        self.token = token
        # a test that starts a control API for its hub must not print the token in its reports
        from ..redaction import remember
        remember(token)
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> typing.Self:
        if self._httpd is not None:
            raise RuntimeError("this ControlServer was already started")
        try:
            self._httpd = _Server((self.host, self._port), self)
        except OSError as exc:
            raise OSError(exc.errno, f"control API cannot listen on {self.host}:{self._port}: "
                                     f"{exc.strerror or exc}") from None
        literal = f"[{self.host}]" if ":" in self.host else self.host
        # the first is the one error messages suggest; port 80 is the one a client may leave out
        self.host_names = tuple(f"{name}:{self.port}" for name in (literal, "localhost"))
        if self.port == 80:
            self.host_names += (literal, "localhost")
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"iotfailover-control[{self.host}:{self.port}]", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._closing.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_open_connections()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> typing.Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._port
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self):
        return f"<ControlServer {self.url} for {self.hub!r}>"

    # --- operations (called from handler threads) ------------------------------------------------

    def _known_device(self, device_id: str) -> None:
        if self.hub.registry.get(device_id) is None:
            raise ApiError(404, f"no device {device_id!r} on hub {self.hub.hub_name!r}")

    def telemetry(self, device_id: str | None) -> list[dict[str, Any]]:
        if device_id is not None:
            self._known_device(device_id)
        return [{
            "device_id": t.device_id,
            "message_id": t.message_id,
            "body_base64": base64.b64encode(t.body).decode("ascii"),
            "properties": t.properties,
            "system_properties": t.system_properties,
            "dup": t.dup,
            "duplicate": t.duplicate,
            "qos": t.qos,
            "enqueued_at": t.enqueued_at,
            "lost_in_failover": t.lost_in_failover,
        } for t in self.hub.telemetry(device_id, include_lost=True)]  # the ledger: lost ones marked

    def events(self, kind: str | None, device_id: str | None) -> list[dict[str, Any]]:
        return [{"kind": e.kind, "device_id": e.device_id, "at": e.at, "detail": e.detail}
                for e in self.hub.event_log.list(kind, device_id)]

    def list_devices(self) -> list[dict[str, Any]]:
        return [{"device_id": d.device_id, "enabled": d.enabled, "connection_string": d.connection_string}
                for d in self.hub.devices]

    def add_device(self, obj: dict[str, Any]) -> dict[str, Any]:
        _no_extra_fields(obj, "device_id", "primary_key")
        device_id = _field(obj, "device_id", str, "a string")
        primary_key = _field(obj, "primary_key", str, "a base64 string", required=False)
        try:
            check_device_id(device_id)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if self.hub.registry.get(device_id) is not None:
            raise ApiError(409, f"device {device_id!r} already exists")
        try:
            dev = self.hub.add_device(device_id, primary_key)
        except ValueError as exc:
            status = 409 if self.hub.registry.get(device_id) is not None else 400
            raise ApiError(status, str(exc)) from None
        return {"device_id": dev.device_id, "connection_string": dev.connection_string}

    def add_devices(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A bulk create, as IoT Hub's bulk registry API: at most 100 ids, checked before any is
        made (409 if any exists already, 400 for a bad or repeated id: then none is created)."""
        _no_extra_fields(obj, "device_ids")
        ids = _field(obj, "device_ids", list, "an array of device id strings")
        if not 1 <= len(ids) <= BULK_REGISTRY_LIMIT:
            raise ApiError(400, f"field 'device_ids' must hold 1 to {BULK_REGISTRY_LIMIT} ids (IoT Hub's bulk "
                                f"registry limit), got {len(ids)}")
        for index, device_id in enumerate(ids):
            try:
                check_device_id(device_id)
            except ValueError as exc:
                raise ApiError(400, f"device_ids[{index}]: {exc}") from None
        if len(set(ids)) != len(ids):
            raise ApiError(400, "field 'device_ids' names a device more than once")
        taken = [d for d in ids if self.hub.registry.get(d) is not None]
        if taken:
            raise ApiError(409, f"device{'s' if len(taken) > 1 else ''} {', '.join(map(repr, taken[:5]))} "
                                "already exist; none was created")
        try:
            devices = self.hub.add_devices(ids)
        except ValueError as exc:  # created by another caller meanwhile
            raise ApiError(409 if any(self.hub.registry.get(d) for d in ids) else 400, str(exc)) from None
        return {"devices": [{"device_id": d.device_id, "connection_string": d.connection_string} for d in devices]}

    def remove_device(self, device_id: str) -> dict[str, Any]:
        self._known_device(device_id)
        try:
            self.hub.remove_device(device_id)
        except KeyError:  # removed by another caller meanwhile
            raise ApiError(404, f"no device {device_id!r} on hub {self.hub.hub_name!r}") from None
        return {"device_id": device_id}

    def send_c2d(self, device_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        _no_extra_fields(obj, "body", "body_base64", "properties", "message_id", "ttl", "expiry_time", "ack")
        if ("body" in obj) == ("body_base64" in obj):
            raise ApiError(400, "give exactly one of 'body' (a string) and 'body_base64'")
        if "body" in obj:
            body = _field(obj, "body", str, "a string").encode("utf-8")
        else:
            try:
                body = base64.b64decode(_field(obj, "body_base64", str, "a base64 string"), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "field 'body_base64' is not valid base64") from None
        properties = _field(obj, "properties", dict, "an object of strings", required=False, default={})
        for key, value in properties.items():
            if not isinstance(value, str):
                raise ApiError(400, f"property {key!r} must be a string, not {type(value).__name__}")
        message_id = _field(obj, "message_id", str, "a string", required=False)
        terms = {"ttl": _field(obj, "ttl", (int, float), "a number of seconds", required=False),
                 "expiry_time": _field(obj, "expiry_time", (int, float), "epoch seconds", required=False),
                 "ack": _field(obj, "ack", str, "none, positive, negative or full", required=False)}
        self._known_device(device_id)
        try:
            return {"message_id": self.hub.send_c2d(device_id, body, properties, message_id=message_id, **terms)}
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None

    def feedback(self, device_id: str | None, message_id: str | None) -> list[dict[str, Any]]:
        return [dict(r.as_json(), enqueued_at=r.enqueued_at)
                for r in self.hub.feedback(device_id, message_id=message_id)]

    def invoke_method(self, device_id: str, method_name: str, obj: dict[str, Any]) -> dict[str, Any]:
        _no_extra_fields(obj, "payload", "timeout")
        timeout = _field(obj, "timeout", (int, float), "a number of seconds", required=False, default=30.0)
        if not 0 < timeout <= MAX_METHOD_TIMEOUT:
            raise ApiError(400, f"field 'timeout' must be more than 0 and at most {MAX_METHOD_TIMEOUT:g} s, "
                                f"got {timeout!r}")
        self._known_device(device_id)
        response = self.hub.invoke_method(device_id, method_name, obj.get("payload"), float(timeout))
        return {"status": response.status, "payload": response.payload}

    def get_twin(self, device_id: str) -> dict[str, Any]:
        self._known_device(device_id)
        return self.hub.get_twin(device_id)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        self._known_device(device_id)
        return {"version": self.hub.update_desired(device_id, patch)}

    # Each fault operation reads or changes fault state in one call on the hub thread, which owns
    # it: read from here, a fault could show state "active" before its start time is set.

    def check_fault_kind(self, kind: str) -> None:
        if kind not in FAULT_KINDS:
            raise ApiError(404, f"unknown fault kind {kind!r}; the kinds are {', '.join(FAULT_KINDS)}")

    def start_fault(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.check_fault_kind(kind)
        spec = _fault_spec(kind, obj)
        if getattr(spec, "dns", False):
            raise ApiError(400, f"POST /faults/{kind}: dns=true cannot be offered by the standalone hub: a dns "
                                "failover moves the hub's host name by patching name resolution inside the process "
                                "that runs the devices (FakeHub(dns=True)), and this hub runs in a process of its own")

        def run():
            # history only grows, and only on this thread: the new fault lands at its current length
            index = len(self.hub.faults.history())
            return _fault_json(index, self.hub.faults.start(spec))
        try:
            return self.hub._call(run)
        except (ValueError, TypeError) as exc:
            # the hub's own refusals: an unknown device, an outage overlapping another
            raise ApiError(400, f"POST /faults/{kind}: {exc}") from None

    def list_faults(self) -> list[dict[str, Any]]:
        return self.hub._call(lambda: [_fault_json(i, h) for i, h in enumerate(self.hub.faults.history())])

    def _fault(self, fault_id: str) -> tuple[int, FaultHandle]:
        history = self.hub.faults.history()
        if _FAULT_ID.fullmatch(fault_id) and int(fault_id) < len(history):
            return int(fault_id), history[int(fault_id)]
        known = f"ids are 0 to {len(history) - 1}" if history else "no fault has been started"
        raise ApiError(404, f"no fault {fault_id!r} on hub {self.hub.hub_name!r}; {known} (GET /faults)")

    def get_fault(self, fault_id: str) -> dict[str, Any]:
        index, handle = self._fault(fault_id)
        return self.hub._call(_fault_with_report, index, handle)

    def cancel_fault(self, fault_id: str) -> dict[str, Any]:
        index, handle = self._fault(fault_id)

        def run():
            handle.cancel()
            return _fault_json(index, handle)
        return self.hub._call(run)

    def wait_fault(self, fault_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        index, handle = self._fault(fault_id)
        _no_extra_fields(obj, "timeout")
        timeout = _field(obj, "timeout", (int, float), "a number of seconds", required=False,
                         default=DEFAULT_FAULT_WAIT)
        if not 0 < timeout <= MAX_FAULT_WAIT:
            raise ApiError(400, f"field 'timeout' must be more than 0 and at most {MAX_FAULT_WAIT:g} s, "
                                f"got {timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                handle.wait(max(min(remaining, _WAIT_SLICE), 0.0))
                break
            except TimeoutError:
                pass
            if self._closing.is_set():
                raise ApiError(503, "the control API is shutting down")
            if not self.hub.running:
                raise ApiError(503, "the hub is not running")
            if remaining <= _WAIT_SLICE:
                raise ApiError(504, f"fault {index} ({handle.kind}) is still {handle.state} "
                                    f"after {timeout:g} s")
        return self.hub._call(_fault_with_report, index, handle)
