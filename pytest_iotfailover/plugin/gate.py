"""The CI gate: each test's entry of the run report, its SLO verdicts and its baseline comparison.

At teardown, once the test's faults are over and their reports final, the plugin builds the test's
entry (the `test` object of report_schema.json), judges it against the objectives (--iothub-slo
merged with the test's `failover(slo=...)`) and the baseline, and fails the test with the verdicts'
texts. The entry travels in the teardown report's user_properties, so the pytest-xdist controller
receives every worker's entries and writes the one report (and the one timeline page).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from ..testing import baseline as baseline_mod
from ..testing import slo as slo_mod

ENTRY = "iothub_report_entry"
SCHEMA_VERSION = 1
_GATE = "_gate"   # internal part of an entry: the gate's failure texts, never written to the report


class GateFailure(Exception):
    """A test broke an objective or regressed against its baseline."""


# --- the entry --------------------------------------------------------------------------------

def _scalar_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if v is None or isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[str(k)] = v
        else:
            out[str(k)] = str(v)
    return out


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, math.ceil(0.99 * len(ranked)) - 1)]


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, 6)


def recovery_status(d: Any) -> str:
    if d.disconnected_at is None:
        return "never_disconnected"
    return "recovered" if d.reconnected_at is not None else "not_recovered"


def fault_entry(index: int, rep: Any, delivery: Mapping[str, Any] | None, throttled: float = 0.0) -> dict[str, Any]:
    """One `fault` of the schema from a RecoveryReport. The delivery counts are the test's (the
    assertions do not split them by fault)."""
    downtimes = rep.downtimes()
    hit = [d for d in rep.devices.values() if d.disconnected_at is not None]
    ended = rep.ended_at is not None
    none_hit = ended and not hit   # nothing to recover from: zero, not "never"
    d = delivery or {}
    figures = {
        "outage": _finite(rep.outage), "time_to_detect": _finite(rep.time_to_detect),
        "time_to_recover": _finite(rep.time_to_recover),
        "downtime_max": 0.0 if none_hit else _finite(downtimes[-1]) if downtimes else None,
        "downtime_p99": 0.0 if none_hit else _finite(_p99(downtimes)),
        "devices": len(rep.devices), "devices_disconnected": len(hit),
        "devices_recovered": sum(1 for x in hit if x.reconnected_at is not None),
        "lost": int(d.get("lost", 0)), "lost_in_failover": int(d.get("lost_in_failover", 0)),
        "duplicates": int(d.get("duplicates", rep.duplicates)),
        "duplicates_pct": (100.0 * d["duplicates"] / d["delivered"]) if d.get("delivered") else None,
        "latency_p99": d.get("latency_p99"), "throttled_time": float(throttled),
        "messages_before": rep.messages_before, "messages_during": rep.messages_during,
        "messages_after": rep.messages_after,
    }
    recovery = [{"device_id": x.device_id, "status": recovery_status(x), "disconnected_at": x.disconnected_at,
                 "detected_at": x.detected_at, "reconnected_at": x.reconnected_at,
                 "downtime": _finite(x.downtime)} for x in rep.devices.values()]
    return {"id": index, "kind": rep.fault, "target": rep.target, "params": _scalar_params(rep.params),
            "started_at": rep.started_at, "ended_at": rep.ended_at,
            "cancelled": bool(ended and rep.started_at is None), "figures": figures, "recovery": recovery}


def delivery_entry(deliveries: Iterable[Any]) -> dict[str, Any] | None:
    """Every delivery assertion of the test added up (each covers its own messages)."""
    items = list(deliveries)
    if not items:
        return None
    def total(name: str) -> int:
        return sum(int(getattr(x, name, 0) or 0) for x in items)
    def worst(name: str) -> float | None:
        vals = [getattr(x, name) for x in items if getattr(x, name, None) is not None]
        return max(vals) if vals else None
    return {"sent": total("sent"), "delivered": total("delivered"), "duplicates": total("duplicates"),
            "lost": total("lost") + total("lost_in_failover"), "lost_in_failover": total("lost_in_failover"),
            "in_flight": total("pending"), "latency_p50": worst("latency_p50"),
            "latency_p99": worst("latency_p99"), "latency_max": worst("latency_max")}


def device_lanes(device_ids: list[str], events: list[Any], telemetry: list[Any], start: float,
                 faults: list[dict[str, Any]], outboxes: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Per device: connection state intervals from the hub's event log, and its messages.

    The hub sees a message arrive, not the client's attempts: `sent` holds the first arrival. What
    the test's Outboxes (`outboxes`: devices.observers snapshots) know is added: when the application
    submitted each message, when each attempt started and failed, when the device got the
    acknowledgement, the Outbox's last word on it, and the messages that never reached the hub,
    which the hub cannot know of."""
    lanes = []
    for device_id in device_ids:
        states: list[dict[str, Any]] = []
        for e in events:
            if e.device_id != device_id:
                continue
            if e.kind == "connect":
                _move(states, "connected", e.at, start)
            elif e.kind == "disconnect":
                _move(states, "reconnecting", e.at, start, e.reason)
            elif e.kind in ("connect_refused", "auth_failure"):
                _move(states, "refused", e.at, start, e.reason or e.kind)
        lanes.append({"device_id": device_id, "states": states, "messages": _hub_messages(device_id, telemetry)})
    _add_outboxes(lanes, list(outboxes), start)
    return lanes


