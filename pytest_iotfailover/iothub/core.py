"""IoT Hub's device-facing MQTT semantics on decoded packets. No sockets, no event loop.

The server hands each accepted TCP/TLS connection to `IoTHubCore.open(link)` and feeds it the
packets it decodes. A `link` is anything with `send(bytes)`, `close(abort=False)` and
`set_keep_alive(seconds)`; a `scheduler` is anything with `call_later(delay, fn)` and `time()`
(an asyncio loop is one). Everything here runs on the scheduler's thread.

Behaviour follows the project's notes on the real hub (iothub-mqtt.md); section numbers in
comments refer to it.
"""
import functools
import itertools
import json
import re
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Optional
from urllib.parse import quote, unquote

from .mqtt import codec, packets as p
from .auth import AuthError, parse_username, verify_sas_token
from .events import EventLog
from .ledger import Ledger, Telemetry
from .registry import Registry
from ..errors import HubOperationError, ProtocolViolation

MAX_D2C_SIZE = 256 * 1024
MAX_SUBSCRIPTIONS = 5
C2D_QUEUE_LIMIT = 50
MAX_SERVER_KEEPALIVE = 1767.0  # §1.4: 1.5 x keep-alive, capped by the load balancer's idle timeout

SYSTEM_PROPERTY_NAMES = {
    "$.mid": "message_id",
    "$.cid": "correlation_id",
    "$.uid": "user_id",
    "$.to": "to",
    "$.ct": "content_type",
    "$.ce": "content_encoding",
    "$.exp": "expiry_time_utc",
    "$.on": "output_name",
    "$.ifid": "interface_id",
    "$.ctime": "creation_time_utc",
    "$.sub": "component_name",
    "$.diagid": "diagnostic_id",
    "$.diagctx": "diagnostic_context",
    "$.cdid": "edge_connection_device_id",
    "$.cmid": "edge_connection_module_id",
}
AUTH_METHOD = '{"scope":"device","type":"sas","issuer":"iothub"}'

# Twin limits (failover-facts.md "Limits", from iot-hub-devguide-device-twins.md); operations
# that break them are rejected with status 400 (iothub-mqtt.md §5.2).
MAX_TWIN_DEPTH = 10            # the desired or reported object itself is level 1 (assumption)
MAX_TWIN_SECTION = 32 * 1024   # desired and reported each, measured here as compact JSON
MAX_TWIN_KEY = 1024
MAX_TWIN_STRING = 4 * 1024
MAX_TWIN_INT = 4503599627370495
MAX_METHOD_PAYLOAD = 128 * 1024  # direct method request and response (failover-facts.md "Limits")

_METHOD_STATUS = re.compile(r"-?[0-9]{1,9}")

TWIN_RES_FILTER = "$iothub/twin/res/#"
TWIN_DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"




@dataclass
class MethodResponse:
    status: int
    payload: Any = None


@dataclass
class C2DMessage:
    body: bytes
    properties: Dict[str, Optional[str]]
    message_id: str
    delivery_count: int = 0


@dataclass
class Twin:
    desired: Dict[str, Any] = field(default_factory=dict)
    reported: Dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1

    def document(self) -> Dict[str, Any]:
        return {"desired": dict(json.loads(json.dumps(self.desired)), **{"$version": self.desired_version}),
                "reported": dict(json.loads(json.dumps(self.reported)), **{"$version": self.reported_version})}


@dataclass
class Session:
    """What IoT Hub keeps for a clean_session=0 device between connections."""
    subscriptions: Dict[str, int] = field(default_factory=dict)
    inflight: Dict[int, C2DMessage] = field(default_factory=dict)
    clean: bool = False


