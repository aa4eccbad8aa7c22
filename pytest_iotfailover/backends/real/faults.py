"""Faults on a real hub: IoT Hub's own fault-injection messages, sent through the
test's device clients and watched from the client side, and a regional manual
failover through the ARM helper.

The message properties are the ones the Azure IoT SDKs' end-to-end tests send
(`AzIoTHub_FaultOperationType` KillTcp / ShutDownMqtt / InvokeThrottling /
InvokeAuthError, with CloseReason, DelayInSecs and DurationInSecs); IoT Hub honours
them only where Microsoft enabled fault injection, elsewhere it takes them for plain
telemetry. Faults that need control of the hub's network stack exist only on the
embedded fake hub.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any, Self

from ...errors import FaultNotSupported
from ...iothub.ledger import Telemetry
from ...model import (
    DeviceRecovery,
    Drop,
    FaultKind,
    FaultSpec,
    FaultState,
    RecoveryReport,
    Support,
    Throttle,
    check_support,
    tally_messages,
)
from ...redaction import redact
from .clients import StateTap, connected, is_device_client, sdk_client, send_through
from .errors import RealBackendError

__all__ = ["HUB", "SUPPORT", "FaultInjector", "RealFaultHandle"]

log = logging.getLogger(__name__)

_FAULT_POLL = 0.05
_DROP_GRACE = 1.0  # how late the SDK's state-change callbacks may run
# DurationInSecs when a throttle names none (a request cannot be withdrawn, so "until cancelled"
# is not on offer) and for InvokeAuthError, as the C# SDK's e2e tests do (iothub-mqtt.md §8.3)
_INVOKE_DURATION = 5
HUB = "a real IoT Hub"
_COUNTING = ("it would have to count the messages it accepts as they arrive, which only the "
             "embedded hub can do")
_NO_COUNTING = _COUNTING + "; use at= instead"


def _injection_lacks(operation: str, name: str) -> str:
    return f"its fault injection ({operation}) has no {name}; use the embedded hub"


def _fake_only(need: str) -> Support:
    return Support(missing=f"it needs {need}, which only the embedded fake hub can do")


# What a real hub honours of each fault: the service's fault-injection properties carry a delay
# (at=) and, for the Invoke* kinds, a duration (iothub-mqtt.md §8.3); nothing else.
SUPPORT: dict[FaultKind, Support] = {
    FaultKind.REGION_FAILOVER: Support(cannot={
        "device_id": "a regional failover moves the whole hub; device_id= cannot narrow it",
        "at": "a manual failover through Azure Resource Manager starts when it is requested; leave at= out",
        "after_messages": _COUNTING,
        "outage": "a manual failover takes as long as Azure needs (about 10 min to 2 h, "
                  "failover-facts.md), so its outage cannot be chosen; use the embedded hub",
        "keep_sessions": "whether a failover keeps MQTT sessions is not documented and cannot be "
                         "chosen; use the embedded hub",
        "refuse": "how the hub refuses connections during a failover cannot be chosen; use the "
                  "embedded hub",
        "existing": "what open connections see during a failover cannot be chosen; use the embedded hub",
        "connect": "how the hub refuses connections during a failover cannot be chosen; use the "
                   "embedded hub",
        "unread": "what a real failover loses unread depends on your consumer's lag; use the embedded hub",
        "keep_c2d": "a manual failover recovers no cloud-to-device messages (reliability-iot-hub.md); "
                    "use the embedded hub",
        "rpo": "the replication lag of twins and the registry cannot be chosen; use the embedded hub",
        "dns": "a real failover moves the hub's DNS record as Azure does; an old address that keeps being "
               "returned cannot be ordered (azure-iot-sdk-csharp #1312); use the embedded hub with --iothub-dns",
        "dns_stale": "how long resolvers keep the old address is up to their caches, not the test; use the "
                     "embedded hub with --iothub-dns"}),
    FaultKind.DROP: Support(honours=frozenset({"device_id", "at", "graceful"}),
                            cannot={"after_messages": _NO_COUNTING}),
    FaultKind.THROTTLE: Support(honours=frozenset({"device_id", "at", "seconds"}), cannot={
        "after_messages": _NO_COUNTING,
        "rate": _injection_lacks("InvokeThrottling", "rate"),
        "burst": _injection_lacks("InvokeThrottling", "burst"),
        "max_delay": _injection_lacks("InvokeThrottling", "max_delay")}),
    FaultKind.EXPIRE_TOKENS: Support(honours=frozenset({"device_id", "at"}),
                                     cannot={"after_messages": _NO_COUNTING}),
    FaultKind.BLACKHOLE: _fake_only("holding connections open in silence"),
    FaultKind.REFUSE: _fake_only("answering CONNECT with a chosen CONNACK refusal"),
    FaultKind.DROP_BEFORE_ACK: _fake_only("closing a connection after accepting a message but before its PUBACK"),
    FaultKind.DELAY_ACKS: _fake_only("delaying PUBACKs"),
}
_OPT_IN = ("a regional failover of a real IoT Hub is a manual failover through Azure "
           "Resource Manager and must be allowed explicitly: pass "
           "--iothub-allow-failover=<hub name>, --iothub-subscription and "
           "--iothub-resource-group (10 min to 2 h of disruption; 2 failovers and 2 "
           "failbacks a day)")

TelemetryOf = Callable[[Collection[str]], list[Telemetry]]


def fault_request(spec: FaultSpec) -> tuple[str, int, int]:
    """(FaultOperationType, DelayInSecs, DurationInSecs) for a drop, throttle or expiry.
    The properties take whole seconds: a fraction is rounded up."""
    if isinstance(spec, Drop):
        operation, duration = ("ShutDownMqtt" if spec.graceful else "KillTcp"), 0
    elif isinstance(spec, Throttle):
        operation = "InvokeThrottling"
        duration = math.ceil(_INVOKE_DURATION if spec.seconds is None else spec.seconds)
    else:
        operation, duration = "InvokeAuthError", _INVOKE_DURATION
    delay = 1 if spec.at is None else math.ceil(spec.at)
    return operation, delay, duration


def fault_properties(operation: str, delay: int, duration: int) -> dict[str, str]:
    properties = {"AzIoTHub_FaultOperationType": operation,
                  "AzIoTHub_FaultOperationCloseReason": "boom",
                  "AzIoTHub_FaultOperationDelayInSecs": str(delay)}
    if operation.startswith("Invoke"):
        properties["AzIoTHub_FaultOperationDurationInSecs"] = str(duration)
    return properties


def fault_message(properties: dict[str, str]) -> Any:
    from azure.iot.device import Message
    message = Message("", message_id=f"iotfo-fault-{uuid.uuid4().hex[:16]}")
    message.custom_properties.update(properties)
    return message


def _honoured(spec: FaultSpec) -> dict[str, Any]:
    """The kind's own parameters this hub acts on: what the handle reports it was started with."""
    honours = SUPPORT[spec.kind].honours
    return {name: value for name, value in spec.params().items() if name in honours}