def _hub_messages(device_id: str, telemetry: list[Any]) -> list[dict[str, Any]]:
    copies: dict[str, dict[str, Any]] = {}
    for t in telemetry:
        if t.device_id != device_id or t.message_id is None:
            continue
        m = copies.get(t.message_id)
        lost = bool(getattr(t, "lost_in_failover", False))
        if m is None:
            # acknowledged, then lost in a failover: the backend never read it
            copies[t.message_id] = {"id": str(t.message_id), "sent": [t.enqueued_at], "acked": t.enqueued_at,
                                    "delivered": None if lost else t.enqueued_at, "duplicates": [],
                                    "fate": "lost_in_failover" if lost else "delivered"}
        else:
            m["duplicates"].append(t.enqueued_at)
            if m["fate"] == "lost_in_failover" and not lost:  # a copy sent again after the failover
                m["fate"], m["delivered"] = "delivered", t.enqueued_at
    return list(copies.values())


def _add_outboxes(lanes: list[dict[str, Any]], outboxes: list[Any], start: float) -> None:
    """Merge the Outboxes' view into the hub's lanes (in place)."""
    if not outboxes:
        return
    by_device = {lane["device_id"]: lane for lane in lanes}
    by_id = {(lane["device_id"], m["id"]): m for lane in lanes for m in lane["messages"]}
    hub_ids: dict[str, list[dict[str, Any]]] = {}
    for (_device, mid), m in by_id.items():
        hub_ids.setdefault(mid, []).append(m)
    for snap in outboxes:
        for rec in snap.messages:
            if rec.device_id is not None:
                seen = by_id.get((rec.device_id, rec.message_id))
            else:  # a pool's acknowledged message: the hub knows its device
                copies = hub_ids.get(rec.message_id, [])
                if len(copies) > 1:
                    continue  # several devices sent this id; which copy is this outbox's cannot be told
                seen = copies[0] if copies else None
            if seen is not None:
                _outbox_fields(seen, rec, snap.name)
                if rec.state != "acknowledged" and rec.acked_at is None:
                    seen["acked"] = None  # the hub has it; the device never heard so (the PUBACK was lost)
                continue
            device = rec.device_id if rec.device_id is not None else f"{snap.name} (device not known)"
            lane = by_device.get(device)
            if lane is None:
                lane = by_device[device] = {"device_id": device, "states": [], "messages": []}
                lanes.append(lane)
            lane["messages"].append(_never_seen(rec, snap, start))
    for lane in lanes:
        lane["messages"].sort(key=lambda m: m.get("submitted") or m["sent"][0])


