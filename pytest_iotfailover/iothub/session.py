"""Per-connection and per-device state: the connection state machine, MQTT sessions, C2D
queues and twins. Plain data; the rules that change it live in core.py.

The connection's life is one table of (state, event) -> new state, in the manner of h11: any
pair the table does not name is a ProtocolViolation, so a second CONNECT or a PUBLISH before
CONNECT cannot slip through a forgotten branch.
"""
import enum
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import HubOperationError, ProtocolViolation
from .mqtt import packets as p

# Twin limits (failover-facts.md "Limits", from iot-hub-devguide-device-twins.md); operations
# that break them are rejected with status 400 (iothub-mqtt.md §5.2).
MAX_TWIN_DEPTH = 10            # the desired or reported object itself is level 1 (assumption)
MAX_TWIN_SECTION = 32 * 1024   # desired and reported each, measured here as compact JSON
MAX_TWIN_KEY = 1024
MAX_TWIN_STRING = 4 * 1024
MAX_TWIN_INT = 4503599627370495
C2D_MAX_BODY = 64 * 1024


class ConnState(enum.Enum):
    AWAITING_CONNECT = "awaiting_connect"   # socket open, not authenticated
    CONNECTED = "connected"
    CLOSING = "closing"                     # the hub has asked the driver to close it
    CLOSED = "closed"                       # the driver reported the socket gone


class ConnEvent(enum.Enum):
    CONNECT = "connect"         # a CONNECT packet arrived
    PACKET = "packet"           # any other packet arrived
    ACCEPT = "accept"           # CONNACK 0 sent
    CLOSE = "close"             # the hub decided to close
    LOST = "lost"               # the socket is gone


_S, _E = ConnState, ConnEvent
# Members as module constants: `ConnState.CONNECTED` goes through the enum's class attribute
# lookup (about 90 ns on CPython 3.11), and these are read for every packet.
_CONNECTED, _CLOSED = ConnState.CONNECTED, ConnState.CLOSED
_LIVE = (ConnState.AWAITING_CONNECT, ConnState.CONNECTED)
TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_S.AWAITING_CONNECT, _E.CONNECT): _S.AWAITING_CONNECT,
    (_S.AWAITING_CONNECT, _E.ACCEPT): _S.CONNECTED,
    (_S.AWAITING_CONNECT, _E.CLOSE): _S.CLOSING,
    (_S.AWAITING_CONNECT, _E.LOST): _S.CLOSED,
    (_S.CONNECTED, _E.PACKET): _S.CONNECTED,
    (_S.CONNECTED, _E.CLOSE): _S.CLOSING,
    (_S.CONNECTED, _E.LOST): _S.CLOSED,
    (_S.CLOSING, _E.CLOSE): _S.CLOSING,
    (_S.CLOSING, _E.LOST): _S.CLOSED,
}


def transition(state: ConnState, event: ConnEvent, what: str = "") -> ConnState:
    new = TRANSITIONS.get((state, event))
    if new is None:
        if state is ConnState.AWAITING_CONNECT:
            raise ProtocolViolation(f"first packet was {what or event.value}, not CONNECT")
        raise ProtocolViolation(f"{what or event.value} is not accepted in state {state.value}")
    return new


@dataclass
class MethodResponse:
    status: int
    payload: Any = None


@dataclass
class C2DMessage:
    body: bytes
    properties: dict[str, str | None]
    message_id: str
    delivery_count: int = 0
    expiry: float = math.inf    # absolute, epoch seconds (c2d_lifecycle.py)
    ack: str = "none"           # iothub-ack: which outcomes produce feedback
    expiry_timer: Any = None    # the key of its expiry timer, while one is armed
    expiry_set: bool = False    # the sender gave the expiry: delivered as `$.exp` (c2d_lifecycle.py)


C2DQueue = deque[C2DMessage]


def new_c2d_queue() -> C2DQueue:
    return deque()


@dataclass
class Session:
    """What IoT Hub keeps for a clean_session=0 device between connections."""
    subscriptions: dict[str, int] = field(default_factory=dict)
    inflight: dict[int, C2DMessage] = field(default_factory=dict)
    clean: bool = False


@dataclass
class Twin:
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1

    def document(self) -> dict[str, Any]:
        return {"desired": dict(json.loads(json.dumps(self.desired)), **{"$version": self.desired_version}),
                "reported": dict(json.loads(json.dumps(self.reported)), **{"$version": self.reported_version})}


class Connection:
    """One device connection, from the socket's opening to its end. Holds no socket."""

    def __init__(self, peer: str, opened_at: float):
        self.peer = peer
        self.opened_at = opened_at
        self.state = ConnState.AWAITING_CONNECT
        self.device_id: str | None = None
        self.close_reason: str | None = None
        self.close_detail: dict[str, Any] = {}
        self.graceful = False       # the device sent DISCONNECT
        self.doomed = False         # a fault has decided to close it shortly
        self.paused = False         # a fault silences it (Pause action in force)
        self.will: p.Will | None = None
        self.session: Session = Session(clean=True)
        self.model_id: str | None = None
        self.api_version: str | None = None
        self.token_expiry: int | None = None
        self.events_prefix = ""
        self.keep_alive: float | None = None
        self.last_rx = opened_at
        self._next_pid = 0

    def __repr__(self) -> str:
        return f"<Connection {self.device_id or '?'} from {self.peer} {self.state.value}>"

    @property
    def connected(self) -> bool:
        return self.state is _CONNECTED

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    @property
    def live(self) -> bool:
        """Neither closing nor closed: output to it still makes sense."""
        return self.state in _LIVE

    def advance(self, event: ConnEvent, what: str = "") -> None:
        self.state = transition(self.state, event, what)

    def next_packet_id(self) -> int:
        for _ in range(65535):
            self._next_pid = self._next_pid % 65535 + 1
            if self._next_pid not in self.session.inflight:
                return self._next_pid
        raise HubOperationError("no free MQTT packet id: 65535 messages in flight", 403004)


# --- twin documents ---------------------------------------------------------------------------

def c2d_body(body: Any) -> bytes:
    """A C2D body as IoT Hub takes it: str (UTF-8) or bytes, at most 64 KB."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"C2D body must be str or bytes, not {type(body).__name__}")
    if len(body) > C2D_MAX_BODY:
        raise HubOperationError(f"C2D message of {len(body)} bytes exceeds IoT Hub's 64 KB limit", 400000)
    return bytes(body)


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(payload: bytes) -> Any:
    """Strict JSON from a peer: ValueError for bad UTF-8, bad JSON, NaN/Infinity, too deep."""
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def clip_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def twin_problem(section: Any) -> str | None:
    """Why `section` breaks IoT Hub's twin limits, or None. Iterative: depth is the peer's choice."""
    if not isinstance(section, dict):
        return "twin properties must be a JSON object"
    stack: list[tuple[Any, int]] = [(section, 1)]
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
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TWIN_INT:
                return f"integer {clip_text(str(value), 40)} is outside +-{MAX_TWIN_INT}"
    return None


def merged_section(section: dict[str, Any], patch: dict[str, Any], what: str) -> tuple[dict[str, Any] | None, str]:
    """`section` with `patch` applied, on a copy, or (None, why) when the result is too large."""
    merged = json.loads(json.dumps(section))
    merge_patch(merged, patch)
    size = len(json.dumps(merged, separators=(",", ":")).encode("utf-8"))
    if size > MAX_TWIN_SECTION:
        return None, f"{what} properties would be {size} bytes, over IoT Hub's {MAX_TWIN_SECTION} limit"
    return merged, ""
