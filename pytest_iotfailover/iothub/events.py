"""The hub's event log: connects, disconnects with reasons, auth failures, faults, errors.

The log is a ring: it keeps the newest `max_events` events and counts the ones it let go, so a
long soak or a device in a reconnect loop cannot grow the hub without limit. Internal errors
are also kept on a side list that the ring never trims, so `FakeHub.stop()` still sees them.
Text that a peer chose (client ids, topics, reasons quoting them) is clipped before it is
kept, so a refused attempt costs a small, fixed amount whatever the peer sent.

A plain store: it reads no clock (the driver passes one) and does not lock; one thread (the
hub's) writes, and readers take copies. Waiting for an event is the driver's (waiting.py).
"""
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    device_id: str | None
    at: float                 # the clock's time (FakeHub: time.time())
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        return self.detail.get("reason")


def _no_clock() -> float:
    return 0.0


class EventLog:
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, clock: Callable[[], float] = _no_clock):
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
            raise ValueError(f"max_events must be a positive integer, got {max_events!r}")
        self.max_events = max_events
        self._events: deque[HubEvent] = deque(maxlen=max_events)
        self._errors: list[HubEvent] = []
        self._errors_dropped = 0
        self._added = 0
        self.clock = clock

    def add(self, kind: str, device_id: str | None = None, **detail: Any) -> HubEvent:
        detail = {k: (v if k in _UNCLIPPED else clip(v)) for k, v in detail.items()}
        ev = HubEvent(kind, clip(device_id), self.clock(), detail)
        self._events.append(ev)
        self._added += 1
        if kind == "error":
            if len(self._errors) < MAX_ERRORS:
                self._errors.append(ev)
            else:
                self._errors_dropped += 1
        return ev

    @property
    def dropped(self) -> int:
        """How many events the ring has let go to stay within `max_events`."""
        return self._added - len(self._events)

    @property
    def total(self) -> int:
        """Events logged since the hub started, kept or not."""
        return self._added

    def errors(self) -> list[HubEvent]:
        """Every internal error (the first MAX_ERRORS in full), even those the ring dropped."""
        errs = list(self._errors)
        more = self._errors_dropped
        if more:
            errs.append(HubEvent("error", None, self.clock(),
                                 {"message": f"{more} more internal errors were not kept"}))
        return errs

    def list(self, kind: str | None = None, device_id: str | None = None) -> list[HubEvent]:
        evs = list(self._events)  # one C call: atomic under the GIL
        return [e for e in evs if (kind is None or e.kind == kind)
                and (device_id is None or e.device_id == device_id)]