class FaultInjector:
    """Starts faults through the device clients registered with it.

    `resolve` maps a test's device name to its full id, `telemetry(ids)` is the
    ledger for reports, `arm` the ARM failover helper (None: no region_failover) and
    `after_failover` runs once a failover is over (the ledger follows the moved
    endpoint)."""

    def __init__(self, resolve: Callable[[str], str], telemetry: TelemetryOf,
                 clock: Callable[[], float] = time.time, arm: Any = None,
                 fault_watch: float = 60.0,
                 after_failover: Callable[[], None] = lambda: None):
        self._resolve = resolve
        self._telemetry = telemetry
        self._clock = clock
        self._arm = arm
        self._watch = float(fault_watch)
        self._after_failover = after_failover
        self._lock = threading.RLock()
        self._clients: dict[str, Any] = {}
        self._failed_over = False

    def register_client(self, device_id: str, client: Any) -> None:
        if not is_device_client(client):
            raise TypeError("register_client needs a device client with "
                            "send_message() or a DevicePool, not "
                            f"{type(client).__name__}")
        with self._lock:
            self._clients[self._resolve(device_id)] = client

    def unregister_client(self, device_id: str, client: Any = None) -> None:
        with self._lock:
            full_id = self._resolve(device_id)
            if client is None or self._clients.get(full_id) is client:
                self._clients.pop(full_id, None)

    def start(self, spec: FaultSpec) -> Any:
        """Start `spec` on the hub; FaultNotSupported if it asks for anything a real hub cannot
        do (SUPPORT)."""
        if not isinstance(spec, FaultSpec):
            raise TypeError(f"start() takes a FaultSpec (pytest_iotfailover.model), not {type(spec).__name__}")
        check_support(spec, SUPPORT, HUB)
        kind = spec.kind.value
        if spec.kind is FaultKind.REGION_FAILOVER:
            return self._region_failover()
        operation, delay, duration = fault_request(spec)
        targets = self._targets(kind, spec.device_id)
        params = dict(_honoured(spec), operation=operation, delay=delay, duration=duration)
        target = None if spec.device_id is None else self._resolve(spec.device_id)
        handle = RealFaultHandle(kind, target, params, targets,
                                 fault_properties(operation, delay, duration),
                                 float(delay), float(duration), self._watch,
                                 clock=self._clock, telemetry=self._telemetry, spec=spec)
        return handle.begin()

    def _targets(self, kind: str, device_id: str | None) -> dict[str, Any]:
        with self._lock:
            if device_id is None:
                if not self._clients:
                    raise RealBackendError(f"{kind} on a real hub is requested through "
                                           "device clients, and none is registered: "
                                           "connect one first or call "
                                           "register_client(device_id, client)")
                return dict(self._clients)
            full_id = self._resolve(device_id)
            client = self._clients.get(full_id)
            if client is None:
                raise RealBackendError(f"{kind} on a real hub is requested through the "
                                       "device's own client, and none is registered "
                                       f"for {full_id!r}: connect one (device_client / "
                                       "device_client_factory) or call "
                                       f"register_client({full_id!r}, client)")
            return {full_id: client}

    def _region_failover(self) -> FailoverHandle:
        if self._arm is None:
            raise FaultNotSupported(_OPT_IN)
        # without the opt-in, ArmFailover raises FailoverNotAllowed: the test errors (it
        # asked for something it may not have) rather than skipping quietly
        inner = self._arm.failover()
        self._failed_over = True
        return FailoverHandle(inner, {}, self._after_failover)

    def finish(self, failback: bool = False) -> None:
        """With `failback`, return a hub this run failed over to its first region."""
        if failback and self._arm is not None and self._failed_over:
            self._arm.failback().wait()
            self._failed_over = False


