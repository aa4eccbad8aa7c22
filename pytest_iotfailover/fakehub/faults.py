"""`hub.faults`: the thread-safe face of the fault engine (iothub/faults.py). Every call builds the
fault's `FaultSpec` (model.py: the one vocabulary of both hubs, which checks the arguments) and
returns a `FaultHandle`; `build_report` turns the hub's event log and ledger into a `RecoveryReport`.

`engine_fault(spec)` is the one place that knows how the engine wants a fault described.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Self

from ..iothub.faults import _ATTEMPT_KINDS, _CLIENT_SIDE_REASONS, Fault
from ..model import (
    DEFAULT_UNREAD,
    DeviceRecovery,
    FaultKind,
    FaultSpec,
    FaultState,
    RecoveryReport,
    Throttle,
    spec_for,
    tally_messages,
)


class FaultHandle:
    """A scheduled or running fault. Thread-safe; also a context manager for its duration."""

    def __init__(self, hub, fault: Fault, spec: FaultSpec | None = None):
        self._hub = hub
        self._fault = fault
        self.spec = spec  # None for a fault a device asked for (service fault injection)

    @property
    def kind(self) -> str:
        return _kind_of(self._fault, self.spec)

    device_id = property(lambda self: self._fault.device_id)
    params = property(lambda self: dict(self._fault.params))
    started_at = property(lambda self: self._fault.started_at)
    ended_at = property(lambda self: self._fault.ended_at)
    state = property(lambda self: FaultState(self._fault.state))
    active = property(lambda self: self._fault.state == FaultState.ACTIVE)

    def wait_started(self, timeout: float | None = 30.0) -> FaultHandle:
        if not self._fault.started.wait(timeout) and self._fault.state == "pending":
            raise TimeoutError(f"fault {self.kind} did not start within {timeout:g} s")
        if self._fault.state == "cancelled":
            raise RuntimeError(f"fault {self.kind} was cancelled before it started")
        return self

    def wait(self, timeout: float | None = 60.0) -> FaultHandle:
        """Block until the fault is over (the hub is back); TimeoutError if it is not by then."""
        if not self._fault.done.wait(timeout):
            raise TimeoutError(f"fault {self.kind} still {self._fault.state} after {timeout:g} s")
        return self

    def wait_recovered(self, timeout: float | None = 60.0) -> FaultHandle:
        """Block until the fault is over and every device it disconnected is connected again;
        TimeoutError naming the devices still away. A device it never reached counts as back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait(timeout)
        while True:
            away = self.report().not_back
            if not away:
                return self
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"fault {self.kind}: {len(away)} device(s) not back after {timeout:g} s: "
                                   + ", ".join(away[:10]) + (" ..." if len(away) > 10 else ""))
            # the event log has no condition to wait on from outside the hub thread: poll it
            time.sleep(0.05 if left is None else min(0.05, left))

    def cancel(self) -> FaultHandle:
        """Never start it, or end it now."""
        if self._hub.running:
            self._hub._call(self._hub._faults_engine.end, self._fault, True)
            if getattr(self.spec, "dns", False):
                _drop_dns_move(self._hub, self._fault, "cancelled")  # only if it never started
        return self

    def report(self) -> RecoveryReport:
        return self._hub._call(build_report, self._hub, self._fault, self.spec)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self._fault.state in ("pending", "active"):
            self.cancel()

    def __repr__(self):
        return f"<FaultHandle {self.kind} {self.state}{' @' + self.device_id if self.device_id else ''}>"


def _drop_dns_move(hub: Any, fault: Fault, why: str) -> None:
    from .dns import drop_move
    drop_move(hub, fault, why)


def _kind_of(fault: Fault, spec: FaultSpec | None) -> str:
    # the vocabulary's name, also where the engine runs the fault as another of its kinds
    return fault.kind if spec is None else spec.kind.value


