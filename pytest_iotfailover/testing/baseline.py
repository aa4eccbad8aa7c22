"""This run against an earlier report: which tests got slower to recover than allowed.

Tests are matched by nodeid, faults within a test by kind and occurrence (the second
``region_failover`` of a test against the second of its baseline), so adding a fault of another kind
to a test does not shift the pairs. Two figures are compared per fault: time to recover and downtime
p99 (`COMPARED`). A figure worse than the baseline by more than the allowed fraction is a
`Regression` (the test fails); whatever cannot be compared is `Missing` (reported, the test does not
fail for it): a test or fault the baseline lacks, a baseline fault this run lacks, a figure the baseline
lacks, a baseline test that did not pass. A figure the baseline has and this run lacks is a regression:
it means the devices did not come back.

A choice, not a fact: differences below `FLOOR` (0.1 s) never count. Recovery times on a loaded
machine wander by that much, and it makes a zero baseline comparable without dividing by zero.

Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .slo import FIGURES

__all__ = ["COMPARED", "DEFAULT_MAX_REGRESSION", "FLOOR", "BaselineError", "Missing", "Regression",
           "compare", "fault_kind", "load_report", "parse_regression", "run_label"]

# grammar names (slo.FIGURES) of the figures compared; their report keys come from that table
COMPARED = ("recover", "downtime_p99")
FLOOR = 0.1  # s; see the module docstring
DEFAULT_MAX_REGRESSION = 0.2
_EPS = 1e-9  # so 1.30 - 1.20 is not 0.1000000001 worse than allowed


class BaselineError(ValueError):
    """A bad --iothub-max-regression value or an unreadable report; names the option or file."""


_PERCENT = r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*%\s*"  # compiled (and cached) by re on first use


def parse_regression(text: str, source: str = "--iothub-max-regression") -> float:
    """``"20%"`` -> 0.2: how much worse than its baseline a figure may get. Only a percentage is
    accepted, so 0.2 and 20 cannot be confused."""
    m = re.fullmatch(_PERCENT, text) if isinstance(text, str) else None
    if m is None:
        raise BaselineError(f"{source}: bad value {text!r}: give a percentage of 0 or more, e.g. 20%")
    return float(m["number"]) / 100


def load_report(path: str | os.PathLike[str], source: str = "--iothub-baseline") -> dict[str, Any]:
    """Read and check a JSON report; a missing file or bad content is a `BaselineError` naming both."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise BaselineError(f"{source}: cannot read {os.fspath(path)}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"{source}: {os.fspath(path)} is not a JSON report: {e}") from None
    _check(doc, f"{source}: {os.fspath(path)}")
    return dict(doc)


def _check(doc: Any, where: str) -> None:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("tests"), list):
        raise BaselineError(f"{where}: not a report: expected an object with a 'tests' list")
    for i, t in enumerate(doc["tests"]):
        if not isinstance(t, Mapping) or not isinstance(t.get("nodeid"), str):
            raise BaselineError(f"{where}: tests[{i}] has no nodeid")
        faults = t.get("faults", [])
        if faults is not None and not isinstance(faults, list):
            raise BaselineError(f"{where}: tests[{i}] ({t['nodeid']}): 'faults' is not a list")
        for j, f in enumerate(faults or []):
            if not isinstance(f, Mapping) or not isinstance(fault_kind(f), str):
                raise BaselineError(f"{where}: tests[{i}] ({t['nodeid']}): faults[{j}] has no fault kind")
            figures = f.get("figures")
            if figures is None:
                continue
            if not isinstance(figures, Mapping):
                raise BaselineError(f"{where}: tests[{i}] ({t['nodeid']}): faults[{j}].figures is not an object")
            for name in COMPARED:
                v = figures.get(FIGURES[name].key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                      or not math.isfinite(v) or v < 0):
                    raise BaselineError(f"{where}: tests[{i}] ({t['nodeid']}): faults[{j}] "
                                        f"{FIGURES[name].key} is {v!r}, not a time in seconds")


def fault_kind(fault: Mapping[str, Any]) -> Any:
    """A fault's kind: `kind` in report_schema.json; `fault` in the shape testing.slo reads and in
    reports written before the schema settled on `kind` (both accepted, `kind` first)."""
    kind = fault.get("kind")
    return kind if isinstance(kind, str) else fault.get("fault")


def run_label(report: Mapping[str, Any]) -> str | None:
    """The date a report was made, from its ``created`` field (ISO 8601 text or epoch seconds), else
    from ``run.started_at`` (report_schema.json)."""
    created = report.get("created")
    run = report.get("run")
    if created is None and isinstance(run, Mapping):
        created = run.get("started_at")
    if isinstance(created, str) and created:
        try:
            return _dt.datetime.fromisoformat(created).date().isoformat()
        except ValueError:
            return created
    if isinstance(created, int | float) and not isinstance(created, bool):
        return _dt.datetime.fromtimestamp(created, _dt.UTC).date().isoformat()
    return None


