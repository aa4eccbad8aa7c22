"""Delivery assertions: wait for the hub to have accepted what was sent, then say exactly what is
missing, doubled or out of order, with latencies and the fault window.

Under the plugin, `iothub` carries the test's recorder: the figures go to the run summary and the
failure text names the faults the test started. A bare FakeHub has none; the checks are the same.
Each assertion hides its own frame (`__tracebackhide__`), so a failure points at the test's line.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_SHOW = 10  # ids listed in a failure before "... and N more"


@dataclass
class DeliveryFigures:
    sent: int
    delivered: int          # distinct sent ids the hub accepted
    duplicates: int         # extra copies of sent ids
    lost: int               # sent ids never accepted (and no longer pending in an Outbox)
    pending: int = 0        # sent ids an Outbox still holds, not yet acknowledged
    lost_in_failover: int = 0  # sent ids the hub accepted, then lost unread in a failover
    latency_p50: float | None = None
    latency_p99: float | None = None
    latency_max: float | None = None


def _recorder(iothub: Any) -> Any:
    """The test's recorder (see testing/view.py), None outside the plugin or for a bare FakeHub."""
    return getattr(iothub, "recorder", None)


def _sent_ids(sent, call: str = "assert_all_delivered") -> list[str]:
    __tracebackhide__ = True
    ids = getattr(sent, "message_ids", None)
    if ids is not None:
        return list(ids)
    usage = (f"{call}(iothub, sent): sent must be an Outbox or a list of message ids (or of messages "
             "carrying a message_id)")
    if isinstance(sent, (str, bytes)):
        raise TypeError(f"{usage}, not a single string")
    try:
        items = list(sent)
    except TypeError:
        raise TypeError(f"{usage}; got {type(sent).__name__}") from None
    out = []
    for item in items:
        mid = item if isinstance(item, str) else getattr(item, "message_id", None)
        if mid is None:
            raise TypeError(f"{usage}; cannot tell the message id of {item!r}")
        out.append(mid)
    return out


def _waiter(iothub: Any) -> Any:
    """How to wait on `iothub`: the fixture's view has wait_until; a bare FakeHub waits on its ledger."""
    wait = getattr(iothub, "wait_until", None)
    return wait if callable(wait) else getattr(getattr(iothub, "ledger", None), "wait_until", None)


def _check_hub(iothub, call: str) -> None:
    __tracebackhide__ = True
    if not (callable(getattr(iothub, "telemetry", None)) and callable(_waiter(iothub))):
        raise TypeError(f"{call}(iothub, sent): iothub must be the iothub fixture or a FakeHub, "
                        f"got {type(iothub).__name__}")


def _submitted_at(sent):
    return getattr(sent, "submitted_at", None) or {}


def _telemetry(iothub, device_id):
    return iothub.telemetry(device_id) if device_id is not None else iothub.telemetry()


def lost_in_failover_ids(iothub: Any, device_id: str | None = None) -> set[str]:
    """Message ids the hub accepted and a failover then lost from the built-in endpoint (the
    ledger's `lost_in_failover` marks); empty for a hub whose view cannot tell them apart."""
    try:
        items = iothub.telemetry(device_id, include_lost=True)
    except TypeError:
        return set()  # no include_lost: a view that cannot see what was lost
    return {t.message_id for t in items if t.lost_in_failover}