class FailoverHandle:
    """The ARM helper's failover handle; once it is over, `after` runs once."""

    kind = "region_failover"
    device_id = None

    def __init__(self, inner: Any, params: dict[str, Any], after: Callable[[], None]):
        self._inner = inner
        self._params = params
        self._after = after
        self._reconnected = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def params(self) -> dict[str, Any]:
        inner = getattr(self._inner, "params", None)
        return dict(self._params, **(inner if isinstance(inner, dict) else {}))

    def wait(self, *args: Any, **kwargs: Any) -> FailoverHandle:
        self._inner.wait(*args, **kwargs)
        if not self._reconnected:
            self._reconnected = True
            self._after()
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        # an ARM failover cannot be cancelled: whatever its own __exit__ does
        exit_ = getattr(self._inner, "__exit__", None)
        if exit_ is not None:
            exit_(*exc)

    def __repr__(self) -> str:
        return f"<region_failover via ARM: {self._inner!r}>"


class RealFaultHandle:
    """A fault-injection request sent through device clients, watched from the client
    side.

    `started_at` is when the hub was asked to act (request + DelayInSecs) or the
    first disconnect seen, whichever came first; `ended_at` is `started_at` +
    DurationInSecs. `wait()` returns when that window is over, `wait_recovered()`
    when every client is back (or `watch` ran out); `report().devices` hold the
    disconnects and reconnects the clients' state-change callbacks (or their
    `connected` flag) showed. `ignored` names devices whose request the hub simply
    acknowledged, as a hub without fault injection enabled does; `send_errors` those
    whose client failed to send it. A request already sent cannot be withdrawn:
    `cancel()` only stops the waiting.
    """

    def __init__(self, kind: str, device_id: str | None, params: dict[str, Any],
                 targets: dict[str, Any], properties: dict[str, str], delay: float,
                 duration: float, watch: float, *,
                 clock: Callable[[], float] = time.time,
                 telemetry: TelemetryOf = lambda ids: [], spec: FaultSpec | None = None):
        self.kind = kind
        self.spec = spec
        self.device_id = device_id
        self._params = dict(params)
        self._targets = dict(targets)
        self.properties = dict(properties)
        self._delay = delay
        self._duration = duration
        self._watch = watch
        self._clock = clock
        self._telemetry = telemetry
        self._lock = threading.Lock()
        self._state = "pending"
        self.requested_at: float | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._since = math.inf  # state changes before the request are not the fault's
        self._started = threading.Event()
        self._done = threading.Event()
        self._watching = threading.Event()
        self.send_errors: dict[str, str] = {}
        self.ignored: set[str] = set()  # requests the hub took for plain telemetry
        self._recovery = {d: DeviceRecovery(d) for d in self._targets}
        self._taps: dict[str, StateTap] = {}
        self._initially_up: dict[str, bool | None] = {}

    params = property(lambda self: dict(self._params))
    state = property(lambda self: FaultState(self._state))
    active = property(lambda self: self._state == "active")

    def begin(self) -> RealFaultHandle:
        for device_id, client in self._targets.items():
            self._taps[device_id] = StateTap(sdk_client(client, device_id), self._clock)
            self._initially_up[device_id] = connected(client, device_id)
        self.requested_at = self._since = self._clock()
        for device_id, client in self._targets.items():
            message = fault_message(self.properties)
            threading.Thread(target=self._send, args=(device_id, client, message),
                             daemon=True,
                             name=f"iotfailover:fault-{self.kind}-{device_id}").start()
        threading.Thread(target=self._monitor, args=(self.requested_at + self._delay,),
                         daemon=True,
                         name=f"iotfailover:fault-watch-{self.kind}").start()
        return self

    def _send(self, device_id: str, client: Any, message: Any) -> None:
        # A hub that honours the request closes the connection before acknowledging it;
        # the SDK keeps the message and sends it again after reconnecting, which is when
        # this returns. Shutting the client down ends it too.
        try:
            send_through(client, device_id, message)
        except BaseException as exc:
            # A client without its own retry (a pool's) cancels the pending request when
            # the hub drops it, a moment before its state-change callback runs: that is
            # the fault working.
            if not self._await_drop(device_id):
                self.send_errors[device_id] = redact(f"{type(exc).__name__}: {exc}")
            return
        # The SDK can reconnect and have the re-sent request acknowledged before its
        # state-change callbacks have run: give them a moment before calling it ignored.
        dropped = self._await_drop(device_id)
        if not dropped and connected(client, device_id) is not False:
            # acknowledged on the connection it was meant to kill: taken for telemetry
            self.ignored.add(device_id)
            log.warning("IoT Hub acknowledged the %s request of device %r without "
                        "acting on it: it honours fault-injection messages only where "
                        "Microsoft enabled them",
                        self.properties.get("AzIoTHub_FaultOperationType"), device_id)

    def _dropped(self, device_id: str) -> bool:
        return (bool(self._changes(device_id))
                or self._recovery[device_id].disconnected_at is not None)

    def _await_drop(self, device_id: str) -> bool:
        grace = time.monotonic() + _DROP_GRACE
        while not self._dropped(device_id) and time.monotonic() < grace:
            time.sleep(0.01)
        return self._dropped(device_id)

    def _monitor(self, start_at: float) -> None:
        deadline = time.monotonic() + self._delay + self._duration + self._watch
        try:
            while time.monotonic() < deadline and self._state != "cancelled":
                now = self._clock()
                for device_id, client in self._targets.items():
                    self._observe(device_id, client, now)
                if self._advance(now, start_at) and self._settled():
                    break
                time.sleep(_FAULT_POLL)
        finally:
            for tap in self._taps.values():
                tap.remove()
            with self._lock:
                if self._state in ("pending", "active"):
                    started = start_at if self.started_at is None else self.started_at
                    self.started_at = started
                    self._state = "ended"
                    self.ended_at = started + self._duration
                self._started.set()
                self._done.set()
            self._watching.set()

    def _advance(self, now: float, start_at: float) -> bool:
        """Move pending -> active -> ended as the window passes; True once over, or once
        no request can have any effect."""
        recs = self._recovery.values()
        disconnected = any(r.disconnected_at is not None for r in recs)
        with self._lock:
            if self._state == "pending" and (now >= start_at or disconnected):
                self._state = "active"
                self.started_at = min(now, start_at)
                self._started.set()
            started = self.started_at
            if (self._state == "active" and started is not None
                    and now >= started + self._duration):
                self._state = "ended"
                self.ended_at = started + self._duration
                self._done.set()
        failed = [d for d in self._targets
                  if d in self.ignored or d in self.send_errors]
        return self._state == "ended" or len(failed) == len(self._targets)

    def _settled(self) -> bool:
        """Every client is back, failed to take the request, or cannot tell."""
        return all(r.reconnected_at is not None or d in self.ignored
                   or d in self.send_errors or connected(self._targets[d], d) is None
                   for d, r in self._recovery.items())

    def _observe(self, device_id: str, client: Any, now: float) -> None:
        rec = self._recovery[device_id]
        if not self._initially_up[device_id]:
            return  # nothing to lose
        tap = self._taps[device_id]
        # The SDK reconnects within milliseconds of a drop, too fast for polling to see
        # reliably; its state-change callbacks see it. They run late, on the SDK's
        # handler thread, so the state each one reads may already be the next one;
        # polling covers clients without callbacks (a pool's replacement client).
        tapped = tap.installed and sdk_client(client, device_id) is tap.client
        changes = self._changes(device_id)
        up = connected(client, device_id)
        if rec.disconnected_at is None:
            downs = [t for t, state in changes if state is False]
            if downs:
                rec.disconnected_at = downs[0]
            elif len(changes) >= 2:
                # the reconnect came before the first callback ran
                rec.disconnected_at = changes[0][0]
            elif up is False:
                rec.disconnected_at = now
            else:
                return
            rec.detected_at = rec.disconnected_at
        if rec.reconnected_at is None:
            down = rec.disconnected_at
            ups = [t for t, state in changes if state and t > down]
            if ups:
                rec.reconnected_at = ups[0]
            elif up and not tapped:
                rec.reconnected_at = now

    def _changes(self, device_id: str) -> list[tuple[float, bool | None]]:
        # a callback still queued from before the request (the client's own connect) is
        # not the fault's
        return [c for c in list(self._taps[device_id].changes) if c[0] >= self._since]

    def wait_started(self, timeout: float | None = 30.0) -> RealFaultHandle:
        if not self._started.wait(timeout):
            raise TimeoutError(f"fault {self.kind} did not start within {timeout:g} s")
        if self._state == "cancelled" and self.started_at is None:
            raise RuntimeError(f"fault {self.kind} was cancelled before it started")
        return self

    def wait(self, timeout: float | None = 60.0) -> RealFaultHandle:
        """Block until the fault's window is over; TimeoutError if it is not by then."""
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"fault {self.kind} still {self._state} after {timeout:g} s")
        return self

    def wait_recovered(self, timeout: float | None = 60.0) -> RealFaultHandle:
        """Block until every targeted client is back (or the watch ended); the report is
        final then."""
        if not self._watching.wait(timeout):
            missing = ", ".join(d for d, r in self._recovery.items()
                                if r.reconnected_at is None)
            raise TimeoutError(f"clients hit by {self.kind} not all back after "
                               f"{timeout:g} s: {missing}")
        return self

    def cancel(self) -> RealFaultHandle:
        with self._lock:
            if self._state in ("pending", "active"):
                self._state = "cancelled"
                self.ended_at = self._clock()
        self._started.set()
        self._done.set()
        return self

    def report(self) -> RecoveryReport:
        rep = RecoveryReport(self.kind, self.device_id, self.params, self.started_at,
                             self.ended_at)
        if self.started_at is None:
            return rep
        for device_id, rec in self._recovery.items():
            rep.devices[device_id] = DeviceRecovery(device_id, rec.disconnected_at,
                                                    rec.detected_at, rec.reconnected_at)
        return tally_messages(rep, self._telemetry(list(self._targets)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state in ("pending", "active"):
            self.cancel()

    def __repr__(self) -> str:
        target = " @" + self.device_id if self.device_id else ""
        return f"<RealFaultHandle {self.kind} {self._state}{target}>"
