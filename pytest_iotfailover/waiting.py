"""Waiting on the hub's stores from other threads: the stores themselves (iothub/ledger.py,
iothub/events.py) do not lock or read clocks; these subclasses add locking, a shared `Pulse` that
every change beats, and deadlines on the monotonic clock. Used by FakeHub and by the real
backend's ledger, which cannot share a module under fakehub/.

Waiters never run a caller's predicate under the lock the hub records with, and they re-check on
every beat and at least every `RECHECK_PERIOD` s: a condition that no hub change signals (a
device-side callback having run) is still seen promptly instead of at the timeout.
"""
import itertools
import threading
import time
from collections.abc import Callable, Collection

from .iothub.events import DEFAULT_MAX_EVENTS, EventLog, HubEvent
from .iothub.ledger import Ledger, Telemetry

RECHECK_PERIOD = 0.05


class Pulse:
    """A change counter that waiters can sleep on; one per hub, shared by its ledger and event log."""

    def __init__(self) -> None:
        # Writers on the hub thread take `mutex` itself: a Condition's __enter__/__exit__ are
        # Python calls, paid on every message. It is the very lock the Condition waits on.
        self.mutex = threading.Lock()
        self.lock = threading.Condition(self.mutex)
        self.generation = 0
        self._waiters = 0

    def beat_locked(self) -> None:
        """Count a change; the caller holds `lock`."""
        self.generation += 1
        if self._waiters:
            self.lock.notify_all()

    def beat(self) -> None:
        with self.lock:
            self.beat_locked()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the generation moves past `seen`, for at most `timeout` s."""
        with self.lock:
            if self.generation != seen:
                return
            self._waiters += 1
            try:
                self.lock.wait(max(0.0, min(timeout, RECHECK_PERIOD)))
            finally:
                self._waiters -= 1

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Re-check `predicate()` (outside the lock) on every beat and every RECHECK_PERIOD s;
        False if it is still unmet at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.generation
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.wait(seen, remaining)


class WaitingLedger(Ledger):
    """A Ledger that any thread may record into and wait on."""

    def __init__(self, pulse: Pulse | None = None) -> None:
        super().__init__()
        self.pulse = pulse if pulse is not None else Pulse()

    def record(self, t: Telemetry) -> Telemetry:
        with self.pulse.lock:
            super().record(t)
            self.pulse.beat_locked()
        return t

    def record_message(self, device_id: str, message_id: str | None, body: bytes,
                       properties: dict, system_properties: dict, enqueued_at: float,
                       dup: bool = False, qos: int = 1) -> bool:
        pulse = self.pulse
        with pulse.mutex:
            duplicate = Ledger.record_message(self, device_id, message_id, body, properties,
                                              system_properties, enqueued_at, dup, qos)
            # beat_locked, inlined: this runs once per telemetry message
            pulse.generation += 1
            if pulse._waiters:
                pulse.lock.notify_all()
        return duplicate

    def mark_lost_in_failover(self, since: float, until: float,
                              device_ids: Collection[str] | None = None) -> int:
        with self.pulse.lock:
            n = super().mark_lost_in_failover(since, until, device_ids)
            self.pulse.beat_locked()
        return n

    def wait_for(self, count: int, device_id: str | None = None, timeout: float = 10.0,
                 include_lost: bool = True) -> list[Telemetry]:
        """Block until `count` messages (of `device_id`, if given) are recorded."""
        if not self.pulse.wait_until(lambda: self.count(device_id, include_lost) >= count, timeout):
            who = f" from device {device_id!r}" if device_id else ""
            raise TimeoutError(f"waited {timeout:g} s for {count} telemetry messages{who}; "
                               f"{self.count(device_id, include_lost)} arrived")
        return self.items(device_id, include_lost=include_lost)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Re-check `predicate()` on each hub change and periodically; False if still unmet at the deadline."""
        return self.pulse.wait_until(predicate, timeout)


class WaitingEventLog(EventLog):
    """An EventLog on the wall clock that any thread may wait on."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, clock: Callable[[], float] = time.time,
                 pulse: Pulse | None = None):
        super().__init__(max_events, clock)
        self.pulse = pulse if pulse is not None else Pulse()

    def add(self, kind: str, device_id: str | None = None, **detail: object) -> HubEvent:
        with self.pulse.lock:
            ev = super().add(kind, device_id, **detail)
            self.pulse.beat_locked()
        return ev

    def wait_for(self, predicate: Callable[[HubEvent], bool], timeout: float = 10.0,
                 what: str = "event") -> HubEvent:
        """Block until an event satisfying `predicate` is logged; return the first such event.
        `predicate` runs outside the lock, on each event once."""
        deadline = time.monotonic() + timeout
        events = self._events
        with self.pulse.lock:
            fresh = list(events)
            seen, gen = self._added, self.pulse.generation
        while True:
            for ev in fresh:
                if predicate(ev):
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout:g} s")
            self.pulse.wait(gen, remaining)
            with self.pulse.lock:
                # only what arrived since the last look, not the whole ring again
                new = min(self._added - seen, len(events))
                fresh = list(itertools.islice(reversed(events), new))[::-1]
                seen, gen = self._added, self.pulse.generation
