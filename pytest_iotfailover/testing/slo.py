"""Recovery objectives: a small grammar over the figures a test already produces, and their verdicts.

An objective text is a list of terms separated by commas or new lines::

    recover<=30s, lost==0, duplicates<=1%

Each term is ``<figure> <op> <value>``: ``op`` is one of ``<= < == >= >``; a time takes ``s`` or
``ms``; a message count takes a whole number or a percentage of the messages sent. `FIGURES` is the
one table mapping grammar names onto the report's keys.

Several faults in one test: the per-fault figures (detect, recover, downtime, throttled) are judged
once per fault, each verdict naming its fault; the delivery figures (lost, duplicates, latency) belong
to the test and are judged once, naming every fault the test started. A per-fault objective in a test
that started no fault, or a delivery objective in a test without a delivery assertion, is "not
measured" (``ok is None``), never a pass.

Standard library only: the pytest plugin parses the options and markers with this module and turns
broken or unmeasured verdicts into test failures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FIGURES", "OPERATORS", "Figure", "Objective", "Objectives", "SloSyntaxError", "Verdict",
           "evaluate", "evaluate_test", "failures", "parse_objectives"]

Scope = Literal["fault", "delivery"]
Kind = Literal["time", "count"]


@dataclass(frozen=True)
class Figure:
    name: str          # as written in an objective
    key: str           # its key in the report: faults[].figures[key] or delivery[key]
    scope: Scope
    kind: Kind
    meaning: str


FIGURES: dict[str, Figure] = {f.name: f for f in (
    Figure("detect", "time_to_detect", "fault", "time",
           "fault start to the last affected device noticing"),
    Figure("recover", "time_to_recover", "fault", "time",
           "fault end to the last affected device back"),
    Figure("downtime_max", "downtime_max", "fault", "time",
           "longest time one device was disconnected"),
    Figure("downtime_p99", "downtime_p99", "fault", "time",
           "99th percentile of the devices' downtimes"),
    Figure("throttled", "throttled", "fault", "time",
           "time the hub throttled traffic during the fault"),
    Figure("lost", "lost", "delivery", "count",
           "sent messages the hub never accepted"),
    Figure("lost_in_failover", "lost_in_failover", "delivery", "count",
           "messages accepted by the hub and gone after a failover (hub-side RPO)"),
    Figure("duplicates", "duplicates", "delivery", "count",
           "extra copies of sent messages the hub accepted"),
    Figure("latency_p99", "latency_p99", "delivery", "time",
           "99th percentile of submit-to-accept latency"),
)}

_COMPARE = {
    "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, "==": lambda a, b: a == b,
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
}
OPERATORS = tuple(_COMPARE)
# the comparison that holds when an objective is broken, for the failure text
_BROKEN = {"<=": ">", "<": ">=", "==": "!=", ">=": "<", ">": "<="}

# longest operators first so "<=" is not read as "<" followed by "=..."
# compiled on first use (and cached by re): importing the module, as every run of the plugin may, need not pay
_TERM = r"(?P<name>[A-Za-z_][A-Za-z0-9_%]*)\s*(?P<op><=|>=|==|!=|=<|=>|<|>|=)?\s*(?P<value>.*)"
_VALUE = r"(?P<sign>[-+]?)(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z%]*)"


class SloSyntaxError(ValueError):
    """A malformed objective: names where it came from (option, ini key, environment variable or
    marker) and the bad term."""

    def __init__(self, source: str, term: str, problem: str) -> None:
        self.source, self.term, self.problem = source, term, problem
        super().__init__(f"{source}: bad objective {term!r}: {problem}; known figures: "
                         f"{', '.join(FIGURES)}; operators: {' '.join(OPERATORS)}")


@dataclass(frozen=True)
class Objective:
    figure: str            # a FIGURES name
    op: str                # one of OPERATORS
    threshold: float       # seconds for a time, messages for a count, percent for a percentage
    unit: str              # "s", "ms", "%" or "" (a count), as written
    shown: str             # the threshold as written, with its unit: "30s", "500ms", "1%", "0"
    source: str

    @property
    def key(self) -> str:
        """What a marker overrides: a count and a percentage of the same figure are separate keys
        (``duplicates`` and ``duplicates%``), so a test can hold both a ceiling and a rate."""
        return self.figure + ("%" if self.unit == "%" else "")

    @property
    def text(self) -> str:
        return f"{self.figure}{self.op}{self.shown}"

    def holds(self, value: float) -> bool:
        return bool(_COMPARE[self.op](value, self.threshold))

    def __str__(self) -> str:
        return self.text


class Objectives(Mapping[str, Objective]):
    """Parsed objectives by key, in the order written. Immutable; `merged` makes a new one."""

    def __init__(self, objectives: Iterable[Objective] = ()) -> None:
        self._by_key: dict[str, Objective] = {}
        for o in objectives:
            self._by_key[o.key] = o

    def __getitem__(self, key: str) -> Objective:
        return self._by_key[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"Objectives({str(self)!r})"

    def __str__(self) -> str:
        return ", ".join(o.text for o in self._by_key.values())

    def merged(self, override: Objectives) -> Objectives:
        """These objectives with `override`'s replacing any of the same key (a marker over the
        session's): keys keep their place, new keys follow."""
        merged = dict(self._by_key)
        merged.update(override._by_key)
        return Objectives(merged.values())


