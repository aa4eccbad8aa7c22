"""The hub's event log: connects, disconnects with reasons, auth failures, faults, errors."""
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class HubEvent:
    kind: str                 # "connect", "disconnect", "auth_failure", "error", "fault", ...
    device_id: Optional[str]
    at: float                 # time.time()
    detail: Dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> Optional[str]:
        return self.detail.get("reason")


class EventLog:
    def __init__(self):
        self._events: List[HubEvent] = []
        self._cond = threading.Condition()

    def add(self, kind: str, device_id: Optional[str] = None, **detail) -> HubEvent:
        ev = HubEvent(kind, device_id, time.time(), detail)
        with self._cond:
            self._events.append(ev)
            self._cond.notify_all()
        return ev

    def list(self, kind: Optional[str] = None, device_id: Optional[str] = None) -> List[HubEvent]:
        with self._cond:
            evs = list(self._events)
        return [e for e in evs if (kind is None or e.kind == kind)
                and (device_id is None or e.device_id == device_id)]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "event") -> HubEvent:
        """Block until an event satisfying `predicate` is logged; return the first such event."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events:
                    if predicate(ev):
                        return ev
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g} s")
                self._cond.wait(remaining)
