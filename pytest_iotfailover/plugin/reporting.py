"""What a test did to the hub and what got through, for failure texts and the run summary.

The plugin opens a `TestRecord` around each test; the `failover` fixture adds its faults and the
delivery assertions add their figures. The figures travel as `user_properties` (so junit XML and
pytest-xdist carry them) and come back together in the terminal summary.
"""
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

PROPERTY = "iothub_failover"


@dataclass
class DeliveryFigures:
    sent: int
    delivered: int          # distinct sent ids the hub accepted
    duplicates: int         # extra copies of sent ids
    lost: int               # sent ids never accepted (and no longer pending in an Outbox)
    pending: int = 0        # sent ids an Outbox still holds, not yet acknowledged
    latency_p50: Optional[float] = None
    latency_p99: Optional[float] = None
    latency_max: Optional[float] = None


@dataclass
class TestRecord:
    nodeid: str
    handles: List[Any] = field(default_factory=list)         # faults started, live
    faults: List[Any] = field(default_factory=list)          # their RecoveryReports, at teardown
    deliveries: List[DeliveryFigures] = field(default_factory=list)

    def fault_windows(self):
        return [(h.kind, h.started_at, h.ended_at) for h in self.handles if h.started_at is not None]

    def summary(self) -> Optional[Dict[str, Any]]:
        if not self.faults and not self.deliveries:
            return None
        out: Dict[str, Any] = {"faults": []}
        for r in self.faults:
            if r.started_at is None:
                continue  # cancelled before it began
            out["faults"].append({"fault": r.fault, "target": r.target, "outage": r.outage,
                                  "time_to_detect": r.time_to_detect, "time_to_recover": r.time_to_recover,
                                  "devices": len(r.devices), "recovered": r.recovered,
                                  "wedged": dict(getattr(r, "wedged", None) or {})})
        if self.deliveries:
            last = self.deliveries[-1]
            out["delivery"] = asdict(last)
        return out

    def user_properties(self):
        s = self.summary()
        if s is None:
            return []
        props = [(PROPERTY, json.dumps(s, sort_keys=True))]
        if s["faults"]:
            f = s["faults"][0]
            props += [("iothub_fault", "+".join(x["fault"] for x in s["faults"])),
                      ("iothub_outage_s", _num(f["outage"])),
                      ("iothub_time_to_detect_s", _num(f["time_to_detect"])),
                      ("iothub_time_to_recover_s", _num(f["time_to_recover"]))]
        if "delivery" in s:
            d = s["delivery"]
            props += [("iothub_sent", d["sent"]), ("iothub_delivered", d["delivered"]),
                      ("iothub_duplicates", d["duplicates"]), ("iothub_lost", d["lost"])]
        return props


def _num(v):
    return "" if v is None else round(v, 3)


_current: Optional[TestRecord] = None


def begin(nodeid: str) -> TestRecord:
    global _current
    _current = TestRecord(nodeid)
    return _current


def current() -> Optional[TestRecord]:
    return _current


def end() -> Optional[TestRecord]:
    global _current
    rec, _current = _current, None
    return rec


def _fmt(v, unit="s"):
    return "-" if v is None else f"{v:.2f}{unit}"


def summary_lines(rows) -> List[str]:
    """rows: (nodeid, outcome, summary dict) -> the lines of the terminal section."""
    lines = []
    for nodeid, outcome, s in rows:
        faults = s.get("faults") or []
        fault_txt = ", ".join(
            f"{f['fault']}{'@' + f['target'] if f.get('target') else ''} outage {_fmt(f['outage'])} "
            f"detect {_fmt(f['time_to_detect'])} recover {_fmt(f['time_to_recover'])}"
            + ("" if f.get("recovered", True) else " NOT RECOVERED")
            + (f" WEDGED {'; '.join(f['wedged'].values())}" if f.get("wedged") else "")
            for f in faults) or "no fault"
        d = s.get("delivery")
        deliv = (f"sent {d['sent']} delivered {d['delivered']} duplicates {d['duplicates']} lost {d['lost']}"
                 + (f" pending {d['pending']}" if d.get("pending") else "")
                 if d else "no delivery assertion")
        lines.append(f"{outcome.upper():7} {nodeid}: {fault_txt}; {deliv}")
    return lines