def parse_objectives(text: str, source: str = "--iothub-slo") -> Objectives:
    """Parse an objective text. Empty text (or only separators) gives no objectives.

    Raises `SloSyntaxError` for an unknown figure, a missing or unknown operator, a value that is
    not a non-negative number, a unit the figure does not take, or a key written twice."""
    if not isinstance(text, str):
        raise SloSyntaxError(source, repr(text), "objectives are a text such as 'recover<=30s, lost==0'")
    seen: dict[str, Objective] = {}
    for raw in re.split(r"[,\n]", text):
        term = raw.strip()
        if not term:
            continue  # trailing commas and blank lines of a multi-line ini value
        o = _parse_term(term, source)
        if o.key in seen:
            raise SloSyntaxError(source, term, f"{o.key} is already given as {seen[o.key].text!r}")
        seen[o.key] = o
    return Objectives(seen.values())


def _parse_term(term: str, source: str) -> Objective:
    m = re.fullmatch(_TERM, term, re.DOTALL)
    if m is None:
        raise SloSyntaxError(source, term, "a term is <figure><op><value>, e.g. recover<=30s")
    name, op, value = m["name"], m["op"], m["value"].strip()
    if name.endswith("%"):
        raise SloSyntaxError(source, term, f"put the % on the value: {name.rstrip('%')}<=1%")
    fig = FIGURES.get(name)
    if fig is None:
        import difflib  # a misspelt figure only
        close = difflib.get_close_matches(name.lower(), FIGURES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SloSyntaxError(source, term, f"unknown figure {name!r}{hint}")
    if op is None:
        raise SloSyntaxError(source, term, f"no comparison after {name!r}")
    if op not in _COMPARE:
        meant = {"=": "==", "=<": "<=", "=>": ">="}.get(op)
        raise SloSyntaxError(source, term, f"{op!r} is not a comparison"
                             + (f" (did you mean {meant!r}?)" if meant else ""))
    v = re.fullmatch(_VALUE, value)
    if v is None:
        if not value:
            raise SloSyntaxError(source, term, f"no value after {op!r}")
        hint = " (a comma missing between two terms?)" if re.search(r"[<>=]", value) else ""
        raise SloSyntaxError(source, term, f"{value!r} is not a number with an optional unit{hint}")
    if v["sign"] == "-":
        raise SloSyntaxError(source, term, "a figure is never negative: give a value of 0 or more")
    number, unit = float(v["number"]), v["unit"]
    if fig.kind == "time":
        if unit == "s":
            threshold = number
        elif unit == "ms":
            threshold = number / 1000
        elif unit == "":
            raise SloSyntaxError(source, term, f"{name} is a time: give a unit, s or ms (e.g. {name}{op}{value}s)")
        else:
            raise SloSyntaxError(source, term, f"{name} is a time: unit {unit!r} is not s or ms")
    else:
        if unit == "%":
            threshold = number
        elif unit == "":
            if not number.is_integer():
                raise SloSyntaxError(source, term, f"{name} is a count of messages: give a whole number "
                                     f"or a percentage of those sent (e.g. {name}{op}{value}%)")
            threshold = number
        else:
            raise SloSyntaxError(source, term, f"{name} is a count of messages: unit {unit!r} is not "
                                 "allowed; give a whole number or a percentage of those sent")
    return Objective(name, op, threshold, unit, v["number"] + unit, source)


@dataclass(frozen=True)
class Verdict:
    objective: str          # "recover<=30s"
    figure: str             # its key: "recover", "duplicates%"
    measured: float | None  # seconds, messages or percent; math.inf for "never" (a device did not come back)
    ok: bool | None         # None: not measured, `message` says why
    message: str
    fault: str | None = None        # the fault kind, for a per-fault verdict
    fault_index: int | None = None  # its 0-based place among the test's faults
    source: str = ""

    def __str__(self) -> str:
        return self.message


def evaluate(objectives: Objectives, figures: Mapping[str, Any], context: Mapping[str, Any],
             *, missing: Mapping[str, str] | None = None) -> list[Verdict]:
    """Judge each objective on one flat dict of figures.

    `figures` holds grammar names (`FIGURES`), plus ``duplicates%``, ``lost%`` and
    ``lost_in_failover%`` as percentages of the messages sent; a value of None or an absent key is
    "not measured", with the reason from `missing` (by key) or a generic one. ``math.inf`` stands
    for "never" (a device that did not come back): it breaks every ``<``/``<=``/``==`` objective.

    `context` names what the figures are about: ``fault`` (kind), ``target``, ``index`` (shown as
    ``#n``), ``outage`` (s), ``devices`` (count), ``last_back`` (device id), ``not_back`` (count);
    or ``faults``, a list of such contexts (delivery figures of a test with several faults); and
    ``sent``, shown next to a percentage."""
    out = []
    where = _context_text(context)
    for o in objectives.values():
        value = figures.get(o.key)
        if value is None:
            why = (missing or {}).get(o.key) or f"no {o.key} figure was measured"
            out.append(Verdict(o.text, o.key, None, None, f"SLO not measured: {o.text}: {why}"
                               + (f" ({where})" if where else ""), source=o.source))
            continue
        v = float(value)
        if o.unit == "ms":
            v_shown = v * 1000
            threshold = o.threshold * 1000
        else:
            v_shown, threshold = v, o.threshold
        ok = o.holds(v)
        shown = _show(v_shown, threshold, o.op, ok, o.unit)
        detail = where
        if o.unit == "%" and context.get("sent") is not None:
            count = figures.get(o.figure)
            lead = (f"{_count(count)} of {_count(context['sent'])} sent" if count is not None
                    else f"{_count(context['sent'])} sent")
            detail = lead + ("; " + where if where else "")
        rel = o.op if ok else _BROKEN[o.op]
        head = "SLO met" if ok else "SLO broken"
        out.append(Verdict(o.text, o.key, v, ok, f"{head}: {o.figure} {shown} {rel} {o.shown}"
                           + (f" ({detail})" if detail else ""), source=o.source))
    return out


def _count(n: Any) -> str:
    return str(int(n)) if isinstance(n, int | float) and float(n).is_integer() else str(n)


def _show(value: float, threshold: float, op: str, ok: bool, unit: str) -> str:
    """The measured value to 10 ms (1 ms for an objective in ms, 0.01 for a percentage), trailing
    zeros dropped, with more decimals when fewer would contradict the verdict (30.004s > 30s, not
    30.0s > 30s)."""
    if math.isinf(value):
        return "never"
    if unit == "" and value.is_integer():
        return str(int(value))
    least = 0 if unit == "ms" else 1
    for decimals in range(0 if unit == "ms" else 2, 7):
        text = f"{value:.{decimals}f}"
        if decimals > least:
            text = text.rstrip("0")
            if text.endswith("."):
                text += "0" * least
            text = text.rstrip(".")
        if bool(_COMPARE[op](float(text), threshold)) == ok:
            return text + unit
    return repr(value) + unit


def _one_fault_text(c: Mapping[str, Any]) -> str:
    name = str(c.get("fault") or "fault")
    if c.get("target"):
        name += "@" + str(c["target"])
    if c.get("index") is not None:
        name += f" #{c['index']}"
    if c.get("outage") is not None:
        name += f" outage {float(c['outage']):.2f}s"
    parts = [name]
    if c.get("devices") is not None:
        n = int(c["devices"])
        parts.append(f"{n} device" + ("" if n == 1 else "s"))
    if c.get("not_back"):
        parts.append(f"{int(c['not_back'])} not back")
    elif c.get("last_back"):
        parts.append(f"device {c['last_back']} last back")
    return ", ".join(parts)


def _context_text(context: Mapping[str, Any]) -> str:
    if "faults" in context:
        return "; ".join(_one_fault_text(c) for c in context["faults"]) or "no fault"
    if context.get("fault"):
        return _one_fault_text(context)
    return ""


def failures(verdicts: Iterable[Verdict]) -> list[str]:
    """The texts a test fails with: every broken and every unmeasured objective."""
    return [v.message for v in verdicts if v.ok is not True]


# --- over a report entry: tests[] of the JSON report ------------------------------------------------

_TIME_KEYS = ("recover", "downtime_max", "downtime_p99")  # "never" when a device did not come back


def fault_figures(fault: Mapping[str, Any]) -> dict[str, float | None]:
    """A report fault entry's figures under grammar names. A fault whose devices did not all come
    back (``recovered`` false) has ``recover`` and downtimes of ``math.inf`` when the report gives
    none, so an objective on them breaks instead of going unmeasured."""
    raw = fault.get("figures") or {}
    out: dict[str, float | None] = {}
    for f in FIGURES.values():
        if f.scope == "fault":
            out[f.name] = _number(raw.get(f.key), f.key)
    if fault.get("recovered") is False or _not_back(fault):
        for k in _TIME_KEYS:
            if out[k] is None:
                out[k] = math.inf
    return out


def delivery_figures(delivery: Mapping[str, Any]) -> dict[str, float | None]:
    """A report delivery entry's figures under grammar names, with the counts also as a percentage
    of ``sent`` (not measured when nothing was sent)."""
    out: dict[str, float | None] = {}
    for f in FIGURES.values():
        if f.scope == "delivery":
            out[f.name] = _number(delivery.get(f.key), f.key)
    sent = _number(delivery.get("sent"), "sent")
    for f in FIGURES.values():
        if f.kind == "count":
            count = out[f.name]
            out[f.name + "%"] = None if count is None or not sent else 100.0 * count / sent
    return out


def fault_context(fault: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    """What a failure text says about a fault, from a report fault entry. Reads ``fault``,
    ``target``, ``outage`` (or ``started_at``/``ended_at``), ``devices`` (a count, or per-device
    entries with ``reconnected_at``), ``last_back``, ``not_back``; each is optional."""
    raw = fault.get("figures") or {}
    outage = fault.get("outage", raw.get("outage"))
    if outage is None and fault.get("started_at") is not None and fault.get("ended_at") is not None:
        outage = float(fault["ended_at"]) - float(fault["started_at"])
    devices = fault.get("devices")
    per_device = _per_device(devices)
    last_back = fault.get("last_back", raw.get("last_back"))
    if last_back is None and per_device:
        back = [(t, d) for d, t in per_device.items() if t is not None]
        if back:
            last_back = max(back)[1]
    return {"fault": fault.get("fault"), "target": fault.get("target"), "index": index, "outage": outage,
            "devices": len(per_device) if per_device is not None else devices, "last_back": last_back,
            "not_back": _not_back(fault)}


def _per_device(devices: Any) -> dict[str, float | None] | None:
    if isinstance(devices, Mapping):
        return {str(k): (v.get("reconnected_at") if isinstance(v, Mapping) else None)
                for k, v in devices.items()}
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return {str(d.get("device_id")): d.get("reconnected_at") for d in devices if isinstance(d, Mapping)}
    return None


def _not_back(fault: Mapping[str, Any]) -> int:
    if fault.get("not_back") is not None:
        return int(fault["not_back"])
    per_device = _per_device(fault.get("devices"))
    if per_device is None:
        return 0
    return sum(1 for t in per_device.values() if t is None)


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"report figure {key} is {value!r}, not a number")
    return float(value)


def evaluate_test(objectives: Objectives, test: Mapping[str, Any]) -> list[Verdict]:
    """Judge a test's report entry (``{nodeid, faults: [{fault, figures, ...}], delivery}``): the
    per-fault objectives once per fault that started, the delivery objectives once for the test."""
    per_fault = Objectives(o for o in objectives.values() if FIGURES[o.figure].scope == "fault")
    per_test = Objectives(o for o in objectives.values() if FIGURES[o.figure].scope == "delivery")
    faults = [f for f in (test.get("faults") or []) if isinstance(f, Mapping)]
    several = len(faults) > 1
    contexts = [fault_context(f, i + 1 if several else None) for i, f in enumerate(faults)]
    out: list[Verdict] = []
    if per_fault and not faults:
        out += evaluate(per_fault, {}, {}, missing={k: "the test started no fault" for k in per_fault})
    for i, (f, ctx) in enumerate(zip(faults, contexts)):
        kind = str(f.get("fault") or "fault")
        why = {k: f"{kind} gave no {FIGURES[k].key} figure" for k in per_fault}
        for v in evaluate(per_fault, fault_figures(f), ctx, missing=why):
            out.append(_with_fault(v, kind, i))
    if per_test:
        delivery = test.get("delivery")
        ctx_all: dict[str, Any] = {"faults": contexts} if contexts else {}
        if not isinstance(delivery, Mapping):
            out += evaluate(per_test, {}, ctx_all,
                            missing={k: "the test made no delivery assertion" for k in per_test})
        else:
            figs = delivery_figures(delivery)
            ctx_all["sent"] = delivery.get("sent")
            why = {k: "nothing was sent" if k.endswith("%") and figs.get(k.rstrip("%")) is not None
                   else f"the delivery assertion gave no {FIGURES[k.rstrip('%')].key} figure" for k in per_test}
            out += evaluate(per_test, figs, ctx_all, missing=why)
    return out


def _with_fault(v: Verdict, kind: str, index: int) -> Verdict:
    return Verdict(v.objective, v.figure, v.measured, v.ok, v.message, kind, index, v.source)
