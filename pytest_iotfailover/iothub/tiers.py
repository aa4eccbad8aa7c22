"""IoT Hub's tier throttles and the traffic shaping in front of them, as pure policy objects.

Usage, for whoever wires this into the hub::

    throttles = HubThrottles(Tier.lookup("S1", units=1))       # HubThrottles(None): unthrottled
    verdict = throttles.acquire(Operation.NEW_CONNECTION, now, device="dev1")
    match verdict:
        case Admit():        ...  # go ahead now
        case Delay(seconds): ...  # go ahead after `seconds` (e.g. send CONNACK / PUBACK later)
        case Reject(error, mqtt): ... # refuse: `mqtt` says how (CONNACK 3, close, twin status 429)
    throttles.throttled_time("dev1")                          # seconds of delay, for the report

Nothing here reads a clock: `now` (seconds, any monotonic origin) comes from the caller, so tests
drive it with a fake clock. The objects are not thread-safe; call them from the hub's thread.

Source for every rate, unless marked otherwise: MicrosoftDocs/azure-docs
`articles/iot-hub/iot-hub-devguide-quotas-throttling.md` (ms.date 2025-05-21), tables "Basic and
standard tier operations" and "Standard tier operations", cited below as D-QT. Error codes:
`articles/iot-hub/troubleshoot-error-codes.md` (ms.date 2026-01-06), cited as D-ERR.

The shaping model (D-QT "Traffic shaping"; D-ERR 429xxx)
---------------------------------------------------------
D-QT: "IoT Hub accepts requests above the throttle for a limited time. The first few of these
requests are processed immediately. However, if the number of requests continues to violate the
throttle, IoT Hub starts placing the requests in a queue and requests are processed at the limit
rate ... the size of this queue is limited ... eventually the queue fills up, and IoT Hub starts
rejecting requests with 429 ThrottlingException." D-ERR: "IoT Hub returns 429001
ThrottlingException only after the limit is violated for too long a period."

`Throttle` models that as a token bucket run as a virtual schedule (GCRA):

- tokens refill at the tier's rate; the bucket holds `burst` tokens, so up to `burst` requests at
  once (and the rate after that) are admitted immediately: `Admit`;
- a request the bucket cannot cover is queued: its turn comes when the rate has served every
  request before it; the verdict is `Delay(seconds)`, the wait the caller must add before acting;
- once that wait would exceed `max_queue_delay` the queue is full and the request is refused:
  `Reject`, with 429001 ThrottlingException. A refused request takes no capacity.

Parameters, all assumptions (no document gives numbers): `burst_seconds` = 1.0 for the rows D-QT
states per second, i.e. the bucket holds one second of the rate (S1 x 1 takes 100 simultaneous
connects at once); 60.0 for the rows it states per minute - identity registry operations and C2D
sends, "100/min/unit" - so S1 x 1 takes 100 of those at once and 1.67/s after that
(`DEFAULT_SHAPING`). That per-minute reading is backed by a report: bulk creation of 200 device
identities went through at once before the hub answered ThrottlingBacklogTimeout, "Operation type:
CRUD" (Azure-Samples/Iot-Telemetry-Simulator #39, calls of 50 devices each); `max_queue_delay` =
60 s, the order of the service-side CONNECT timeout the C# SDK aligned its CONNACK timeout to
(azure-iot-sdk-csharp #2043, iothub-mqtt.md §8.2). D-QT's own example (200 D2C/s against an S1 hub:
"for the first minute or two, the messages are processed immediately") suggests a far larger
tolerance, 60-120 s of excess at the rate; `Shaping.minute_window()` gives that reading
(burst of 60 s of the rate), since D-QT also says throttles "are applied in minute ranges".

What a refusal looks like to the device (`MqttAction`):
- new connection: CONNACK 3 "server unavailable". What the real hub sends is not documented
  (iothub-mqtt.md §1.7: delayed CONNACK, then 0x03 or a close); 0x03 is what it was seen to send
  under transient overload (azure-iot-sdk-csharp #1485). Never 4 or 5: the Python and Node SDKs
  stop retrying for good on those (iothub-mqtt.md §1.7 table).
- D2C send: the connection is closed without PUBACK - "For MQTT the connection is closed by the
  hub" (azure-iot-sdk-c #1766; azure-docs #107838; iothub-mqtt.md §8.2).
- twin read / update: status 429 on `$iothub/twin/res/429/?$rid=...` (iothub-mqtt.md §8.2, from the MQTT doc).
- service-side calls (C2D send, direct method, registry): the HTTP call fails with 429 (a delayed one
  returns later: the fake hub's façade waits in the caller's thread, fakehub/shaping.py).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .limits import IotHubError, iothub_error

__all__ = [
    "ADMIT",
    "CONNACK_SERVER_UNAVAILABLE",
    "DEFAULT_SHAPING",
    "METHOD_METER_BYTES",
    "TIER_NAMES",
    "Admit",
    "Delay",
    "HubThrottles",
    "MqttAction",
    "Operation",
    "Reject",
    "Shaping",
    "Throttle",
    "ThrottleStats",
    "Tier",
    "Verdict",
    "operation_cost",
]

CONNACK_SERVER_UNAVAILABLE = 3   # MQTT 3.1.1 return code 0x03


class Operation(str, enum.Enum):
    """The throttled operations. Cost is one per call, except direct methods (KB, see `operation_cost`)."""
    NEW_CONNECTION = "new_connection"          # the rate of new connections, not their number (D-QT)
    D2C_SEND = "d2c_send"
    TWIN_READ = "twin_read"                    # device and module twin reads
    TWIN_UPDATE = "twin_update"                # device and module twin updates
    DIRECT_METHOD = "direct_method"            # metered in KB of request payload
    C2D_SEND = "c2d_send"
    REGISTRY_OPERATION = "registry_operation"  # identity registry create, retrieve, list, update, delete


# D-QT footnote: "Throttling meter size is 4 KB. Throttling is based on request payload size only."
# "If your direct call's payload is between 0 KB and 4 KB, it counts as 4 KB."
METHOD_METER_BYTES = 4 * 1024


def operation_cost(operation: Operation, payload_bytes: int | None = None) -> float:
    """Tokens one call takes: 1, or for a direct method its request payload rounded up to 4 KB
    chunks, in KB (0-4 KB -> 4, 4-8 KB -> 8, ...; D-QT "Throttling details")."""
    if operation is not Operation.DIRECT_METHOD:
        return 1.0
    size = max(0, payload_bytes or 0)
    chunks = max(1, math.ceil(size / METHOD_METER_BYTES))
    return 4.0 * chunks


# --------------------------------------------------------------------------------------------
# Tier table
# --------------------------------------------------------------------------------------------

TIER_NAMES = ("Free", "B1", "B2", "B3", "S1", "S2", "S3")
_PER_MINUTE = 1 / 60


def _rates(tier: str, u: int) -> dict[Operation, float]:
    """Rates per second for `u` units (KB/s for direct methods). D-QT; rows quoted in comments."""
    family = {"Free": 1, "B1": 1, "S1": 1, "B2": 2, "S2": 2, "B3": 3, "S3": 3}[tier]
    op = Operation
    rates: dict[Operation, float] = {}
    if family == 1:
        # "Higher of 100/sec or 12/sec/unit" (new connections and D2C sends): 2 x S1 -> 100, 9 x S1 -> 108
        rates[op.NEW_CONNECTION] = rates[op.D2C_SEND] = float(max(100, 12 * u))
        rates[op.REGISTRY_OPERATION] = 100 * _PER_MINUTE * u      # "1.67/sec/unit (100/min/unit)"
    elif family == 2:
        rates[op.NEW_CONNECTION] = rates[op.D2C_SEND] = 120.0 * u  # "120 ... /sec/unit"
        rates[op.REGISTRY_OPERATION] = 100 * _PER_MINUTE * u      # "1.67/sec/unit (100/min/unit)"
    else:
        rates[op.NEW_CONNECTION] = rates[op.D2C_SEND] = 6000.0 * u  # "6,000 ... /sec/unit"
        rates[op.REGISTRY_OPERATION] = 5000 * _PER_MINUTE * u      # "83.33/sec/unit (5,000/min/unit)"
    if tier.startswith("B"):
        # D-QT: C2D, direct methods and twins are "Standard tier operations"; the Basic tiers lack them
        return rates
    if family == 1:                                                  # "Free and S1" column
        rates[op.C2D_SEND] = 100 * _PER_MINUTE * u                   # "1.67 ... /sec/unit (100 messages/min/unit)"
        rates[op.DIRECT_METHOD] = 160.0 * u                          # "160KB/sec/unit"
        rates[op.TWIN_READ] = 100.0                                  # "100/sec" - not per unit
        rates[op.TWIN_UPDATE] = 50.0                                 # "50/sec" - not per unit
    elif family == 2:                                                # "S2"
        rates[op.C2D_SEND] = 100 * _PER_MINUTE * u                   # "1.67 ... /sec/unit (100 ... /min/unit)"
        rates[op.DIRECT_METHOD] = 480.0 * u                          # "480KB/sec/unit"
        rates[op.TWIN_READ] = float(max(100, 10 * u))                # "Higher of 100/sec or 10/sec/unit"
        rates[op.TWIN_UPDATE] = float(max(50, 5 * u))                # "Higher of 50/sec or 5/sec/unit"
    else:                                                            # "S3"
        rates[op.C2D_SEND] = 5000 * _PER_MINUTE * u                  # "83.33 ... /sec/unit (5,000 ... /min/unit)"
        rates[op.DIRECT_METHOD] = 24.0 * 1024 * u                    # "24MB/sec/unit" (MB = 1024 KB: assumption)
        rates[op.TWIN_READ] = 500.0 * u                              # "500/sec/unit"
        rates[op.TWIN_UPDATE] = 250.0 * u                            # "250/sec/unit"
    return rates


@dataclass(frozen=True)
class Tier:
    """One hub's tier and unit count with its per-operation rates (per second; KB/s for methods).

    An operation missing from `rates` is not available in the tier (Basic: no C2D, methods, twins).
    """
    name: str
    units: int
    rates: Mapping[Operation, float] = field(repr=False)

    @classmethod
    def lookup(cls, name: str, units: int = 1) -> Tier:
        """`Tier.lookup("S1", units=1)`. Names are case-insensitive: Free, B1-B3, S1-S3.

        A Free hub has exactly one unit (assumption: the Free tier is not scaled by units); other
        tiers take any positive unit count (the per-tier maximum is not enforced).
        """
        canon = {n.lower(): n for n in TIER_NAMES}.get(str(name).lower())
        if canon is None:
            raise ValueError(f"unknown IoT Hub tier {name!r}; expected one of {', '.join(TIER_NAMES)}")
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive integer, not {units!r}")
        if canon == "Free" and units != 1:
            raise ValueError("a Free tier hub has exactly one unit")
        return cls(canon, units, _rates(canon, units))

    def supports(self, operation: Operation) -> bool:
        return operation in self.rates

    def rate(self, operation: Operation) -> float:
        """Tokens per second for `operation`; ValueError if the tier does not offer it."""
        try:
            return self.rates[operation]
        except KeyError:
            raise ValueError(f"{operation.value} is not available in the {self.name} tier") from None

    def throttles(self, shaping: Shaping | Mapping[Operation, Shaping] | None = None) -> HubThrottles:
        return HubThrottles(self, shaping)

    def __str__(self) -> str:
        return f"{self.name} x {self.units}"


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------

class MqttAction(str, enum.Enum):
    """How a refusal reaches an MQTT device (see the module docstring for sources)."""
    CONNACK_3 = "connack_3"            # CONNACK return code 3, server unavailable; then close
    CLOSE = "close"                    # close the connection without acknowledging
    TWIN_STATUS = "twin_status"        # `$iothub/twin/res/{error.status}/?$rid=...` with the error body
    SERVICE_ERROR = "service_error"    # not a device operation: the service call fails with `error`


@dataclass(frozen=True)
class Admit:
    """Go ahead now."""


@dataclass(frozen=True)
class Delay:
    """Go ahead after `seconds` (the request waits in the hub's shaping queue)."""
    seconds: float


@dataclass(frozen=True)
class Reject:
    """Refused: `error` is IoT Hub's error, `mqtt` how the device learns of it."""
    error: IotHubError
    mqtt: MqttAction

    @property
    def error_code(self) -> int:
        return self.error.code


Verdict = Admit | Delay | Reject
ADMIT = Admit()

_MQTT_ACTION = {
    Operation.NEW_CONNECTION: MqttAction.CONNACK_3,
    Operation.D2C_SEND: MqttAction.CLOSE,
    Operation.TWIN_READ: MqttAction.TWIN_STATUS,
    Operation.TWIN_UPDATE: MqttAction.TWIN_STATUS,
    Operation.DIRECT_METHOD: MqttAction.SERVICE_ERROR,
    Operation.C2D_SEND: MqttAction.SERVICE_ERROR,
    Operation.REGISTRY_OPERATION: MqttAction.SERVICE_ERROR,
}


# --------------------------------------------------------------------------------------------
# Shaping and the token bucket
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shaping:
    """Traffic-shaping parameters; every default is an assumption (see the module docstring).

    burst_seconds: the bucket holds this many seconds of the rate (at least one call's cost).
    max_queue_delay: the longest a request may wait in the shaping queue before the hub refuses it.
    reject_code: 429001 ThrottlingException (D-QT, D-ERR). D-ERR also lists 429002
        ThrottleBacklogLimitExceeded ("requests in the backlog ... exceeded the backlog limit"),
        which may be what a full queue returns; pass it here to model that reading.
    """
    burst_seconds: float = 1.0
    max_queue_delay: float = 60.0
    reject_code: int = 429001

    def __post_init__(self) -> None:
        for name in ("burst_seconds", "max_queue_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"Shaping.{name} must be a finite number >= 0, not {value!r}")
        if self.reject_code // 1000 != 429:
            raise ValueError(f"Shaping.reject_code must be a 429xxx code, not {self.reject_code!r}")

    @classmethod
    def minute_window(cls, max_queue_delay: float = 60.0) -> Shaping:
        """D-QT's "applied in minute ranges" reading: a minute of the rate is taken at once."""
        return cls(burst_seconds=60.0, max_queue_delay=max_queue_delay)


# The rows D-QT gives per minute ("100/min/unit") take a minute of the rate at once (module docstring);
# a `Shaping` passed for every operation replaces these too.
DEFAULT_SHAPING: Mapping[Operation, Shaping] = {
    Operation.REGISTRY_OPERATION: Shaping.minute_window(),
    Operation.C2D_SEND: Shaping.minute_window(),
}


@dataclass
class ThrottleStats:
    """Per device (or hub-wide) counts for the recovery report."""
    admitted: int = 0
    delayed: int = 0
    delayed_seconds: float = 0.0   # sum of the delays handed out: time spent in the shaping queue
    rejected: int = 0

    def add(self, other: ThrottleStats) -> None:
        self.admitted += other.admitted
        self.delayed += other.delayed
        self.delayed_seconds += other.delayed_seconds
        self.rejected += other.rejected


_EPSILON = 1e-9   # float slack so that exactly-on-schedule requests are admitted, not delayed by 1e-16 s


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


class Throttle:
    """A token bucket with a bounded shaping queue for one operation of one hub.

    `acquire(now, device=..., cost=...)` returns `Admit`, `Delay(seconds)` or `Reject` and books the
    request's place. A delayed request is committed: if the caller then drops it (the device went
    away), its capacity is not given back (assumption, simplest model).
    """

    def __init__(self, operation: Operation, rate: float, *, shaping: Shaping | None = None,
                 burst: float | None = None) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a finite number > 0, not {rate!r}")
        self.operation = operation
        self.rate = float(rate)
        self.shaping = shaping or Shaping()
        if burst is None:
            burst = self.rate * self.shaping.burst_seconds
        if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not math.isfinite(burst) or burst < 0:
            raise ValueError(f"burst must be a finite number >= 0, not {burst!r}")
        # a bucket smaller than one call would delay every call even on an idle hub
        self.burst = max(float(burst), operation_cost(operation))
        self.max_queue_delay = float(self.shaping.max_queue_delay)
        self._tat: float | None = None   # theoretical arrival time: when the schedule is next free
        self._stats: dict[str | None, ThrottleStats] = {}

    def acquire(self, now: float, *, device: str | None = None, cost: float = 1.0) -> Verdict:
        now = _check_now(now)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost <= 0:
            raise ValueError(f"cost must be a finite number > 0, not {cost!r}")
        start = now if self._tat is None else max(self._tat, now)
        new_tat = start + cost / self.rate
        wait = new_tat - now - self.burst / self.rate
        stats = self._stats.setdefault(device, ThrottleStats())
        if wait <= _EPSILON:
            self._tat = new_tat
            stats.admitted += 1
            return ADMIT
        if wait <= self.max_queue_delay + _EPSILON:
            self._tat = new_tat
            stats.delayed += 1
            stats.delayed_seconds += wait
            return Delay(wait)
        stats.rejected += 1
        return Reject(self._reject_error(wait), _MQTT_ACTION[self.operation])

    def _reject_error(self, wait: float) -> IotHubError:
        return iothub_error(self.shaping.reject_code,
                            f"{self.operation.value} throttled: {self.rate:g}/s limit and the shaping queue is full "
                            f"(a {wait:.2f} s wait exceeds {self.max_queue_delay:g} s)")

    def backlog(self, now: float) -> float:
        """Seconds of queued work ahead of a request arriving at `now` (0 when it would be admitted)."""
        now = _check_now(now)
        if self._tat is None:
            return 0.0
        return max(0.0, self._tat - now - self.burst / self.rate)

    def throttled_time(self, device: str | None) -> float:
        stats = self._stats.get(device)
        return stats.delayed_seconds if stats else 0.0

    def stats(self, device: str | None) -> ThrottleStats:
        stats = self._stats.get(device)
        return ThrottleStats(**vars(stats)) if stats else ThrottleStats()

    def report(self) -> dict[str | None, ThrottleStats]:
        """Copies of the per-device counts; key None collects requests made without a device."""
        return {device: ThrottleStats(**vars(s)) for device, s in self._stats.items()}

    def forget(self, device: str | None) -> None:
        """Drop a device's counts (the bucket itself is per hub and unaffected)."""
        self._stats.pop(device, None)

    def reset(self) -> None:
        self._tat = None
        self._stats.clear()

    def __repr__(self) -> str:
        return (f"Throttle({self.operation.value}, rate={self.rate:g}/s, burst={self.burst:g}, "
                f"max_queue_delay={self.max_queue_delay:g}s)")


class HubThrottles:
    """All of one hub's throttles. `HubThrottles(None)` admits everything (an unthrottled hub).

    `shaping` is one `Shaping` for every operation or a mapping per operation (missing ones, and
    every one when `shaping` is None, use `DEFAULT_SHAPING`, else `Shaping()`). `acquire` refuses an operation the tier does not offer with 403010
    OperationNotAvailableInCurrentTier (D-ERR); that the hub answers a Basic-tier device's twin
    request that way is an assumption.
    """

    def __init__(self, tier: Tier | None,
                 shaping: Shaping | Mapping[Operation, Shaping] | None = None) -> None:
        self.tier = tier
        self._throttles: dict[Operation, Throttle] = {}
        if tier is None:
            return
        for operation, rate in tier.rates.items():
            if isinstance(shaping, Shaping):
                op_shaping: Shaping | None = shaping
            else:
                op_shaping = (shaping or {}).get(operation) or DEFAULT_SHAPING.get(operation)
            self._throttles[operation] = Throttle(operation, rate, shaping=op_shaping)

    def throttle(self, operation: Operation) -> Throttle | None:
        return self._throttles.get(operation)

    def acquire(self, operation: Operation, now: float, *, device: str | None = None,
                payload_bytes: int | None = None, count: int = 1) -> Verdict:
        """Book `count` x `operation` at `now` as one request (a bulk registry call of `count`
        devices); `payload_bytes` is the request payload of a direct method."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, not {count!r}")
        if self.tier is None:
            _check_now(now)
            return ADMIT
        throttle = self._throttles.get(operation)
        if throttle is None:
            return Reject(iothub_error(403010, f"{operation.value} is not available in the {self.tier.name} tier"),
                          _MQTT_ACTION[operation])
        return throttle.acquire(now, device=device, cost=operation_cost(operation, payload_bytes) * count)

    def throttled_time(self, device: str | None) -> float:
        """Seconds `device` spent in shaping queues, over all operations."""
        return sum(t.throttled_time(device) for t in self._throttles.values())

    def report(self, operations: Iterable[Operation] | None = None) -> dict[str | None, ThrottleStats]:
        """Per-device counts summed over `operations` (all by default)."""
        out: dict[str | None, ThrottleStats] = {}
        chosen = self._throttles.values() if operations is None else [
            self._throttles[o] for o in operations if o in self._throttles]
        for throttle in chosen:
            for device, stats in throttle.report().items():
                out.setdefault(device, ThrottleStats()).add(stats)
        return out

    def totals(self) -> dict[Operation, ThrottleStats]:
        """Counts per operation over every device: what the hub shaped and refused, for its users."""
        out: dict[Operation, ThrottleStats] = {}
        for operation, throttle in self._throttles.items():
            total = out[operation] = ThrottleStats()
            for stats in throttle.report().values():
                total.add(stats)
        return out

    def forget(self, device: str | None) -> None:
        for throttle in self._throttles.values():
            throttle.forget(device)

    def reset(self) -> None:
        for throttle in self._throttles.values():
            throttle.reset()

    def __repr__(self) -> str:
        return f"HubThrottles({self.tier or 'unthrottled'})"
