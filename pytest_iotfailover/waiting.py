"""Waiting on the hub's stores from other threads: the stores themselves (iothub/ledger.py,
iothub/events.py) do not lock or read clocks; these subclasses add a condition variable that
every change notifies, and deadlines on the monotonic clock. Used by FakeHub and by the real
backend's ledger, which cannot share a module under fakehub/.
"""
import itertools
import threading
import time
from collections.abc import Callable

from .iothub.events import DEFAULT_MAX_EVENTS, EventLog, HubEvent
from .iothub.ledger import Ledger, Telemetry


class WaitingLedger(Ledger):
    """A Ledger that any thread may record into and wait on."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())
        self._waiters = 0

    def record(self, t: Telemetry) -> Telemetry:
        with self._cond:
            super().record(t)
            if self._waiters:
                self._cond.notify_all()
        return t

    def _wait(self, timeout: float) -> None:
        # record() skips notify_all while this is 0; the caller holds the lock
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def wait_for(self, count: int, device_id: str | None = None, timeout: float = 10.0) -> list[Telemetry]:
        """Block until `count` messages (of `device_id`, if given) are recorded."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                items = self.items(device_id)
                if len(items) >= count:
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    who = f" from device {device_id!r}" if device_id else ""
                    raise TimeoutError(
                        f"waited {timeout:g} s for {count} telemetry messages{who}; {len(items)} arrived")
                self._wait(remaining)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Re-check `predicate()` each time a message is recorded; False if still unmet at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wait(remaining)
            return True


class WaitingEventLog(EventLog):
    """An EventLog on the wall clock that any thread may wait on."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, clock: Callable[[], float] = time.time):
        super().__init__(max_events, clock)
        self._cond = threading.Condition()

    def add(self, kind: str, device_id: str | None = None, **detail: object) -> HubEvent:
        with self._cond:
            ev = super().add(kind, device_id, **detail)
            self._cond.notify_all()
        return ev

    def wait_for(self, predicate: Callable[[HubEvent], bool], timeout: float = 10.0,
                 what: str = "event") -> HubEvent:
        """Block until an event satisfying `predicate` is logged; return the first such event."""
        deadline = time.monotonic() + timeout
        with self._cond:
            events = self._events
            fresh = list(events)
            while True:
                for ev in fresh:
                    if predicate(ev):
                        return ev
                seen = self._added
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g} s")
                self._cond.wait(remaining)
                # only what arrived since the last look, not the whole ring again
                new = min(self._added - seen, len(events))
                fresh = list(itertools.islice(reversed(events), new))[::-1]