def _outbox_fields(m: dict[str, Any], rec: Any, outbox: str) -> None:
    if rec.submitted_at is not None:
        m["submitted"] = rec.submitted_at
    m["outbox"] = outbox
    m["outbox_state"] = rec.state
    m["failures"] = [float(t) for t in rec.failures]
    if rec.attempts:  # none for a message queued behind a stuck one: it was never tried
        m["attempts"] = [float(t) for t in rec.attempts]
        m["attempt_count"] = max(int(rec.attempt_count), len(rec.attempts))
    if rec.acked_at is not None:
        m["device_acked"] = float(rec.acked_at)


def _never_seen(rec: Any, snap: Any, start: float) -> dict[str, Any]:
    """A message the test's Outbox holds (or held) that the hub has no record of."""
    if rec.state == "dropped" or (rec.state == "pending" and snap.closed):
        fate = "lost"          # no longer being sent: evicted, or left behind when its Outbox closed
    else:
        fate = "in_flight"     # still being retried, or acknowledged but not yet in the hub's view
    submitted = rec.submitted_at if rec.submitted_at is not None else start
    # `sent` holds at least one time (schema 1): the submit time, the one attempt time known
    m: dict[str, Any] = {"id": str(rec.message_id), "sent": [submitted], "acked": None, "delivered": None,
                         "duplicates": [], "fate": fate}
    _outbox_fields(m, rec, snap.name)
    return m


def _move(states: list[dict[str, Any]], state: str, at: float, start: float, reason: str | None = None) -> None:
    """Close the open interval (unless it is already in `state`) and open one in `state`."""
    if states and states[-1]["to"] is None:
        if states[-1]["state"] == state:
            return
        states[-1]["to"] = max(at, states[-1]["from"])
    entry: dict[str, Any] = {"state": state, "from": max(at, start), "to": None}
    if reason:
        entry["reason"] = str(reason)
    states.append(entry)


def lane_losses(lanes: list[dict[str, Any]]) -> dict[str, int]:
    """`lost` (lost_in_failover included) and `lost_in_failover` counted over the lanes' messages."""
    fates = [m.get("fate") for lane in lanes for m in lane.get("messages") or []]
    in_failover = fates.count("lost_in_failover")
    return {"lost": fates.count("lost") + in_failover, "lost_in_failover": in_failover}


