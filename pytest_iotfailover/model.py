"""Value types both hubs share: the fault vocabulary (`FaultKind`, `FaultState`, one `FaultSpec`
per kind) and what a fault did (`RecoveryReport`, `DeviceRecovery` and the message tally that
fills them).

Kept apart from either hub so the embedded one and the real-hub backend share the value
types without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from . import checks
from .errors import FaultNotSupported
from .iothub.ledger import Telemetry

__all__ = [
    "SPECS",
    "Blackhole",
    "DelayAcks",
    "DeviceRecovery",
    "Drop",
    "DropBeforeAck",
    "ExpireTokens",
    "FaultKind",
    "FaultSpec",
    "FaultState",
    "RecoveryReport",
    "Refuse",
    "RegionFailover",
    "Support",
    "Throttle",
    "check_support",
    "spec_for",
    "tally_messages",
]


# A backend keeping up with the built-in endpoint reads a message about a second after it was
# enqueued: an assumption (no document gives a consumer's lag), see README "failover".
DEFAULT_UNREAD = 1.0
MAX_RPO = 300.0


class FaultKind(str, Enum):
    REGION_FAILOVER = "region_failover"
    DROP = "drop"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"
    DROP_BEFORE_ACK = "drop_before_ack"
    DELAY_ACKS = "delay_acks"
    THROTTLE = "throttle"
    EXPIRE_TOKENS = "expire_tokens"

    def __str__(self) -> str:
        return self.value


class FaultState(str, Enum):
    PENDING = "pending"      # waiting for at= or after_messages=
    ACTIVE = "active"
    ENDED = "ended"
    CANCELLED = "cancelled"  # ended before it began

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """What to do, where and when; the same object drives `hub.faults`, the `failover` fixture,
    the control API and both backends. Subclasses add their own parameters.

    `device_id`: one device instead of the whole hub. `at`: seconds from now. `after_messages`:
    after the hub accepted that many more messages. At most one of `at` and `after_messages`.
    """
    kind: ClassVar[FaultKind]
    device_id: str | None = None
    at: float | None = None
    after_messages: int | None = None

    def __post_init__(self) -> None:
        if self.device_id is not None:
            checks.text("device_id", self.device_id)
        self._set("at", checks.seconds("at=", self.at, allow_none=True))
        checks.integer("after_messages=", self.after_messages, minimum=1, allow_none=True)
        if self.at is not None and self.after_messages is not None:
            raise ValueError("give at= or after_messages=, not both")
        self.check()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # canonical form of a frozen field

    def check(self) -> None:
        """Validate (and canonicalise, through _set) the kind's own parameters."""

    @property
    def lasts(self) -> float | None:
        """How long the fault window stays open once started; None: until cancelled, or (for
        one-shot faults) it ends as it starts."""
        return None

    def params(self) -> dict[str, Any]:
        """The kind's own parameters (targeting excluded), for events, reports and the API."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _TARGETING}

    def changed_params(self) -> dict[str, Any]:
        """Parameters given a value other than their default: what a backend must honour."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
            if default is dataclasses.MISSING or value != default:
                out[f.name] = value
        return out

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, what: str | None = None) -> FaultSpec:
        """Build from keyword arguments, naming `what` (the call the user wrote) in errors."""
        what = what or f"{cls.kind.value}()"
        names = cls.parameter_names()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            got = "an unexpected keyword argument" if len(unknown) == 1 else "unexpected keyword arguments"
            raise TypeError(f"{what} got {got} {', '.join(repr(n) for n in unknown)}; it takes "
                            f"{', '.join(n + '=' for n in names)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kwargs]
        if missing:
            raise TypeError(f"{what} needs {', '.join(n + '=' for n in missing)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None


_TARGETING = ("device_id", "at", "after_messages")


@dataclass(frozen=True, kw_only=True)
class RegionFailover(FaultSpec):
    """Drop every connection, refuse new ones for `outage` s, then answer as the other region.

    Sessions (subscriptions, un-acknowledged C2D) are gone afterwards unless `keep_sessions`: no
    document says what a failover does to persistent MQTT sessions; losing them is an assumption
    (failover-facts.md).

    `existing`: what open connections see. "reset" (default): a TCP reset at once. "zombie": they
    stay open but nothing on them is acknowledged or answered, ever, until the client gives up on
    them (its keep-alive): what devices saw in Azure/iotedge PR #5669.

    `connect`: what a new connection sees during the outage. "reset": accepted and reset at once
    (like a refused TCP connection; whole hub only, since a TCP refusal names no device).
    "connack3": CONNACK 3 (server unavailable). "silent": TLS and CONNECT accepted and never
    answered, so the SDK's connection watchdog fires again and again (azure-iot-sdk-python #1197).
    Default: "reset" for the whole hub, "connack3" for one device. `refuse="tcp"|"connack"` is the
    older spelling of `connect="reset"|"connack3"` and still works.

    Data loss (failover-facts.md "Data loss (RPO)", from reliability-iot-hub.md): `unread` s of
    telemetry before the start were accepted but never read by the backend and are lost from the
    hub's telemetry view (the ledger keeps them, marked `lost_in_failover`); `keep_c2d=False` drops
    queued and un-acknowledged C2D (a manual failover recovers none); `rpo` s (0..300) of twin and
    registry changes are rolled back.

    `dns=True` (C# SDK issue azure-iot-sdk-csharp #1312: after a failover a fresh DNS lookup could
    still return the old region's address): the hub's host name moves to another loopback address,
    the secondary region, and the old address goes dark: every connection made to it is reset as
    soon as it is accepted (an assumption: no document says what the old address does). During
    the outage the name resolves to the old address; `dns_stale` s (default 0) after it ends it
    still does, then it resolves to the new one, where the hub stays. Whole hub only; needs a hub
    whose devices dial it by name (`FakeHub(dns=True)`, fakehub/dns.py), so `connect=` (how the
    hub meets connections it hears of) does not apply.
    """
    kind: ClassVar[FaultKind] = FaultKind.REGION_FAILOVER
    outage: float = 2.0
    keep_sessions: bool = False
    refuse: str | None = None
    existing: str = "reset"
    connect: str | None = None
    unread: float = DEFAULT_UNREAD
    keep_c2d: bool = False
    rpo: float = 0.0
    dns: bool = False
    dns_stale: float = 0.0

    def check(self) -> None:
        self._set("outage", checks.required_seconds("outage", self.outage))
        checks.boolean("keep_sessions", self.keep_sessions)
        self._check_data_loss()
        self._check_dns()
        if self.refuse is not None:
            checks.choice("refuse", self.refuse, ("tcp", "connack"))
        checks.choice("existing", self.existing, EXISTING_MODES)
        if self.connect is not None:
            checks.choice("connect", self.connect, CONNECT_MODES)
        if self.refuse is not None and self.connect is not None and _REFUSE_ALIAS[self.refuse] != self.connect:
            raise ValueError(f"refuse={self.refuse!r} is the older spelling of connect="
                             f"{_REFUSE_ALIAS[self.refuse]!r}; it contradicts connect={self.connect!r}: give one")
        if self.connect_mode == "reset" and self.device_id is not None:
            given = "refuse='tcp'" if self.refuse == "tcp" else "connect='reset'"
            raise ValueError(f"{given} needs the whole hub: a refused TCP connection names no device")

    @property
    def connect_mode(self) -> str:
        """How new connections are met during the outage: the default depends on the target."""
        if self.connect is not None:
            return self.connect
        if self.refuse is not None:
            return _REFUSE_ALIAS[self.refuse]
        return "reset" if self.device_id is None else "connack3"

    def _check_data_loss(self) -> None:
        self._set("unread", checks.required_seconds("unread", self.unread))
        checks.boolean("keep_c2d", self.keep_c2d)
        # the documents give 0-5 min for twins and the registry: more would claim a loss no one saw
        self._set("rpo", checks.required_seconds("rpo", self.rpo, maximum=MAX_RPO))
        if self.rpo and self.device_id is not None:
            raise ValueError("rpo= needs the whole hub: the registry and twins fail over with the hub, not per device")

    def _check_dns(self) -> None:
        checks.boolean("dns", self.dns)
        self._set("dns_stale", checks.required_seconds("dns_stale", self.dns_stale))
        if not self.dns:
            if self.dns_stale:
                raise ValueError("dns_stale= needs dns=True: it is how long the name keeps resolving to the "
                                 "old address after a dns failover")
            return
        if self.device_id is not None:
            raise ValueError("dns=True needs the whole hub: the host name moves for every device at once")
        given = "refuse=" if self.refuse is not None else "connect=" if self.connect is not None else None
        if given is not None:
            raise ValueError(f"{given} cannot be combined with dns=True: devices dialing the name meet the old "
                             "address, which is dark (every connection reset), for the whole outage")

    @property
    def refusal(self) -> str:
        """The older name of `connect_mode`: "tcp", "connack" or "silent"."""
        return {"reset": "tcp", "connack3": "connack"}.get(self.connect_mode, self.connect_mode)

    @property
    def lasts(self) -> float | None:
        return self.outage


EXISTING_MODES = ("reset", "zombie")
CONNECT_MODES = ("reset", "connack3", "silent")
_REFUSE_ALIAS = {"tcp": "reset", "connack": "connack3"}


@dataclass(frozen=True, kw_only=True)
class Drop(FaultSpec):
    """TCP reset now (the real hub's KillTcp); `graceful=True` closes with FIN (ShutDownMqtt)."""
    kind: ClassVar[FaultKind] = FaultKind.DROP
    graceful: bool = False

    def check(self) -> None:
        checks.boolean("graceful", self.graceful)


@dataclass(frozen=True, kw_only=True)
class Blackhole(FaultSpec):
    """Connections stay open but the hub reads and sends nothing; new ones get no CONNACK.
    `seconds=None`: until cancelled."""
    kind: ClassVar[FaultKind] = FaultKind.BLACKHOLE
    seconds: float | None = None

    def check(self) -> None:
        self._set("seconds", checks.seconds("seconds", self.seconds, allow_none=True))

    @property
    def lasts(self) -> float | None:
        return self.seconds


@dataclass(frozen=True, kw_only=True)
class Refuse(FaultSpec):
    """New CONNECTs answered with this CONNACK code: 3 (server unavailable) is retried by the
    SDKs; 4 and 5 make the Python SDK stop retrying for good (sdk-notes.md)."""
    kind: ClassVar[FaultKind] = FaultKind.REFUSE
    code: int = 3
    seconds: float | None = None

    def check(self) -> None:
        checks.integer("code", self.code, minimum=1, maximum=5)
        self._set("seconds", checks.seconds("seconds", self.seconds, allow_none=True))

    @property
    def lasts(self) -> float | None:
        return self.seconds


@dataclass(frozen=True, kw_only=True)
class DropBeforeAck(FaultSpec):
    """The next `count` publishes are accepted (recorded) but the connection is reset before the
    PUBACK, so the client re-sends them."""
    kind: ClassVar[FaultKind] = FaultKind.DROP_BEFORE_ACK
    count: int = 1

    def check(self) -> None:
        checks.positive_int("count", self.count)


@dataclass(frozen=True, kw_only=True)
class DelayAcks(FaultSpec):
    """Every PUBACK goes out `seconds` late, for `duration` s (None: until cancelled)."""
    kind: ClassVar[FaultKind] = FaultKind.DELAY_ACKS
    seconds: float
    duration: float | None = None

    def check(self) -> None:
        self._set("seconds", checks.required_seconds("seconds", self.seconds))
        self._set("duration", checks.seconds("duration", self.duration, allow_none=True))

    @property
    def lasts(self) -> float | None:
        return self.duration


@dataclass(frozen=True, kw_only=True)
class Throttle(FaultSpec):
    """Above `rate` messages/s PUBACKs are delayed (IoT Hub's traffic shaping); a message that
    would wait more than `max_delay` s closes its connection unacknowledged, as a throttled IoT Hub
    does over MQTT (iothub-mqtt.md §8.2). For `seconds` s (None: until cancelled).

    `rate=None`: no shaping, the hub is over its limit outright: every publish during the window
    closes its connection unacknowledged. That is what IoT Hub's own fault injection
    (InvokeThrottling) does over MQTT (iothub-mqtt.md §8.3), so it is the one throttle both hubs
    can produce. `burst` and `max_delay` shape traffic at `rate` and need it.
    """
    kind: ClassVar[FaultKind] = FaultKind.THROTTLE
    rate: float | None = None
    seconds: float | None = None
    burst: int = 1
    max_delay: float = 10.0

    def check(self) -> None:
        if self.rate is not None:
            self._set("rate", checks.number("rate", self.rate, positive=True))
        self._set("seconds", checks.seconds("seconds", self.seconds, allow_none=True))
        checks.positive_int("burst", self.burst)
        self._set("max_delay", checks.required_seconds("max_delay", self.max_delay))
        if self.rate is None:
            shaping = [n for n in ("burst", "max_delay") if n in self.changed_params()]
            if shaping:
                raise ValueError(f"{' and '.join(n + '=' for n in shaping)} only apply with rate= "
                                 "(they shape traffic at that rate)")

    @property
    def lasts(self) -> float | None:
        return self.seconds


@dataclass(frozen=True, kw_only=True)
class ExpireTokens(FaultSpec):
    """Disconnect as IoT Hub does when a SAS token expires; clients must authenticate again.

    No parameters of its own: the expiry is one moment. (A real hub produces it with its fault
    injection InvokeAuthError, whose "fault mode" duration the real backend keeps at its default.)
    """
    kind: ClassVar[FaultKind] = FaultKind.EXPIRE_TOKENS


SPECS: dict[FaultKind, type[FaultSpec]] = {
    cls.kind: cls for cls in (RegionFailover, Drop, Blackhole, Refuse, DropBeforeAck, DelayAcks, Throttle,
                              ExpireTokens)}


def spec_for(kind: str | FaultKind, kwargs: Mapping[str, Any], *, what: str | None = None) -> FaultSpec:
    """The spec for `kind` from keyword arguments; unknown kinds and arguments are errors naming
    what the user wrote."""
    try:
        fault_kind = FaultKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise ValueError(f"unknown fault {kind!r}; the faults are {known}") from None
    return SPECS[fault_kind].from_kwargs(kwargs, what=what)


@dataclass(frozen=True)
class Support:
    """What one backend does with one fault kind.

    `honours`: the parameters (targeting included) it acts on as the vocabulary says; `cannot`: for
    each of the others, why not and what to do instead. `missing`: why the backend cannot produce
    the kind at all (None: it can). A parameter left at its default asks nothing of a backend, so
    only changed ones are held against this.
    """
    honours: frozenset[str] = frozenset()
    cannot: Mapping[str, str] = field(default_factory=dict)
    missing: str | None = None

    @classmethod
    def everything(cls, kind: FaultKind) -> Support:
        return cls(honours=frozenset(SPECS[kind].parameter_names()))


def check_support(spec: FaultSpec, table: Mapping[FaultKind, Support], hub: str) -> None:
    """FaultNotSupported naming the kind or the first changed parameter `hub` (e.g. "a real IoT
    Hub") cannot honour, and why; nothing if it can do all of `spec`."""
    support = table.get(spec.kind)
    if support is None or support.missing is not None:
        why = support.missing if support is not None else "it has no such fault"
        raise FaultNotSupported(f"{spec.kind} cannot be produced on {hub}: {why}")
    for name, value in spec.changed_params().items():
        if name not in support.honours:
            why = support.cannot.get(name, "it has no way to act on it")
            raise FaultNotSupported(f"{spec.kind}({name}={value!r}) cannot be honoured on {hub}: {why}")


@dataclass
class DeviceRecovery:
    device_id: str
    disconnected_at: float | None = None
    detected_at: float | None = None
    reconnected_at: float | None = None
    messages_before: int = 0
    messages_during: int = 0
    messages_after: int = 0
    throttled: float = 0.0  # seconds its reconnect waited in the tier's shaping queue

    @property
    def downtime(self) -> float | None:
        if self.disconnected_at is None or self.reconnected_at is None:
            return None
        return self.reconnected_at - self.disconnected_at


@dataclass
class RecoveryReport:
    """How a fault went, from the hub's event log and ledger. Times are time.time()
    seconds."""

    fault: str
    target: str | None
    params: dict[str, Any]
    started_at: float | None
    ended_at: float | None
    devices: dict[str, DeviceRecovery] = field(default_factory=dict)
    messages_before: int = 0
    messages_during: int = 0
    messages_after: int = 0
    duplicates: int = 0
    # fault start -> the last affected device noticed; fault end -> the last one back
    time_to_detect: float | None = None
    time_to_recover: float | None = None
    # device id -> why its client counts as wedged (it died silently while claiming to be connected)
    wedged: dict[str, str] = field(default_factory=dict)
    # seconds service calls (C2D sends, registry operations) waited in the tier's shaping queues
    # from the fault's start, summed over calls
    service_throttled: float = 0.0

    @property
    def recovered(self) -> bool:
        """Every device the fault disconnected is back; one it never reached (a blackhole shorter
        than its keep-alive, throttling) has nothing to recover from."""
        return all(d.reconnected_at is not None for d in self.devices.values() if d.disconnected_at is not None)

    @property
    def never_disconnected(self) -> list[str]:
        return [d.device_id for d in self.devices.values() if d.disconnected_at is None]

    @property
    def not_back(self) -> list[str]:
        return [d.device_id for d in self.devices.values()
                if d.disconnected_at is not None and d.reconnected_at is None]

    def downtimes(self) -> list[float]:
        """Per disconnected device, disconnect to reconnect; math.inf for one not back."""
        return sorted(math.inf if d.reconnected_at is None else max(d.reconnected_at - d.disconnected_at, 0.0)
                      for d in self.devices.values() if d.disconnected_at is not None)

    @property
    def throttled(self) -> float:
        """The longest any device's reconnect waited on the tier's throttling (seconds)."""
        return max((d.throttled for d in self.devices.values()), default=0.0)

    @property
    def outage(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def __str__(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        back = sum(1 for d in self.devices.values() if d.reconnected_at is not None)
        target = "@" + self.target if self.target else ""
        return (f"{self.fault}{target}: outage {s(self.outage)}, detect "
                f"{s(self.time_to_detect)}, recover {s(self.time_to_recover)}, "
                f"{back}/{len(self.devices)} devices back, messages "
                f"{self.messages_before} before / {self.messages_during} during / "
                f"{self.messages_after} after, {self.duplicates} duplicates"
                + (f", throttled up to {self.throttled:.2f}s" if self.throttled else "")
                + (f", service calls throttled {self.service_throttled:.2f}s" if self.service_throttled else "")
                + (f"; wedged: {'; '.join(self.wedged.values())}" if self.wedged else ""))


def tally_messages(rep: RecoveryReport,
                   telemetry: Iterable[Telemetry]) -> RecoveryReport:
    """Fill a report's message counts (before/during/after the fault window, hub-wide
    and per device, and duplicates since the start) and its derived times from
    per-device recovery data. A fault that never started has no window: the report
    stays as it is."""
    start, end = rep.started_at, rep.ended_at
    if start is None:
        return rep
    for t in telemetry:
        if t.enqueued_at < start:
            bucket = "messages_before"
        elif end is None or t.enqueued_at < end:
            bucket = "messages_during"
        else:
            bucket = "messages_after"
        setattr(rep, bucket, getattr(rep, bucket) + 1)
        if t.duplicate and t.enqueued_at >= start:
            rep.duplicates += 1
        d = rep.devices.get(t.device_id)
        if d is not None:
            setattr(d, bucket, getattr(d, bucket) + 1)
    # only the devices the fault reached: one that never disconnected is not "not recovered"
    hit = [d for d in rep.devices.values() if d.disconnected_at is not None]
    detected = [d.detected_at for d in hit]
    if detected and all(x is not None for x in detected):
        rep.time_to_detect = max(max(x for x in detected if x is not None) - start, 0.0)
    back = [d.reconnected_at for d in hit]
    if end is not None and all(x is not None for x in back):
        rep.time_to_recover = max(max(x for x in back if x is not None) - end, 0.0) if back else 0.0
    return rep