def build_report(hub, fault: Fault, spec: FaultSpec | None = None) -> RecoveryReport:
    rep = RecoveryReport(_kind_of(fault, spec), fault.device_id, dict(fault.params), fault.started_at, fault.ended_at)
    if fault.started_at is None:
        return rep
    start = fault.started_at
    events = [e for e in hub.event_log.list() if e.at >= start and
              (e.device_id in fault.affected or (e.device_id is None and e.kind == "connect_refused"))]
    for device_id in fault.affected:
        d = rep.devices[device_id] = DeviceRecovery(device_id)
        for e in events:
            # a TCP-level refusal names no device: it counts as any waiting device's first retry
            if e.device_id != device_id and e.device_id is not None:
                continue
            if d.disconnected_at is None:
                if e.kind == "disconnect":
                    d.disconnected_at = e.at
                    if e.reason in _CLIENT_SIDE_REASONS:
                        d.detected_at = e.at
                continue
            if d.detected_at is None and e.kind in _ATTEMPT_KINDS:
                d.detected_at = e.at
            if e.kind == "connect" and e.device_id == device_id:
                d.reconnected_at = e.at
                d.throttled = float(e.detail.get("throttled", 0.0))
                break
    tally_messages(rep, [t for t in hub.ledger.items() if fault.targets(t.device_id)])
    rep.service_throttled = sum(float(e.detail.get("seconds", 0.0)) for e in hub.event_log.list("throttle_delay")
                                if e.at >= start)
    from ..wedge_findings import findings  # the clients' side: which of these devices' clients died silently
    for w in findings(fault.affected, since=start):
        rep.wedged.setdefault(w.device_id, w.text)
    return rep


def engine_fault(spec: FaultSpec) -> Fault:
    """The engine's description of `spec`: its kind, target, window and parameters (also what
    `handle.params` and the event log show)."""
    params: dict[str, Any] = spec.params()
    kind = spec.kind.value
    if spec.kind is FaultKind.REGION_FAILOVER:
        params["refuse"] = spec.refusal  # type: ignore[attr-defined]
        params["connect"] = spec.connect_mode  # type: ignore[attr-defined]
    elif spec.kind is FaultKind.DROP:
        params["reason"] = "drop"
    elif spec.kind is FaultKind.DROP_BEFORE_ACK:
        params["remaining"] = params["count"]
    elif isinstance(spec, Throttle) and spec.rate is None:
        # over the limit outright: what the engine does for IoT Hub's own InvokeThrottling request
        kind, params = "reject_publishes", {"reason": "throttled", "seconds": spec.seconds, "source": "throttle"}
    return Fault(kind, spec.device_id, spec.lasts, **params)


