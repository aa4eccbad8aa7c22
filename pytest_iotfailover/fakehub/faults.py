"""`hub.faults`: the thread-safe face of the fault engine (iothub/faults.py). Every call returns a
`FaultHandle`; `build_report` turns the hub's event log and ledger into a `RecoveryReport`."""
import math
from typing import List, Optional

from ..iothub.faults import _ATTEMPT_KINDS, _CLIENT_SIDE_REASONS, Fault
from ..model import DeviceRecovery, RecoveryReport, tally_messages

class FaultHandle:
    """A scheduled or running fault. Thread-safe; also a context manager for its duration."""

    def __init__(self, hub, fault: Fault):
        self._hub = hub
        self._fault = fault

    kind = property(lambda self: self._fault.kind)
    device_id = property(lambda self: self._fault.device_id)
    params = property(lambda self: dict(self._fault.params))
    started_at = property(lambda self: self._fault.started_at)
    ended_at = property(lambda self: self._fault.ended_at)
    state = property(lambda self: self._fault.state)
    active = property(lambda self: self._fault.state == "active")

    def wait_started(self, timeout: Optional[float] = 30.0) -> "FaultHandle":
        if not self._fault.started.wait(timeout) and self._fault.state == "pending":
            raise TimeoutError(f"fault {self.kind} did not start within {timeout:g} s")
        if self._fault.state == "cancelled":
            raise RuntimeError(f"fault {self.kind} was cancelled before it started")
        return self

    def wait(self, timeout: Optional[float] = 60.0) -> "FaultHandle":
        """Block until the fault is over (the hub is back); TimeoutError if it is not by then."""
        if not self._fault.done.wait(timeout):
            raise TimeoutError(f"fault {self.kind} still {self._fault.state} after {timeout:g} s")
        return self

    def cancel(self) -> "FaultHandle":
        """Never start it, or end it now."""
        if self._hub.running:
            self._hub._call(self._hub._faults_engine.end, self._fault, True)
        return self

    def report(self) -> RecoveryReport:
        return self._hub._call(build_report, self._hub, self._fault)

    def __enter__(self) -> "FaultHandle":
        return self

    def __exit__(self, *exc) -> None:
        if self._fault.state in ("pending", "active"):
            self.cancel()

    def __repr__(self):
        return f"<FaultHandle {self.kind} {self.state}{' @' + self.device_id if self.device_id else ''}>"