def build_entry(nodeid: str, started_at: float, record: Any, lanes: list[dict[str, Any]],
                throttled: Mapping[int, float] | None = None) -> dict[str, Any]:
    delivery = delivery_entry(record.deliveries)
    # without a delivery assertion the fault's loss figures are what the lanes saw, not a silent 0
    counted = delivery if delivery is not None else lane_losses(lanes)
    faults = [fault_entry(i, rep, counted, (throttled or {}).get(i, float(getattr(rep, "throttled", 0.0) or 0.0)))
              for i, rep in enumerate(record.faults) if rep.started_at is not None]
    return {"nodeid": nodeid, "outcome": "passed", "started_at": started_at, "ended_at": time.time(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER"), "faults": faults, "devices": lanes,
            "delivery": delivery, "slos": []}


# --- verdicts ---------------------------------------------------------------------------------

def _for_slo(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry in the shape testing.slo reads (`fault` for the kind, `throttled` for
    throttled_time, devices = the ones the fault disconnected); testing.baseline reads it too."""
    faults = []
    for f in entry["faults"]:
        figures = dict(f["figures"], throttled=f["figures"].get("throttled_time"))
        hit = [r for r in f["recovery"] if r["status"] != "never_disconnected"]
        faults.append({"fault": f["kind"], "target": f["target"], "figures": figures, "devices": hit,
                       "outage": figures["outage"], "started_at": f["started_at"], "ended_at": f["ended_at"],
                       "recovered": all(r["status"] == "recovered" for r in hit)})
    delivery = entry["delivery"]
    if delivery is not None:  # the grammar's `lost` is "never accepted"; the report's includes lost_in_failover
        delivery = dict(delivery, lost=delivery["lost"] - delivery["lost_in_failover"])
    return {"nodeid": entry["nodeid"], "outcome": entry["outcome"], "faults": faults, "delivery": delivery}


def judge(entry: dict[str, Any], objectives: Any) -> list[str]:
    """Fill entry["slos"]; the failure texts (broken and not measured)."""
    if not objectives:
        return []
    verdicts = slo_mod.evaluate_test(objectives, _for_slo(entry))
    for v in verdicts:
        o = objectives[v.figure]
        item: dict[str, Any] = {"name": v.objective, "metric": slo_mod.FIGURES[o.figure].key + (
            "_pct" if o.unit == "%" else ""), "comparison": o.op, "objective": o.threshold,
            "measured": v.measured if v.measured is not None and math.isfinite(v.measured) else None,
            "unit": o.unit, "fault": v.fault_index, "ok": v.ok is True}
        entry["slos"].append(item)
    return slo_mod.failures(verdicts)


def compare_baseline(entry: dict[str, Any], base: Mapping[str, Any] | None, source: str,
                     max_regression: float) -> tuple[list[str], list[str]]:
    """(regression texts, missing texts) of this test against the baseline report."""
    if base is None:
        return [], []
    found = baseline_mod.compare({"tests": [_for_slo(entry)]}, base, max_regression,
                                 baseline_label=os.path.basename(source))
    regressions = [f for f in found if isinstance(f, baseline_mod.Regression)]
    missing = [f for f in found if isinstance(f, baseline_mod.Missing)]
    results = [{"metric": slo_mod.FIGURES[r.figure].key, "baseline": r.baseline, "measured": r.now,
                "tolerance": r.allowed, "regressed": True} for r in regressions]
    entry["baseline"] = {"source": source, "results": results}
    return [str(r) for r in regressions], [str(m) for m in missing]


# --- the run ----------------------------------------------------------------------------------

def run_info(config: pytest.Config, settings: Any, started_at: float, workers: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version
    def dist(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    options = {"iothub_slo": str(settings.slo) if settings.slo else None,
               "iothub_max_regression": settings.max_regression,
               "iothub_baseline": settings.baseline, "iothub_outage": settings.outage,
               "iothub_keep_alive": settings.keep_alive, "iothub_hub_name": settings.hub_name}
    return {"backend": settings.backend, "hub_name": settings.hub_name if settings.backend == "fake" else None,
            "hub_tier": "fake" if settings.backend == "fake" else None,
            "plugin_version": dist("pytest-iotfailover") or "unknown", "sdk_version": dist("azure-iot-device"),
            "python_version": platform.python_version(), "pytest_version": pytest.__version__,
            "started_at": started_at, "ended_at": time.time(), "workers": workers, "options": options}


def public(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def write_json(path: str, doc: Mapping[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    from ..redaction import redact
    # ids and parameters are the user's text: a key pasted into one must not reach a CI artifact
    text = redact(json.dumps(doc, indent=1, sort_keys=True))
    json.loads(text)  # redaction keeps the document JSON; if it ever did not, fail here, not in CI
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- wiring: one per pytest run ---------------------------------------------------------------

def wanted(settings: Any) -> bool:
    return bool(settings.slo or settings.report or settings.html or settings.baseline)


def needed(item: pytest.Item, settings: Any) -> bool:
    """The test gets an entry: the run gates or reports, or its own marker sets objectives."""
    marker = item.get_closest_marker("failover")
    return wanted(settings) or (marker is not None and marker.kwargs.get("slo") is not None)


def load_baseline(settings: Any) -> dict[str, Any] | None:
    if not settings.baseline:
        return None
    try:  # the one reader of reports: a fault's kind as `kind`, or as `fault` in older ones
        return baseline_mod.load_report(settings.baseline, "--iothub-baseline")
    except baseline_mod.BaselineError as exc:
        raise pytest.UsageError(str(exc)) from None


def at_teardown(item: pytest.Item, record: Any, lanes: list[dict[str, Any]], settings: Any,
                base: Mapping[str, Any] | None, fail: bool = True) -> None:
    """Build, judge and ship the test's entry; fail the test for a broken objective or a regression."""
    from .markers import marker_objectives
    objectives = settings.slo
    own = marker_objectives(item.get_closest_marker("failover"))
    if own:
        objectives = objectives.merged(own) if objectives else own
    entry = build_entry(item.nodeid, record.started_at, record, lanes)
    broken = judge(entry, objectives)
    regressions, missing = compare_baseline(entry, base, settings.baseline or "", settings.max_regression)
    entry[_GATE] = {"slo": broken, "regressions": regressions, "missing": missing}
    item.user_properties.append((ENTRY, json.dumps(entry, sort_keys=True, allow_nan=False)))
    item.stash[ENTRY_KEY] = entry
    texts = broken + regressions
    if texts and fail:
        raise pytest.fail.Exception("\n".join(texts), pytrace=False)


ENTRY_KEY: pytest.StashKey[dict[str, Any]] = pytest.StashKey()


class Gate:
    """Collects the entries (from this process's tests or pytest-xdist workers' reports), then
    writes the report and the timeline and names the gate's failures in the terminal summary."""

    def __init__(self, config: pytest.Config, settings: Any) -> None:
        self.config, self.settings = config, settings
        self.started_at = time.time()
        self.entries: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, str] = {}
        self.workers: set[str] = set()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: Any) -> None:
        nodeid = report.nodeid
        if report.when == "setup" and report.outcome != "passed":
            self.outcomes[nodeid] = "skipped" if report.outcome == "skipped" else "error"
        elif report.when == "call":
            xfail = hasattr(report, "wasxfail")
            self.outcomes[nodeid] = ({"skipped": "xfailed", "passed": "xpassed"}.get(report.outcome, "failed")
                                     if xfail else report.outcome)
        if report.when != "teardown" or hasattr(self.config, "workerinput"):
            return  # a pytest-xdist worker sends its reports, the entry with them, to the controller
        worker = getattr(report, "node", None)
        if worker is not None:
            self.workers.add(str(getattr(worker, "gateway", worker)))
        props = list(report.user_properties)
        # the entry is for the report file; junit XML keeps the compact iothub_failover property
        report.user_properties = [(n, v) for n, v in props if n != ENTRY]
        for name, value in props:
            if name == ENTRY:
                entry = json.loads(value)
                gate_failed = bool(entry[_GATE]["slo"] or entry[_GATE]["regressions"])
                outcome = self.outcomes.get(nodeid, "passed")
                if report.outcome == "failed" and outcome == "passed":
                    outcome = "failed" if gate_failed else "error"
                entry["outcome"] = outcome
                self.entries[nodeid] = entry

    def document(self) -> dict[str, Any]:
        run = run_info(self.config, self.settings, self.started_at, len(self.workers))
        return {"schema_version": SCHEMA_VERSION, "run": run,
                "tests": [public(e) for e in self.entries.values()]}

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return  # a pytest-xdist worker: its entries went to the controller in the reports
        if not (self.settings.report or self.settings.html):
            return
        doc = self.document()
        if self.settings.report:
            write_json(self.settings.report, doc)
        if self.settings.html:
            from .timeline import render_html
            write_text(self.settings.html, render_html(doc))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = []
        for nodeid, e in self.entries.items():
            g = e[_GATE]
            lines += [f"SLO      {nodeid}: {t}" for t in g["slo"]]
            lines += [f"BASELINE {nodeid}: regression: {t}" for t in g["regressions"]]
            lines += [f"BASELINE {nodeid}: not compared: {t}" for t in g["missing"]]
        if lines:
            terminalreporter.write_sep("=", "iothub gate: SLO and baseline (apart from test failures)")
            for line in lines:
                terminalreporter.write_line(line)
        for path in (self.settings.report, self.settings.html):
            if path and not hasattr(self.config, "workerinput"):
                terminalreporter.write_line(f"iothub: wrote {path}")


def html_extra(item: pytest.Item, report: Any) -> None:
    """pytest-html: the test's timeline fragment in its row (teardown, when the figures are final)."""
    entry = item.stash.get(ENTRY_KEY, None)
    if entry is None or not entry["faults"] or not item.config.pluginmanager.has_plugin("html"):
        return
    try:
        from pytest_html import extras  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return
    from .timeline import render_fragment
    current = list(getattr(report, "extras", []) or [])
    current.append(extras.html(render_fragment(public(entry))))
    report.extras = current