class Faults:
    """`hub.faults`: start faults now (default), `at=` seconds from now, or `after_messages=` N more
    accepted messages; on the whole hub or one `device_id=`. Each method's arguments are its
    kind's `FaultSpec` (model.py); `start(spec)` takes one built elsewhere."""

    def __init__(self, hub) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self._specs: weakref.WeakKeyDictionary[Fault, FaultSpec] = weakref.WeakKeyDictionary()

    def start(self, spec: FaultSpec) -> FaultHandle:
        """Start (or schedule) the fault `spec` describes."""
        if not isinstance(spec, FaultSpec):
            raise TypeError(f"hub.faults.start() takes a FaultSpec (pytest_iotfailover.model), "
                            f"not {type(spec).__name__}")
        if spec.device_id is not None and self._hub.registry.get(spec.device_id) is None:
            # a fault on a device the hub does not know would affect nothing and pass silently
            raise ValueError(f"device_id={spec.device_id!r}: no such device on this hub")
        fault = engine_fault(spec)
        if getattr(spec, "dns", False):
            from .dns import prepare_move
            prepare_move(self._hub, fault, spec.dns_stale)  # type: ignore[attr-defined]
        with self._lock:
            self._specs[fault] = spec
        engine = self._hub._faults_engine
        try:
            self._hub._call(engine.schedule, fault, spec.at, spec.after_messages)
        except BaseException as exc:
            try:
                _drop_dns_move(self._hub, fault, "refused")  # its secondary address is not kept listening
            except Exception as close_error:  # the refusal is what the caller must see
                exc.add_note(f"closing the refused dns failover's listener failed too: {close_error!r}")
            raise
        return FaultHandle(self._hub, fault, spec)

    def _start(self, kind: FaultKind, kwargs: Mapping[str, Any]) -> FaultHandle:
        return self.start(spec_for(kind, kwargs, what=f"hub.faults.{kind.value}()"))

    def region_failover(self, outage: float = 2.0, *, keep_sessions: bool = False, refuse: str | None = None,
                        existing: str = "reset", connect: str | None = None,
                        unread: float = DEFAULT_UNREAD, keep_c2d: bool = False, rpo: float = 0.0,
                        dns: bool = False, dns_stale: float = 0.0,
                        device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Drop every connection, refuse new ones for `outage` s, then answer as the other region:
        MQTT sessions (subscriptions) gone unless keep_sessions (an assumption: no document says).
        `existing`: "reset" or "zombie" (kept open, never answered); `connect`: "reset" (default for
        the whole hub), "connack3" (default for one device) or "silent" (never answered); `refuse`
        ("tcp"/"connack") is the older spelling of connect. Data loss: `unread` s of telemetry lost
        unread, C2D dropped unless keep_c2d, `rpo` s of twin and registry changes rolled back.
        `dns=True` (a hub started with FakeHub(dns=True)): the host name moves to a new loopback
        address and the old one goes dark; it still resolves to the old one for `dns_stale` s
        after the outage. Sources: model.RegionFailover."""
        return self._start(FaultKind.REGION_FAILOVER, {
            "outage": outage, "keep_sessions": keep_sessions, "refuse": refuse, "existing": existing,
            "connect": connect, "unread": unread, "keep_c2d": keep_c2d, "rpo": rpo, "dns": dns,
            "dns_stale": dns_stale, "device_id": device_id, "at": at, "after_messages": after_messages})

    def drop(self, *, device_id=None, at=None, after_messages=None, graceful: bool = False) -> FaultHandle:
        """TCP reset now (the real hub's KillTcp); `graceful=True` closes with FIN instead."""
        return self._start(FaultKind.DROP, {"graceful": graceful, "device_id": device_id, "at": at,
                                                "after_messages": after_messages})

    def blackhole(self, seconds: float | None = None, *, device_id=None, at=None,
                  after_messages=None) -> FaultHandle:
        """Connections stay open but the hub reads and sends nothing; new ones get no CONNACK.
        `seconds=None`: until cancelled or the `with` block ends."""
        return self._start(FaultKind.BLACKHOLE, {"seconds": seconds, "device_id": device_id, "at": at,
                                                     "after_messages": after_messages})

    def refuse(self, code: int = 3, seconds: float | None = None, *, device_id=None, at=None,
               after_messages=None) -> FaultHandle:
        """New CONNECTs answered with this CONNACK code (3 server unavailable; 4 and 5 make the
        Python SDK stop retrying for good)."""
        return self._start(FaultKind.REFUSE, {"code": code, "seconds": seconds, "device_id": device_id, "at": at,
                                                  "after_messages": after_messages})

    def drop_before_ack(self, count: int = 1, *, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """The next `count` publishes are accepted (recorded) but the connection is reset before
        the PUBACK, so the client re-sends them: the ledger shows the duplicates."""
        return self._start(FaultKind.DROP_BEFORE_ACK, {"count": count, "device_id": device_id, "at": at,
                                                           "after_messages": after_messages})

    def delay_acks(self, seconds: float, duration: float | None = None, *, device_id=None, at=None,
                   after_messages=None) -> FaultHandle:
        """Every PUBACK goes out `seconds` late, for `duration` s (None: until cancelled)."""
        return self._start(FaultKind.DELAY_ACKS, {"seconds": seconds, "duration": duration, "device_id": device_id,
                                                      "at": at, "after_messages": after_messages})

    def throttle(self, rate: float | None = None, seconds: float | None = None, *, burst: int = 1,
                 max_delay: float = 10.0, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Above `rate` messages/s PUBACKs are delayed (IoT Hub's traffic shaping); a message that
        would wait more than `max_delay` s closes its connection unacknowledged, as a throttled
        IoT Hub does over MQTT. `rate=None`: every publish closes its connection, as IoT Hub's own
        fault injection (InvokeThrottling) does."""
        return self._start(FaultKind.THROTTLE, {"rate": rate, "seconds": seconds, "burst": burst, "max_delay": max_delay,
                                                    "device_id": device_id, "at": at, "after_messages": after_messages})

    def expire_tokens(self, *, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Disconnect as IoT Hub does when a SAS token expires; clients must authenticate again."""
        return self._start(FaultKind.EXPIRE_TOKENS, {"device_id": device_id, "at": at, "after_messages": after_messages})

    def _handles(self, faults: list[Fault]) -> list[FaultHandle]:
        with self._lock:
            return [FaultHandle(self._hub, f, self._specs.get(f)) for f in faults]

    def active(self) -> list[FaultHandle]:
        return self._handles(self._hub._call(lambda: list(self._hub._faults_engine.active)))

    def history(self) -> list[FaultHandle]:
        return self._handles(self._hub._call(lambda: list(self._hub._faults_engine.history)))