def build_report(hub, fault: Fault) -> RecoveryReport:
    rep = RecoveryReport(fault.kind, fault.device_id, dict(fault.params), fault.started_at, fault.ended_at)
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
                break
    tally_messages(rep, [t for t in hub.ledger.items() if fault.targets(t.device_id)])
    from ..wedge_findings import findings  # the clients' side: which of these devices' clients died silently
    for w in findings(fault.affected, since=start):
        rep.wedged.setdefault(w.device_id, w.text)
    return rep


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(name, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _check_target(device_id, at, after_messages):
    if device_id is not None and not isinstance(device_id, str):
        raise TypeError(f"device_id must be a string, not {type(device_id).__name__}")
    if at is not None and (not _is_number(at) or at < 0):
        raise ValueError(f"at= must be a non-negative number of seconds, got {at!r}")
    if after_messages is not None:
        _positive_int("after_messages=", after_messages)
    if at and after_messages:
        raise ValueError("give at= or after_messages=, not both")


def _seconds(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return float(value)


class Faults:
    """`hub.faults`: start faults now (default), `at=` seconds from now, or `after_messages=` N more
    accepted messages; on the whole hub or one `device_id=`."""

    def __init__(self, hub):
        self._hub = hub

    def _schedule(self, kind, device_id, at, after_messages, lasts, **params) -> FaultHandle:
        _check_target(device_id, at, after_messages)
        if device_id is not None and self._hub.registry.get(device_id) is None:
            # a fault on a device the hub does not know would affect nothing and pass silently
            raise ValueError(f"device_id={device_id!r}: no such device on this hub")
        fault = Fault(kind, device_id, lasts, **params)
        engine = self._hub._faults_engine
        self._hub._call(engine.schedule, fault, at, after_messages)
        return FaultHandle(self._hub, fault)

    def region_failover(self, outage: float = 2.0, *, keep_sessions: bool = False, refuse: Optional[str] = None,
                        device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Drop every connection, refuse new ones for `outage` s, then answer as the other region:
        MQTT sessions (subscriptions, un-acked C2D) gone unless keep_sessions; twins and ledger kept.
        `refuse`: "tcp" (default for the whole hub) or "connack" (CONNACK 3; the only choice for one
        device, since a TCP refusal cannot know which device is knocking)."""
        if refuse is None:
            refuse = "tcp" if device_id is None else "connack"
        if refuse not in ("tcp", "connack"):
            raise ValueError(f"refuse must be 'tcp' or 'connack', got {refuse!r}")
        if refuse == "tcp" and device_id is not None:
            raise ValueError("refuse='tcp' needs the whole hub: a refused TCP connection names no device")
        if not isinstance(keep_sessions, bool):
            raise TypeError(f"keep_sessions must be True or False, got {keep_sessions!r}")
        return self._schedule("region_failover", device_id, at, after_messages,
                              _seconds("outage", outage, False), outage=float(outage),
                              keep_sessions=bool(keep_sessions), refuse=refuse)

    def drop(self, *, device_id=None, at=None, after_messages=None, graceful: bool = False) -> FaultHandle:
        """TCP reset now (the real hub's KillTcp); `graceful=True` closes with FIN instead."""
        if not isinstance(graceful, bool):
            raise TypeError(f"graceful must be True or False, got {graceful!r}")
        return self._schedule("drop", device_id, at, after_messages, None, graceful=graceful, reason="drop")

    def blackhole(self, seconds: Optional[float] = None, *, device_id=None, at=None,
                  after_messages=None) -> FaultHandle:
        """Connections stay open but the hub reads and sends nothing; new ones get no CONNACK.
        `seconds=None`: until cancelled or the `with` block ends."""
        seconds = _seconds("seconds", seconds)
        return self._schedule("blackhole", device_id, at, after_messages, seconds, seconds=seconds)

    def refuse(self, code: int = 3, seconds: Optional[float] = None, *, device_id=None, at=None,
               after_messages=None) -> FaultHandle:
        """New CONNECTs answered with this CONNACK code (3 server unavailable; 4 and 5 make the
        Python SDK stop retrying for good)."""
        if isinstance(code, bool) or code not in (1, 2, 3, 4, 5):
            raise ValueError(f"CONNACK refusal code must be 1-5, got {code!r}")
        seconds = _seconds("seconds", seconds)
        return self._schedule("refuse", device_id, at, after_messages, seconds, code=code, seconds=seconds)

    def drop_before_ack(self, count: int = 1, *, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """The next `count` publishes are accepted (recorded) but the connection is reset before
        the PUBACK, so the client re-sends them: the ledger shows the duplicates."""
        _positive_int("count", count)
        return self._schedule("drop_before_ack", device_id, at, after_messages, None,
                              count=count, remaining=count)

    def delay_acks(self, seconds: float, duration: Optional[float] = None, *, device_id=None, at=None,
                   after_messages=None) -> FaultHandle:
        """Every PUBACK goes out `seconds` late, for `duration` s (None: until cancelled)."""
        duration = _seconds("duration", duration)
        return self._schedule("delay_acks", device_id, at, after_messages, duration,
                              seconds=_seconds("seconds", seconds, False), duration=duration)

    def throttle(self, rate: float, seconds: Optional[float] = None, *, burst: int = 1,
                 max_delay: float = 10.0, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Above `rate` messages/s PUBACKs are delayed (IoT Hub's traffic shaping); a message that
        would wait more than `max_delay` s closes its connection unacknowledged, as a throttled
        IoT Hub does over MQTT."""
        if not _is_number(rate) or rate <= 0:
            raise ValueError(f"rate must be a positive number of messages per second, got {rate!r}")
        _positive_int("burst", burst)
        seconds = _seconds("seconds", seconds)
        return self._schedule("throttle", device_id, at, after_messages, seconds, rate=float(rate), burst=burst,
                              max_delay=_seconds("max_delay", max_delay, False), seconds=seconds)

    def expire_tokens(self, *, device_id=None, at=None, after_messages=None) -> FaultHandle:
        """Disconnect as IoT Hub does when a SAS token expires; clients must authenticate again."""
        return self._schedule("expire_tokens", device_id, at, after_messages, None)

    def active(self) -> List[FaultHandle]:
        return [FaultHandle(self._hub, f) for f in self._hub._call(lambda: list(self._hub._faults_engine.active))]

    def history(self) -> List[FaultHandle]:
        return [FaultHandle(self._hub, f) for f in self._hub._call(lambda: list(self._hub._faults_engine.history))]
