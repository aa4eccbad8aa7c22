"""The hub's event log: connects, disconnects with reasons, auth failures, faults, errors.

The log is a ring: it keeps the newest `max_events` events and counts the ones it let go, so a
long soak or a device in a reconnect loop cannot grow the hub without limit. Internal errors
are also kept on a side list that the ring never trims, so `FakeHub.stop()` still sees them.
Text that a peer chose (client ids, topics, reasons quoting them) is clipped before it is
kept, so a refused attempt costs a small, fixed amount whatever the peer sent.
"""
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional

DEFAULT_MAX_EVENTS = 50_000  # at most ~35 MB even when every event carries clipped peer text
MAX_DETAIL_CHARS = 256   # longest string kept per detail value or device id
MAX_ERRORS = 100         # internal errors kept in full (tracebacks); more are only counted
_UNCLIPPED = ("traceback",)


def clip(value: Any, limit: int = MAX_DETAIL_CHARS) -> Any:
    """`value` with any over-long string cut to `limit` characters plus a note of what was cut."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}...(+{len(value) - limit} chars)"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:limit])
    if isinstance(value, (list, tuple)):
        # every item is kept: lists in events are the hub's own (affected devices, topic filters)
        return [clip(v, limit) for v in value]
    return value


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
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS):
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
            raise ValueError(f"max_events must be a positive integer, got {max_events!r}")
        self.max_events = max_events
        self._events: Deque[HubEvent] = deque(maxlen=max_events)
        self._errors: List[HubEvent] = []
        self._errors_dropped = 0
        self._added = 0
        self._cond = threading.Condition()

    def add(self, kind: str, device_id: Optional[str] = None, **detail) -> HubEvent:
        detail = {k: (v if k in _UNCLIPPED else clip(v)) for k, v in detail.items()}
        ev = HubEvent(kind, clip(device_id), time.time(), detail)
        with self._cond:
            self._events.append(ev)
            self._added += 1
            if kind == "error":
                if len(self._errors) < MAX_ERRORS:
                    self._errors.append(ev)
                else:
                    self._errors_dropped += 1
            self._cond.notify_all()
        return ev

    @property
    def dropped(self) -> int:
        """How many events the ring has let go to stay within `max_events`."""
        with self._cond:
            return self._added - len(self._events)

    @property
    def total(self) -> int:
        """Events logged since the hub started, kept or not."""
        with self._cond:
            return self._added

    def errors(self) -> List[HubEvent]:
        """Every internal error (the first MAX_ERRORS in full), even those the ring dropped."""
        with self._cond:
            errs = list(self._errors)
            more = self._errors_dropped
        if more:
            errs.append(HubEvent("error", None, time.time(),
                                 {"message": f"{more} more internal errors were not kept"}))
        return errs

    def list(self, kind: Optional[str] = None, device_id: Optional[str] = None) -> List[HubEvent]:
        with self._cond:
            evs = list(self._events)
        return [e for e in evs if (kind is None or e.kind == kind)
                and (device_id is None or e.device_id == device_id)]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "event") -> HubEvent:
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