def _listing(ids: Sequence[str]) -> str:
    shown = ", ".join(map(str, ids[:_SHOW]))
    return shown + (f" ... and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _fault_text(iothub: Any) -> list[str]:
    rec = _recorder(iothub)
    if rec is None:
        return []
    lines = []
    for fault, start, end in rec.fault_windows():
        span = f"{time.strftime('%H:%M:%S', time.localtime(start))}.{int(start * 1000) % 1000:03d}"
        lines.append(f"  fault: {fault} from {span} for "
                     + (f"{end - start:.2f} s" if end else "(still active)"))
    return lines


class DeliveryReport:
    def __init__(self, sent_ids, telemetry, submitted_at, sent=None, lost_in_failover=frozenset()):
        self.sent_ids = sent_ids
        wanted = set(sent_ids)
        self.copies = Counter(t.message_id for t in telemetry if t.message_id in wanted)
        self.missing = [m for m in dict.fromkeys(sent_ids) if m not in self.copies]
        # an Outbox still holding a message has not given up on it: that is not a loss (yet)
        pending = set(getattr(sent, "pending_ids", None) or ())
        self.pending = [m for m in self.missing if m in pending]
        self.lost_in_failover = [m for m in self.missing if m in lost_in_failover and m not in pending]
        self.lost = [m for m in self.missing if m not in pending and m not in lost_in_failover]
        failures = getattr(sent, "failures", None) or []
        self.last_failure = failures[-1] if failures else None
        self.duplicated = {m: n for m, n in self.copies.items() if n > 1}
        first = {}
        for t in telemetry:
            if t.message_id in wanted and t.message_id not in first:
                first[t.message_id] = t.enqueued_at
        lat = sorted(first[m] - submitted_at[m] for m in first if m in submitted_at)
        self.figures = DeliveryFigures(
            sent=len(wanted), delivered=len(self.copies),
            duplicates=sum(n - 1 for n in self.copies.values()), lost=len(self.lost), pending=len(self.pending),
            lost_in_failover=len(self.lost_in_failover),
            latency_p50=_percentile(lat, 0.5), latency_p99=_percentile(lat, 0.99),
            latency_max=lat[-1] if lat else None)

    def describe(self, iothub: Any = None) -> list[str]:
        f = self.figures
        lines = [f"  sent: {f.sent}, delivered: {f.delivered}, "
                 + (f"still pending in the Outbox: {f.pending}, " if f.pending else "")
                 + f"lost: {f.lost}, duplicate copies: {f.duplicates}"]
        if self.pending:
            lines.append(f"  pending, not yet acknowledged by the hub ({len(self.pending)}): "
                         f"{_listing(self.pending)}")
        if self.lost_in_failover:
            lines.append(f"  {len(self.lost_in_failover)} of {f.sent} were acknowledged by the hub and then lost "
                         "in the failover (IoT Hub loses unread device-to-cloud messages): "
                         f"{_listing(self.lost_in_failover)}")
        if self.lost:
            lines.append(f"  missing ({len(self.lost)}): {_listing(self.lost)}")
            if self.lost_in_failover:
                lines.append(f"  {len(self.lost)} were never acknowledged")
        if self.last_failure is not None:
            mid, error, at = self.last_failure
            lines.append(f"  last send failure, {time.time() - at:.1f} s ago, for {mid}: {error}")
        if self.duplicated:
            items = [f"{m} x{n}" for m, n in sorted(self.duplicated.items(), key=lambda kv: -kv[1])]
            lines.append(f"  duplicated ({len(items)}): {_listing(items)}")
        if f.latency_p50 is not None:
            lines.append(f"  latency: p50 {f.latency_p50 * 1000:.0f} ms, p99 {f.latency_p99 * 1000:.0f} ms, "
                         f"max {f.latency_max * 1000:.0f} ms")
        return lines + _fault_text(iothub)


def _record(iothub: Any, report: DeliveryReport) -> None:
    rec = _recorder(iothub)
    if rec is not None:
        rec.add_delivery(report.figures)


def assert_all_delivered(iothub, sent, timeout: float = 10.0, device_id: str | None = None) -> DeliveryReport:
    """Wait up to `timeout` s until the hub accepted every message id in `sent` (an Outbox or a list
    of ids); fail with what is missing otherwise. Returns the DeliveryReport."""
    __tracebackhide__ = True
    _check_hub(iothub, "assert_all_delivered")
    ids = _sent_ids(sent)
    wanted = set(ids)
    outbox = sent if getattr(sent, "message_ids", None) is not None and hasattr(sent, "pending") else None
    settled = False

    def all_there():
        nonlocal settled
        have = {t.message_id for t in _telemetry(iothub, device_id)}
        if wanted <= have:
            return True
        # an Outbox with nothing left to send (its replays included) sends none of these again:
        # what the failover lost or the Outbox dropped cannot arrive any more, so waiting out the
        # timeout tells nothing
        if outbox is not None and outbox.pending == 0:
            gone = lost_in_failover_ids(iothub, device_id) | set(getattr(outbox, "dropped_ids", ()))
            settled = (wanted - have) <= gone
        return settled
    _waiter(iothub)(all_there, timeout)
    report = DeliveryReport(ids, _telemetry(iothub, device_id), _submitted_at(sent), sent,
                            lost_in_failover_ids(iothub, device_id))
    _record(iothub, report)
    if report.missing:
        why = (f" ({len(report.pending)} still pending in the Outbox, {len(report.lost)} lost)"
               if report.pending else "")
        head = (f"{len(report.missing)} of {len(wanted)} sent messages can never be delivered: the Outbox "
                "has nothing left to send (what is missing was dropped by it or lost in the failover)" if settled else
                f"{len(report.missing)} of {len(wanted)} sent messages were not delivered within {timeout:g} s{why}")
        raise AssertionError("\n".join([head] + report.describe(iothub)))
    return report


def assert_no_duplicates(iothub, sent=None, device_id: str | None = None) -> DeliveryReport:
    """No message id (of `sent`, or of everything this test's devices sent) was accepted twice."""
    __tracebackhide__ = True
    _check_hub(iothub, "assert_no_duplicates")
    telemetry = _telemetry(iothub, device_id)
    ids = _sent_ids(sent, "assert_no_duplicates") if sent is not None else [t.message_id for t in telemetry if t.message_id]
    report = DeliveryReport(ids, telemetry, _submitted_at(sent) if sent is not None else {})
    if report.duplicated:
        head = (f"{len(report.duplicated)} messages were delivered more than once "
                "(at-least-once delivery: a lost PUBACK makes the client send again)")
        raise AssertionError("\n".join([head, *report.describe(iothub)]))
    return report


def _first_out_of_order(order: Sequence[str], delivered: Iterable[tuple[str, str]]):
    rank = {m: i for i, m in enumerate(order)}
    last_by_device: dict[str, str] = {}
    for device, mid in delivered:
        prev = last_by_device.get(device)
        if prev is not None and rank[mid] < rank[prev]:
            return device, prev, mid
        last_by_device[device] = mid
    return None


def assert_in_order(iothub, sent, device_id: str | None = None) -> None:
    """Per device, first deliveries came in the order the ids were sent (re-sent copies ignored)."""
    __tracebackhide__ = True
    _check_hub(iothub, "assert_in_order")
    ids = _sent_ids(sent, "assert_in_order")
    wanted = set(ids)
    seen = set()
    delivered = []
    for t in _telemetry(iothub, device_id):
        if t.message_id in wanted and t.message_id not in seen:
            seen.add(t.message_id)
            delivered.append((t.device_id, t.message_id))
    bad = _first_out_of_order(ids, delivered)
    if bad is not None:
        device, earlier, later = bad
        raise AssertionError(
            f"device {device!r} delivered {later!r} after {earlier!r}, but {later!r} was sent first"
            + "".join("\n" + line for line in _fault_text(iothub)))
