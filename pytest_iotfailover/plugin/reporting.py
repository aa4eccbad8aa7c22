"""What a test did to the hub and what got through, for failure texts and the run summary.

The plugin keeps a `TestRecord` in each test's `item.stash` from setup to the end of teardown and
hands it to the test's `iothub` view (`HubView.recorder`): the `failover` fixture adds its faults
and the delivery assertions add their figures through the view. The figures travel as
`user_properties` (so junit XML and pytest-xdist carry them) and come back together in the
terminal summary.
"""
from __future__ import annotations

import json
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from .keys import PROPERTY, RECORD, record_of

if TYPE_CHECKING:
    from ..testing.assertions import DeliveryFigures

__all__ = ["PROPERTY", "DeliveryFigures", "TestRecord", "begin", "end", "record_of", "summary_lines"]



def __getattr__(name: str) -> Any:
    # DeliveryFigures is re-exported, imported on first use: this module loads with the first test
    # that uses the hub, which need not assert on deliveries
    if name == "DeliveryFigures":
        from ..testing.assertions import DeliveryFigures
        return DeliveryFigures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OutboxWatch:
    """The Outboxes made while one test runs (devices.observers tells of each): a weak reference to
    each while it lives, a snapshot taken when it closes, so one the test closed and dropped still
    shows in the report and none is kept alive past the test by the watch.

    `whole=False` (no report or timeline wants the messages, only the summary's count of those never
    acknowledged): the snapshots hold only those, so an Outbox of a million messages costs a pass
    over its ids and leaves a few records behind, not a million."""

    def __init__(self, whole: bool = True) -> None:
        from ..devices import observers
        self.whole = whole
        self._lock = threading.Lock()
        self._seen: list[tuple[weakref.ref[Any], list[Any]]] = []  # (outbox, [its snapshot at close])
        self._listener: Any = observers.listen(self._created, self._closed)

    def _created(self, outbox: Any) -> None:
        with self._lock:
            self._seen.append((weakref.ref(outbox), []))

    def _closed(self, outbox: Any) -> None:
        from ..devices import observers
        snap = observers.snapshot(outbox, unacknowledged_only=not self.whole)
        with self._lock:
            for ref, last in self._seen:
                if ref() is outbox:
                    last[:] = [snap]

    def snapshots(self) -> list[Any]:
        """Each Outbox's messages now (or as it was when closed, once it is gone)."""
        from ..devices import observers
        with self._lock:
            seen = [(ref(), list(last)) for ref, last in self._seen]
        out = []
        for outbox, last in seen:
            if outbox is not None and getattr(outbox, "_core", None) is not None:
                out.append(observers.snapshot(outbox, unacknowledged_only=not self.whole))
            elif last:
                out.append(last[0])
        return out

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            self._seen.clear()


@dataclass
class TestRecord:
    __test__ = False  # not a test class, whatever its name
    nodeid: str
    handles: list[Any] = field(default_factory=list)         # faults started, live
    faults: list[Any] = field(default_factory=list)          # their RecoveryReports, at teardown
    deliveries: list[DeliveryFigures] = field(default_factory=list)  # every delivery assertion's
    started_at: float = field(default_factory=time.time)
    outboxes: OutboxWatch | None = None
    _outboxes_at_end: list[Any] | None = field(default=None, init=False, repr=False)

    def outbox_snapshots(self) -> list[Any]:
        """The test's Outboxes as they were when it ended: taken on the first call, at the start of
        its teardown (before the fixtures close theirs), so the lanes and the summary agree."""
        if self._outboxes_at_end is None:
            self._outboxes_at_end = self.outboxes.snapshots() if self.outboxes is not None else []
        return self._outboxes_at_end

    def outboxes_wanted(self) -> bool:
        """Whether anything will read the Outboxes' view: the lanes, or the summary of a test that
        started a fault or asserted delivery (a pass over every message of every Outbox otherwise
        spent for nothing)."""
        return self.outboxes is not None and (self.outboxes.whole or bool(self.handles or self.deliveries))

    def never_acknowledged(self) -> dict[str, int] | None:
        """The Outboxes' messages the device never got an acknowledgement for (None: no Outbox)."""
        from ..devices import observers
        snaps = self.outbox_snapshots()
        if not snaps:
            return None
        given_up, pending = observers.unacknowledged(snaps)
        return {"never_acknowledged": given_up + pending, "given_up": given_up, "pending": pending}

    def fault_windows(self) -> list[tuple[str, float, float | None]]:
        return [(h.kind, h.started_at, h.ended_at) for h in self.handles if h.started_at is not None]

    def add_delivery(self, figures: DeliveryFigures) -> None:
        self.deliveries.append(figures)

    def summary(self) -> dict[str, Any] | None:
        if not self.faults and not self.deliveries:
            return None
        out: dict[str, Any] = {"faults": []}
        for r in self.faults:
            if r.started_at is None:
                continue  # cancelled before it began
            out["faults"].append({"fault": r.fault, "target": r.target, "outage": r.outage,
                                  "time_to_detect": r.time_to_detect, "time_to_recover": r.time_to_recover,
                                  "devices": len(r.devices), "recovered": r.recovered,
                                  "never_disconnected": len(r.never_disconnected),
                                  **_downtimes(r), "throttled": float(getattr(r, "throttled", 0.0) or 0.0),
                                  "wedged": dict(getattr(r, "wedged", None) or {})})
        if self.deliveries:
            from .gate import delivery_entry
            d = delivery_entry(self.deliveries) or {}
            # the names this property always had, summed over every assertion and device
            out["delivery"] = {"sent": d["sent"], "delivered": d["delivered"], "duplicates": d["duplicates"],
                               "lost": d["lost"] - d["lost_in_failover"], "lost_in_failover": d["lost_in_failover"],
                               "pending": d["in_flight"], "latency_p50": d["latency_p50"],
                               "latency_p99": d["latency_p99"], "latency_max": d["latency_max"],
                               "assertions": len(self.deliveries)}
        never = self.never_acknowledged()
        if never is not None:
            out["outboxes"] = never
        return out

    def user_properties(self) -> list[tuple[str, Any]]:
        s = self.summary()
        if s is None:
            return []
        props: list[tuple[str, Any]] = [(PROPERTY, json.dumps(s, sort_keys=True))]
        if s["faults"]:
            f = s["faults"][0]
            props += [("iothub_fault", "+".join(x["fault"] for x in s["faults"]))]
            # a figure not measured is left out, never written as an empty string
            props += [(name, round(f[key], 3)) for name, key in (
                ("iothub_outage_s", "outage"), ("iothub_time_to_detect_s", "time_to_detect"),
                ("iothub_time_to_recover_s", "time_to_recover")) if f[key] is not None]
        if "delivery" in s:
            d = s["delivery"]
            props += [("iothub_sent", d["sent"]), ("iothub_delivered", d["delivered"]),
                      ("iothub_duplicates", d["duplicates"]), ("iothub_lost", d["lost"])]
        if "outboxes" in s:
            props.append(("iothub_never_acknowledged", s["outboxes"]["never_acknowledged"]))
        return props