def c2d_body(body) -> bytes:
    """A C2D body as IoT Hub takes it: str (UTF-8) or bytes, at most 64 KB."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"C2D body must be str or bytes, not {type(body).__name__}")
    if len(body) > 64 * 1024:
        raise HubOperationError(f"C2D message of {len(body)} bytes exceeds IoT Hub's 64 KB limit", 400000)
    return bytes(body)


def merge_patch(target: Dict[str, Any], patch: Dict[str, Any]) -> None:
    """Twin patch semantics: members replace, null deletes, objects merge recursively (§5.3)."""
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            sub = target.get(key)
            if not isinstance(sub, dict):
                sub = target[key] = {}
            merge_patch(sub, value)
        else:
            target[key] = value


@functools.lru_cache(maxsize=1024)
def _unquote_short_key(k: str) -> str:
    return unquote(k)


def _unquote_key(k: str) -> str:
    # the same few keys recur in every message; a peer's long one-off keys must not sit in a cache
    return _unquote_short_key(k) if len(k) <= 64 else unquote(k)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(payload: bytes) -> Any:
    """Strict JSON from a peer: ValueError for bad UTF-8, bad JSON, NaN/Infinity, too deep."""
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def twin_problem(section: Any) -> Optional[str]:
    """Why `section` breaks IoT Hub's twin limits, or None. Iterative: depth is the peer's choice."""
    if not isinstance(section, dict):
        return "twin properties must be a JSON object"
    stack = [(section, 1)]
    while stack:
        node, depth = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and len(key.encode("utf-8", "replace")) > MAX_TWIN_KEY:
                return f"a property name is longer than {MAX_TWIN_KEY} bytes"
            if isinstance(value, (dict, list)):
                # arrays count as a level too (assumption: the docs speak of objects only)
                if depth + 1 > MAX_TWIN_DEPTH:
                    return f"twin properties are nested deeper than {MAX_TWIN_DEPTH} levels"
                stack.append((value, depth + 1))
            elif isinstance(value, str):
                if len(value.encode("utf-8", "replace")) > MAX_TWIN_STRING:
                    return f"a string value is longer than {MAX_TWIN_STRING} bytes"
            elif isinstance(value, int) and not isinstance(value, bool):
                if abs(value) > MAX_TWIN_INT:
                    return f"integer {clip_text(str(value), 40)} is outside +-{MAX_TWIN_INT}"
    return None


def twin_section_size(section: Dict[str, Any]) -> int:
    return len(json.dumps(section, separators=(",", ":")).encode("utf-8"))


def clip_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_query(query: str) -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for item in query.split("&"):
        if not item:
            continue
        k, sep, v = item.partition("=")
        out[unquote(k)] = unquote(v) if sep else None
    return out


def encode_property_bag(system: Dict[str, Optional[str]], custom: Dict[str, Optional[str]]) -> str:
    parts = []
    for k, v in list(system.items()) + list(custom.items()):
        key = quote(k, safe="")
        parts.append(key if v is None else f"{key}={quote(str(v), safe='')}")
    return "&".join(parts)


def _error_body(code: int, message: str) -> bytes:
    return json.dumps({"errorCode": code, "message": message,
                       "timestampUtc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()


class Connection:
    """One device connection, from CONNECT to close."""

    def __init__(self, core: "IoTHubCore", link, peer: str = ""):
        self.core = core
        self.link = link
        self.peer = peer
        self.device_id: Optional[str] = None
        self.connected = False
        self.closed = False
        self.close_reason: Optional[str] = None
        self.graceful = False
        self.doomed = False  # a fault has decided to close it shortly
        self.will: Optional[p.Will] = None
        self.session: Optional[Session] = None
        self.model_id: Optional[str] = None
        self.token_expiry: Optional[int] = None
        self._events_prefix = ""
        self._expiry_timer = None
        self._next_pid = 0
        self.opened_at = core.scheduler.time()

    def __repr__(self):
        return f"<Connection {self.device_id or '?'} from {self.peer}>"

    # --- plumbing -------------------------------------------------------------------------

    def send(self, packet) -> None:
        if not self.closed:
            self.link.send(codec.encode(packet))

    def close(self, reason: str, abort: bool = False, **detail) -> None:
        """Hub-initiated close (MQTT 3.1.1 has no server DISCONNECT: the socket just closes)."""
        if self.closed:
            return
        if self.close_reason is None:
            self.close_reason = reason
            self._close_detail = detail
        self.link.close(abort=abort)

    def next_packet_id(self) -> int:
        for _ in range(65535):
            self._next_pid = self._next_pid % 65535 + 1
            if self.session is None or self._next_pid not in self.session.inflight:
                return self._next_pid
        raise HubOperationError("no free MQTT packet id: 65535 messages in flight", 403004)

    # --- inbound ---------------------------------------------------------------------------

    def received(self, packet) -> None:
        if self.closed:
            return
        try:
            if not self.connected:
                if packet.type != p.CONNECT:
                    raise ProtocolViolation(f"first packet was {p.PACKET_NAMES[packet.type]}, not CONNECT")
                self.core.on_connect(self, packet)
                return
            t = packet.type
            if t == p.PUBLISH:
                self.core.on_publish(self, packet)
            elif t == p.PUBACK:
                self.core.on_puback(self, packet.packet_id)
            elif t == p.PINGREQ:
                self.send(p.Pingresp())
            elif t == p.SUBSCRIBE:
                self.core.on_subscribe(self, packet)
            elif t == p.UNSUBSCRIBE:
                self.core.on_unsubscribe(self, packet)
            elif t == p.DISCONNECT:
                self.graceful = True
                self.close("client")
            else:
                raise ProtocolViolation(f"{p.PACKET_NAMES[t]} is not accepted from a device")
        except ProtocolViolation as exc:
            self.protocol_violation(str(exc))

    def protocol_violation(self, message: str) -> None:
        self.core.events.add("protocol_violation", self.device_id, message=message, peer=self.peer)
        self.close("protocol_violation", message=message)

    def connection_lost(self) -> None:
        """The server calls this once the socket is gone, whoever closed it."""
        if self.closed:
            return
        self.closed = True
        self.core.on_connection_lost(self)


class IoTHubCore:
    def __init__(self, hostname: str, registry: Registry, ledger: Ledger, events: EventLog,
                 scheduler, *, token_grace: float = 300.0, retain_property: str = "mqtt-retain"):
        self.hostname = hostname
        self.registry = registry
        self.ledger = ledger
        self.events = events
        self.scheduler = scheduler
        self.token_grace = token_grace
        self.retain_property = retain_property
        self.connections: Dict[str, Connection] = {}     # authenticated, one per device
        self.open_connections: set = set()               # every socket, authenticated or not
        self.sessions: Dict[str, Session] = {}
        self.c2d_queues: Dict[str, Deque[C2DMessage]] = {}
        self.twins: Dict[str, Twin] = {}
        self.region = "primary"
        self.faults = None  # the fault engine plugs in here (faults.py)
        self._method_calls: Dict[str, tuple] = {}
        self._rids = itertools.count(1)
        self._c2d_ids = itertools.count(1)

    # --- connections -------------------------------------------------------------------------

    def open(self, link, peer: str = "") -> Connection:
        conn = Connection(self, link, peer)
        self.open_connections.add(conn)
        return conn

    def _refuse(self, conn: Connection, code: int, device_id: Optional[str], why: str, **detail) -> None:
        kind = "auth_failure" if code in (p.CONNACK_BAD_CREDENTIALS, p.CONNACK_NOT_AUTHORIZED) else "connect_refused"
        self.events.add(kind, device_id, reason=why, return_code=code, peer=conn.peer, **detail)
        conn.send(p.Connack(code, False))
        conn.close("refused", return_code=code)

    def on_connect(self, conn: Connection, pkt: p.Connect) -> None:
        if pkt.protocol_name != "MQTT" or pkt.protocol_level != 4:
            return self._refuse(conn, p.CONNACK_BAD_PROTOCOL, None,
                                f"protocol {pkt.protocol_name!r} level {pkt.protocol_level} is not MQTT 3.1.1")
        client_id = pkt.client_id
        if self.faults is not None:
            verdict = self.faults.on_connect_attempt(conn, client_id)
            if verdict is not None:
                fault, code = verdict
                if code == "silence":
                    self.events.add("connect_ignored", client_id, fault=fault.kind, fault_id=fault.id,
                                    peer=conn.peer)
                    return
                return self._refuse(conn, code, client_id, f"{fault.kind} fault", fault_id=fault.id)
        try:
            if "/" in client_id:
                raise AuthError(f"client id {client_id!r} names a module; this hub knows devices only")
            user = parse_username(pkt.username or "")
            if user.hostname.lower() != self.hostname.lower():
                raise AuthError(f"user name names hub {user.hostname!r}, not {self.hostname!r}")
            if user.device_id != client_id or user.module_id is not None:
                raise AuthError(f"user name identity {user.device_id!r} does not match client id {client_id!r}")
            device = self.registry.get(client_id)
            if device is None:
                raise AuthError(f"device {client_id!r} is not registered")
            if not device.enabled:
                raise AuthError(f"device {client_id!r} is disabled")
            if pkt.password is None:
                raise AuthError("CONNECT has no password (SAS token)")
            try:
                password = pkt.password.decode("utf-8")
            except UnicodeDecodeError:
                raise AuthError("password is not UTF-8") from None
            token = verify_sas_token(password, hostname=self.hostname, device_id=client_id,
                                     keys=(device.primary_key, device.secondary_key),
                                     now=time.time(), clock_skew=self.token_grace)
        except AuthError as exc:
            known = self.registry.get(client_id) is not None
            return self._refuse(conn, p.CONNACK_NOT_AUTHORIZED, client_id if known else None, str(exc))

        device_id = client_id
        old = self.connections.get(device_id)
        if old is not None and old is not conn:
            # §1.6: the newer connection wins; the session moves over to it
            old.close("replaced")
            self._detach(old)
        session_present = False
        if pkt.clean_session:
            self.sessions.pop(device_id, None)
            self.c2d_queues.pop(device_id, None)
            session = Session(clean=True)
        else:
            session = self.sessions.get(device_id)
            session_present = session is not None and not session.clean
            if not session_present:
                session = Session()
        self.sessions[device_id] = session

        conn.device_id = device_id
        conn.session = session
        conn.connected = True
        conn.will = pkt.will
        conn.model_id = user.params.get("model-id")
        conn.token_expiry = token.expiry
        conn._events_prefix = f"devices/{device_id}/messages/events"
        self.connections[device_id] = conn
        conn.link.set_keep_alive(min(1.5 * pkt.keep_alive, MAX_SERVER_KEEPALIVE)
                                 if pkt.keep_alive else MAX_SERVER_KEEPALIVE)
        delay = token.expiry + self.token_grace - time.time()
        conn._expiry_timer = self.scheduler.call_later(max(delay, 0.0), self._token_expired, conn)
        conn.send(p.Connack(p.CONNACK_ACCEPTED, session_present))
        self.events.add("connect", device_id, session_present=session_present,
                        clean_session=pkt.clean_session, keep_alive=pkt.keep_alive,
                        api_version=user.api_version, peer=conn.peer, region=self.region)
        if conn.will is not None:
            problem = self._will_problem(conn, conn.will)
            if problem is not None:
                conn.will = None
                self.events.add("will_rejected", device_id, reason=problem, peer=conn.peer)
        # §1.3: queued C2D is pushed straight after CONNACK when the session holds the subscription
        self._pump_c2d(device_id, redeliver=True)

    def _token_expired(self, conn: Connection) -> None:
        if not conn.closed:
            conn.close("token_expired", expiry=conn.token_expiry)

    def _detach(self, conn: Connection) -> None:
        if self.connections.get(conn.device_id) is conn:
            del self.connections[conn.device_id]

    def on_connection_lost(self, conn: Connection) -> None:
        self.open_connections.discard(conn)
        if conn._expiry_timer is not None:
            conn._expiry_timer.cancel()
        if not conn.connected:
            return
        reason = conn.close_reason or "connection_lost"
        detail = dict(getattr(conn, "_close_detail", {}) or {})
        self.events.add("disconnect", conn.device_id, reason=reason, peer=conn.peer, **detail)
        if conn.will is not None and not conn.graceful:
            self._record_will(conn)
        if self.connections.get(conn.device_id) is conn:
            del self.connections[conn.device_id]
            if conn.session is not None and conn.session.clean:
                self.sessions.pop(conn.device_id, None)

    def _will_problem(self, conn: Connection, will: p.Will) -> Optional[str]:
        """Why IoT Hub would not take this will as the device's telemetry, or None.

        D-MQTT: the will topic must be the device's own telemetry topic (iothub-mqtt.md §1.2,
        §1.5). What the real hub does with another topic is not documented; the fake accepts
        the connection and drops the will (assumption), so that nothing the hub would not have
        accepted as telemetry reaches the ledger.
        """
        if not will.topic.startswith(conn._events_prefix):
            return f"will topic {will.topic!r} is not devices/{conn.device_id}/messages/events/"
        try:
            self._parse_d2c_topic(conn, will.topic)
        except ProtocolViolation as exc:
            return f"will topic: {exc}"
        return None

    def _record_will(self, conn: Connection) -> None:
        will = conn.will
        props, sysprops = self._parse_d2c_topic(conn, will.topic)  # checked at CONNECT
        props["iothub-MessageType"] = "Will"
        if will.retain:
            props[self.retain_property] = "true"
        self._accept_d2c(conn, will.message, props, sysprops, dup=False, qos=min(will.qos, 1))

    # --- device-to-cloud ---------------------------------------------------------------------

    def _parse_d2c_topic(self, conn: Connection, topic: str):
        rest = topic[len(conn._events_prefix):]
        if rest and rest[0] != "/":
            raise ProtocolViolation(f"unsupported topic {topic!r}")
        bag = rest[1:].rstrip("/")
        props: Dict[str, str] = {}
        sysprops: Dict[str, str] = {}
        if bag:
            if "/" in bag:
                raise ProtocolViolation("property bag contains an unencoded '/'")
            for item in bag.split("&"):
                if not item:
                    continue
                k, _, v = item.partition("=")
                if "%" in k:
                    k = _unquote_key(k)
                if "%" in v:
                    v = unquote(v)
                if k.startswith("$."):
                    sysprops[SYSTEM_PROPERTY_NAMES.get(k, k)] = v
                else:
                    props[k] = v
        return props, sysprops

    def on_publish(self, conn: Connection, pkt: p.Publish) -> None:
        if pkt.qos == 2:
            raise ProtocolViolation("QoS 2 is not supported by IoT Hub")
        topic = pkt.topic
        if topic.startswith(conn._events_prefix):
            props, sysprops = self._parse_d2c_topic(conn, topic)
            size = len(pkt.payload) + len(topic)
            if size > MAX_D2C_SIZE:
                size = len(pkt.payload) + sum(len(k) + len(v) for k, v in props.items()) + \
                    sum(len(v) for v in sysprops.values())
            if size > MAX_D2C_SIZE:
                raise ProtocolViolation(f"message of {size} bytes exceeds IoT Hub's 256 KB limit")
            if pkt.retain:
                props[self.retain_property] = "true"
            action = None if self.faults is None else self.faults.on_d2c(conn, pkt, props)
            if action is None:
                self._accept_d2c(conn, pkt.payload, props, sysprops, pkt.dup, pkt.qos)
                if pkt.qos:
                    self.ack(conn, pkt.packet_id)
                return
            if action.consume:
                return
            self._accept_d2c(conn, pkt.payload, props, sysprops, pkt.dup, pkt.qos)
            if action.close_after_accept:
                conn.close(action.reason, abort=True, message_id=sysprops.get("message_id"))
            elif pkt.qos and action.ack_delay > 0:
                self.scheduler.call_later(action.ack_delay, self.ack, conn, pkt.packet_id)
            elif pkt.qos:
                self.ack(conn, pkt.packet_id)
            return
        if topic.startswith("$iothub/"):
            self._on_iothub_publish(conn, pkt)
            if pkt.qos:
                self.ack(conn, pkt.packet_id)
            return
        raise ProtocolViolation(f"unsupported topic {topic!r}")

    def ack(self, conn: Connection, packet_id: int) -> None:
        if not conn.closed:
            conn.link.send(codec.encode_puback(packet_id))

    def _accept_d2c(self, conn, body, props, sysprops, dup, qos) -> Telemetry:
        sysprops["connection_device_id"] = conn.device_id
        sysprops["connection_auth_method"] = AUTH_METHOD
        if conn.model_id:
            sysprops["dt_dataschema"] = conn.model_id
        t = self.ledger.record(Telemetry(conn.device_id, sysprops.get("message_id"), body, props,
                                         sysprops, time.time(), dup, False, qos))
        if self.faults is not None:
            self.faults.on_accepted(conn, t)
        return t

    # --- $iothub topics: twin and methods ----------------------------------------------------

    def _on_iothub_publish(self, conn: Connection, pkt: p.Publish) -> None:
        topic = pkt.topic
        path, _, query = topic.partition("/?")
        params = parse_query(query)
        if path == "$iothub/twin/GET":
            return self._twin_get(conn, params.get("$rid"))
        if path == "$iothub/twin/PATCH/properties/reported":
            return self._twin_patch(conn, params.get("$rid"), pkt.payload)
        if path.startswith("$iothub/methods/res/"):
            return self._method_response(conn, path[len("$iothub/methods/res/"):], params.get("$rid"),
                                         pkt.payload)
        raise ProtocolViolation(f"unsupported topic {topic!r}")

    def _twin_reply(self, conn: Connection, status: int, rid: Optional[str], body: bytes = b"",
                    version: Optional[int] = None) -> None:
        if TWIN_RES_FILTER not in conn.session.subscriptions:
            return  # §5.1: no response subscription, no response
        topic = f"$iothub/twin/res/{status}/?$rid={quote(rid or '', safe='')}"
        if version is not None:
            topic += f"&$version={version}"
        conn.send(p.Publish(topic, body, 0))

    def twin(self, device_id: str) -> Twin:
        twin = self.twins.get(device_id)
        if twin is None:
            twin = self.twins[device_id] = Twin()
        return twin

    def _twin_get(self, conn: Connection, rid: Optional[str]) -> None:
        if rid is None:
            return self._twin_reply(conn, 400, rid, _error_body(400004, "twin request has no $rid"))
        body = json.dumps(self.twin(conn.device_id).document(), separators=(",", ":")).encode()
        self._twin_reply(conn, 200, rid, body)

    def _twin_patch(self, conn: Connection, rid: Optional[str], payload: bytes) -> None:
        try:
            patch = load_json(payload)
        except ValueError as exc:
            return self._twin_reply(conn, 400, rid, _error_body(
                400004, f"reported properties are not valid JSON: {clip_text(str(exc), 120)}"))
        if not isinstance(patch, dict):
            return self._twin_reply(conn, 400, rid, _error_body(400004, "reported properties must be a JSON object"))
        problem = twin_problem(patch)
        if problem is not None:
            return self._twin_reply(conn, 400, rid, _error_body(400004, f"reported properties rejected: {problem}"))
        twin = self.twin(conn.device_id)
        # merged on a copy: a patch that would make the document too large changes nothing
        merged = json.loads(json.dumps(twin.reported))
        merge_patch(merged, patch)
        size = twin_section_size(merged)
        if size > MAX_TWIN_SECTION:
            return self._twin_reply(conn, 400, rid, _error_body(
                400004, f"reported properties would be {size} bytes, over IoT Hub's {MAX_TWIN_SECTION} limit"))
        twin.reported = merged
        twin.reported_version += 1
        self.events.add("twin_reported", conn.device_id, version=twin.reported_version)
        self._twin_reply(conn, 204, rid, b"", twin.reported_version)

    def update_desired(self, device_id: str, patch: Dict[str, Any]) -> int:
        if self.registry.get(device_id) is None:
            raise HubOperationError(f"device {device_id!r} is not registered", 404001)
        if not isinstance(patch, dict):
            raise HubOperationError("desired patch must be a JSON object (dict)", 400004)
        try:
            body_obj = json.loads(json.dumps(patch, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise HubOperationError(f"desired patch is not JSON-serialisable: {exc}", 400004) from None
        problem = twin_problem(body_obj)
        if problem is not None:
            raise HubOperationError(f"desired patch rejected: {problem}", 400004)
        twin = self.twin(device_id)
        merged = json.loads(json.dumps(twin.desired))
        merge_patch(merged, body_obj)
        size = twin_section_size(merged)
        if size > MAX_TWIN_SECTION:
            raise HubOperationError(
                f"desired properties would be {size} bytes, over IoT Hub's {MAX_TWIN_SECTION} limit", 400004)
        twin.desired = merged
        twin.desired_version += 1
        conn = self.connections.get(device_id)
        if conn is not None and TWIN_DESIRED_FILTER in conn.session.subscriptions:
            body_obj = {k: v for k, v in body_obj.items() if not k.startswith("$")}
            body_obj["$version"] = twin.desired_version
            conn.send(p.Publish(f"$iothub/twin/PATCH/properties/desired/?$version={twin.desired_version}",
                                json.dumps(body_obj, separators=(",", ":")).encode(), 0))
        return twin.desired_version

    def invoke_method(self, device_id: str, name: str, payload: Any, timeout: float,
                      on_done: Callable[[MethodResponse], None]) -> None:
        """Publish a method request; `on_done` gets exactly one MethodResponse (404, 504 or the device's)."""
        if not name or any(c in name for c in "/#+?&") or not name.isprintable():
            raise HubOperationError(f"invalid method name {name!r}", 400000)
        try:
            body = json.dumps(payload).encode()
        except (TypeError, ValueError) as exc:
            raise HubOperationError(f"method payload is not JSON-serialisable: {exc}", 400000) from None
        if timeout <= 0:
            raise HubOperationError(f"method timeout must be positive, got {timeout!r}", 400000)
        if self.registry.get(device_id) is None:
            raise HubOperationError(f"device {device_id!r} is not registered", 404001)
        conn = self.connections.get(device_id)
        if conn is None or METHODS_FILTER not in conn.session.subscriptions:
            why = "not connected" if conn is None else "not subscribed to methods"
            on_done(MethodResponse(404, {"errorCode": 404103, "message": f"device {device_id!r} is {why}"}))
            return
        rid = format(next(self._rids), "x")
        timer = self.scheduler.call_later(timeout, self._method_timeout, rid)
        self._method_calls[rid] = (device_id, on_done, timer, timeout)
        conn.send(p.Publish(f"$iothub/methods/POST/{name}/?$rid={rid}", body, 0))

    def _method_timeout(self, rid: str) -> None:
        call = self._method_calls.pop(rid, None)
        if call is not None:
            device_id, on_done, _, timeout = call
            on_done(MethodResponse(504, {"errorCode": 504101,
                                         "message": f"device {device_id!r} did not answer within {timeout:g} s"}))

    def _method_response(self, conn: Connection, status_text: str, rid: Optional[str], payload: bytes) -> None:
        call = self._method_calls.get(rid or "")
        if call is None or call[0] != conn.device_id:
            return  # late or unknown response: discarded, as the real hub does
        del self._method_calls[rid]
        call[2].cancel()
        on_done = call[1]
        # the status "is validated as an integer" (iothub-mqtt.md §5.1, §6.1); plain ASCII digits
        # here, since int() would also take '+1', ' 1', '1_0' or a thousand digits
        if not _METHOD_STATUS.fullmatch(status_text):
            on_done(self._invalid_method_response(call[0], f"status {clip_text(status_text, 40)!r} is not an integer"))
            raise ProtocolViolation(f"method response status {status_text!r} is not an integer")
        status = int(status_text)
        if len(payload) > MAX_METHOD_PAYLOAD:
            return on_done(self._invalid_method_response(
                call[0], f"payload of {len(payload)} bytes is over IoT Hub's {MAX_METHOD_PAYLOAD} limit"))
        try:
            result = load_json(payload) if payload.strip() else None
        except ValueError as exc:
            return on_done(self._invalid_method_response(
                call[0], f"payload is not valid JSON: {clip_text(str(exc), 120)}"))
        on_done(MethodResponse(status, result))

    @staticmethod
    def _invalid_method_response(device_id: str, why: str) -> MethodResponse:
        # IoT Hub fails such a call with InvalidResponseWhileProxying (azure-iot-sdk-c PR #6);
        # the status and body shape used here are an assumption
        return MethodResponse(502, {"errorCode": "InvalidResponseWhileProxying",
                                    "message": f"device {device_id!r} answered with an invalid response: {why}"})

    # --- cloud-to-device ---------------------------------------------------------------------

    def send_c2d(self, device_id: str, body: bytes, properties: Optional[Dict[str, Optional[str]]] = None,
                 message_id: Optional[str] = None) -> str:
        if self.registry.get(device_id) is None:
            raise HubOperationError(f"device {device_id!r} is not registered", 404001)
        queue = self.c2d_queues.setdefault(device_id, deque())
        session = self.sessions.get(device_id)
        inflight = len(session.inflight) if session else 0
        if len(queue) + inflight >= C2D_QUEUE_LIMIT:
            raise HubOperationError(
                f"device {device_id!r} already has {C2D_QUEUE_LIMIT} cloud-to-device messages pending", 403004)
        props = {str(k): (None if v is None else str(v)) for k, v in (properties or {}).items()}
        msg = C2DMessage(body, props, message_id or f"c2d-{next(self._c2d_ids)}")
        queue.append(msg)
        self._pump_c2d(device_id)
        return msg.message_id

    def _c2d_publish(self, conn: Connection, msg: C2DMessage, qos: int, packet_id: Optional[int],
                     dup: bool) -> p.Publish:
        d = conn.device_id
        system = {"$.mid": msg.message_id, "$.to": f"/devices/{d}/messages/devicebound"}
        custom = dict(msg.properties)
        custom.setdefault("iothub-ack", "none")
        topic = f"devices/{d}/messages/devicebound/{encode_property_bag(system, custom)}"
        return p.Publish(topic, msg.body, qos, packet_id, dup)

    def _pump_c2d(self, device_id: str, redeliver: bool = False) -> None:
        conn = self.connections.get(device_id)
        if conn is None or conn.closed:
            return
        session = conn.session
        qos = session.subscriptions.get(f"devices/{device_id}/messages/devicebound/#")
        if qos is None:
            return
        if redeliver:
            for pid, msg in sorted(session.inflight.items()):
                msg.delivery_count += 1
                conn.send(self._c2d_publish(conn, msg, 1, pid, True))
        queue = self.c2d_queues.get(device_id)
        while queue:
            msg = queue.popleft()
            msg.delivery_count += 1
            if qos == 0:
                # §4.2: delivery QoS is the granted QoS; at QoS 0 a message is complete once sent
                conn.send(self._c2d_publish(conn, msg, 0, None, False))
                self.events.add("c2d_completed", device_id, message_id=msg.message_id,
                                delivery_count=msg.delivery_count)
                continue
            pid = conn.next_packet_id()
            session.inflight[pid] = msg
            conn.send(self._c2d_publish(conn, msg, 1, pid, False))

    def on_puback(self, conn: Connection, packet_id: int) -> None:
        msg = conn.session.inflight.pop(packet_id, None)
        if msg is not None:
            self.events.add("c2d_completed", conn.device_id, message_id=msg.message_id,
                            delivery_count=msg.delivery_count)

    # --- subscriptions -----------------------------------------------------------------------

    def allowed_filter(self, conn: Connection, topic_filter: str) -> bool:
        return topic_filter in (f"devices/{conn.device_id}/messages/devicebound/#", TWIN_RES_FILTER,
                                TWIN_DESIRED_FILTER, METHODS_FILTER)

    def on_subscribe(self, conn: Connection, pkt: p.Subscribe) -> None:
        subs = conn.session.subscriptions
        codes = []
        for topic_filter, qos in pkt.topics:
            if not self.allowed_filter(conn, topic_filter):
                # §7: IoT Hub terminates the connection rather than answer SUBACK 0x80
                raise ProtocolViolation(f"subscription to unsupported topic filter {topic_filter!r}")
            if topic_filter not in subs and len(subs) >= MAX_SUBSCRIPTIONS:
                codes.append(p.SUBACK_FAILURE)
                continue
            subs[topic_filter] = min(qos, 1)
            codes.append(min(qos, 1))
        conn.send(p.Suback(pkt.packet_id, codes))
        # once each: a SUBSCRIBE may repeat one allowed filter thousands of times
        self.events.add("subscribe", conn.device_id, topics=list(dict.fromkeys(t for t, _ in pkt.topics)))
        self._pump_c2d(conn.device_id)

    def on_unsubscribe(self, conn: Connection, pkt: p.Unsubscribe) -> None:
        for topic_filter in pkt.topics:
            conn.session.subscriptions.pop(topic_filter, None)
        conn.send(p.Unsuback(pkt.packet_id))

    # --- service-side identity changes ---------------------------------------------------------

    def device_disabled(self, device_id: str, removed: bool = False) -> None:
        conn = self.connections.get(device_id)
        if conn is not None:
            conn.close("device_removed" if removed else "device_disabled")
        if removed:
            self.sessions.pop(device_id, None)
            self.c2d_queues.pop(device_id, None)
            self.twins.pop(device_id, None)

    def internal_error(self, conn: Optional[Connection], exc: BaseException) -> None:
        self.events.add("error", conn.device_id if conn else None,
                        message=f"{type(exc).__name__}: {exc}",
                        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if conn is not None:
            conn.close("internal_error")