@dataclass(frozen=True)
class Regression:
    nodeid: str
    fault: str
    occurrence: int         # 1-based among the test's faults of this kind
    figure: str             # grammar name: "recover", "downtime_p99"
    baseline: float
    now: float | None       # None: this run has no such figure
    allowed: float          # fraction
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Missing:
    nodeid: str
    fault: str | None
    occurrence: int | None
    figure: str | None
    message: str

    def __str__(self) -> str:
        return self.message


def _faults_by_occurrence(test: Mapping[str, Any]) -> dict[tuple[str, int], Mapping[str, Any]]:
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    seen: dict[str, int] = {}
    for f in test.get("faults") or []:
        kind = str(fault_kind(f))
        seen[kind] = seen.get(kind, 0) + 1
        out[(kind, seen[kind])] = f
    return out


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.{_decimals(fraction * 100)}f}%"


def _decimals(x: float) -> int:
    for d in range(4):
        if abs(round(x, d) - x) < 1e-9:
            return d
    return 3


def _worse_text(ratio: float, allowed: float) -> str:
    # as few decimals as keep the shown figure above the allowed one (20.4% worse, not 20%)
    for d in range(4):
        if round(ratio * 100, d) > allowed * 100:
            return f"{ratio * 100:.{d}f}%"
    return f"{ratio * 100:.4f}%"


def compare(current_report: Mapping[str, Any], baseline_report: Mapping[str, Any], max_regression: float,
            *, floor: float = FLOOR, baseline_label: str | None = None) -> list[Regression | Missing]:
    """Compare each test of `current_report` with the same nodeid in `baseline_report`.

    `max_regression` is a fraction (`parse_regression`). Returns the regressions and what could not
    be compared, in the current report's order; improvements and figures within bounds give nothing.
    The run is named by `baseline_label`, else the baseline's ``created`` date. A nodeid appearing
    twice in a report counts by its last entry (a rerun)."""
    if not (isinstance(max_regression, int | float) and math.isfinite(max_regression) and max_regression >= 0):
        raise BaselineError(f"max_regression must be a fraction of 0 or more, got {max_regression!r}")
    _check(current_report, "current report")
    _check(baseline_report, "baseline report")
    label = baseline_label or run_label(baseline_report)
    run = f" (run {label})" if label else ""
    base_tests = {t["nodeid"]: t for t in baseline_report["tests"]}
    out: list[Regression | Missing] = []
    for test in current_report["tests"]:
        out.extend(_compare_test(test, base_tests.get(test["nodeid"]), max_regression, floor, run))
    return out


def _compare_test(test: Mapping[str, Any], base: Mapping[str, Any] | None, max_regression: float,
                  floor: float, run: str) -> list[Regression | Missing]:
    nodeid = test["nodeid"]
    now_faults = _faults_by_occurrence(test)
    if base is None:
        return [Missing(nodeid, None, None, None, f"{nodeid}: not in the baseline{run}: not compared")] \
            if now_faults else []
    base_faults = _faults_by_occurrence(base)
    if base.get("outcome", "passed") != "passed" and (base_faults or now_faults):
        return [Missing(nodeid, None, None, None, f"{nodeid}: {base['outcome']} in the baseline{run}: not compared")]
    out: list[Regression | Missing] = []
    for (kind, n), fault in now_faults.items():
        bf = base_faults.get((kind, n))
        if bf is None:
            out.append(Missing(nodeid, kind, n, None, f"{nodeid}: {kind} #{n} is not in the baseline{run}"))
            continue
        for figure in COMPARED:
            found = _compare_figure(nodeid, kind, n, figure, bf, fault, max_regression, floor, run)
            if found is not None:
                out.append(found)
    for (kind, n) in base_faults:
        if (kind, n) not in now_faults:
            out.append(Missing(nodeid, kind, n, None, f"{nodeid}: the baseline{run} has {kind} #{n}; this run does not"))
    return out


def _compare_figure(nodeid: str, kind: str, n: int, figure: str, base_fault: Mapping[str, Any],
                    fault: Mapping[str, Any], max_regression: float, floor: float,
                    run: str) -> Regression | Missing | None:
    name = f"{kind} #{n}"
    key = FIGURES[figure].key
    b = (base_fault.get("figures") or {}).get(key)
    v = (fault.get("figures") or {}).get(key)
    if b is None:
        if v is None:
            return None
        return Missing(nodeid, kind, n, figure, f"{nodeid}: {name}: the baseline{run} has no {figure} figure")
    b = float(b)
    head = f"baseline: {figure} {b:.2f}s{run}, "
    if v is None:
        return Regression(nodeid, kind, n, figure, b, None, max_regression,
                          head + f"now no figure: a device did not come back or the fault did not end ({name})")
    v = float(v)
    if v - b <= floor + _EPS:
        return None
    if b == 0:
        return Regression(nodeid, kind, n, figure, b, v, max_regression,
                          head + f"now {v:.2f}s: {v - b:.2f}s worse than a zero baseline, "
                          f"allowed {_pct(max_regression)} ({name})")
    ratio = (v - b) / b
    if ratio > max_regression + _EPS:
        return Regression(nodeid, kind, n, figure, b, v, max_regression,
                          head + f"now {v:.2f}s: {_worse_text(ratio, max_regression)} worse, "
                          f"allowed {_pct(max_regression)} ({name})")
    return None