def _downtimes(r: Any) -> dict[str, float | None]:
    """downtime_max and downtime_p99 of a RecoveryReport (None: a device is still away)."""
    from .gate import _finite, _p99
    d = r.downtimes()
    if not d and r.ended_at is not None:
        return {"downtime_max": 0.0, "downtime_p99": 0.0}
    return {"downtime_max": _finite(d[-1]) if d else None, "downtime_p99": _finite(_p99(d))}


def begin(item: pytest.Item) -> TestRecord:
    from .gating import needed
    from .keys import settings_of
    record = item.stash[RECORD] = TestRecord(item.nodeid)
    # from setup on: the Outboxes the test's fixtures make belong to it too; the whole of each only
    # when its lanes are drawn, the summary needs just the messages never acknowledged
    record.outboxes = OutboxWatch(whole=needed(item, settings_of(item.config)))
    return record


def end(item: pytest.Item) -> TestRecord | None:
    record = item.stash.get(RECORD, None)
    if record is not None:
        del item.stash[RECORD]  # the item outlives the test; its fault handles need not
        if record.outboxes is not None:
            if record.outboxes_wanted():
                record.outbox_snapshots()  # taken already at the start of teardown, unless that failed
            record.outboxes.stop()  # what the next test's Outboxes do is not this test's
    return record


def _fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def summary_lines(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """rows: (nodeid, outcome, summary dict) -> the lines of the terminal section."""
    lines = []
    for nodeid, outcome, s in rows:
        faults = s.get("faults") or []
        fault_txt = ", ".join(
            f"{f['fault']}{'@' + f['target'] if f.get('target') else ''} outage {_fmt(f['outage'])} "
            f"detect {_fmt(f['time_to_detect'])} recover {_fmt(f['time_to_recover'])}"
            + ("" if f.get("recovered", True) else " NOT RECOVERED")
            + (" (no device disconnected)" if f.get("devices") and f.get("never_disconnected") == f["devices"]
               else "")
            + (f" WEDGED {'; '.join(f['wedged'].values())}" if f.get("wedged") else "")
            for f in faults) or "no fault"
        d = s.get("delivery")
        deliv = (f"sent {d['sent']} delivered {d['delivered']} duplicates {d['duplicates']} lost {d['lost']}"
                 + (f" lost in failover {d['lost_in_failover']}" if d.get("lost_in_failover") else "")
                 + (f" pending {d['pending']}" if d.get("pending") else "")
                 if d else "no delivery assertion")
        n = s.get("outboxes") or {}
        never = (f"; {n['never_acknowledged']} never acknowledged ({n['given_up']} given up, "
                 f"{n['pending']} pending)" if n.get("never_acknowledged") else "")
        lines.append(f"{outcome.upper():7} {nodeid}: {fault_txt}; {deliv}{never}")
    return lines
