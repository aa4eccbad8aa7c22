"""What a fault did, as both hubs report it: `RecoveryReport`, `DeviceRecovery` and the
message tally that fills them.

Kept apart from either hub so the embedded one and the real-hub backend share the value
types without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .iothub.ledger import Telemetry

__all__ = ["DeviceRecovery", "RecoveryReport", "tally_messages"]


@dataclass
class DeviceRecovery:
    device_id: str
    disconnected_at: float | None = None
    detected_at: float | None = None
    reconnected_at: float | None = None
    messages_before: int = 0
    messages_during: int = 0
    messages_after: int = 0

    @property
    def downtime(self) -> float | None:
        if self.disconnected_at is None or self.reconnected_at is None:
            return None
        return self.reconnected_at - self.disconnected_at


@dataclass
class RecoveryReport:
    """How a fault went, from the hub's event log and ledger. Times are time.time()
    seconds."""

    fault: str
    target: str | None
    params: dict[str, Any]
    started_at: float | None
    ended_at: float | None
    devices: dict[str, DeviceRecovery] = field(default_factory=dict)
    messages_before: int = 0
    messages_during: int = 0
    messages_after: int = 0
    duplicates: int = 0
    # fault start -> the last affected device noticed; fault end -> the last one back
    time_to_detect: float | None = None
    time_to_recover: float | None = None

    @property
    def recovered(self) -> bool:
        return all(d.reconnected_at is not None for d in self.devices.values())

    @property
    def outage(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def __str__(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        back = sum(1 for d in self.devices.values() if d.reconnected_at is not None)
        target = "@" + self.target if self.target else ""
        return (f"{self.fault}{target}: outage {s(self.outage)}, detect "
                f"{s(self.time_to_detect)}, recover {s(self.time_to_recover)}, "
                f"{back}/{len(self.devices)} devices back, messages "
                f"{self.messages_before} before / {self.messages_during} during / "
                f"{self.messages_after} after, {self.duplicates} duplicates")


def tally_messages(rep: RecoveryReport,
                   telemetry: Iterable[Telemetry]) -> RecoveryReport:
    """Fill a report's message counts (before/during/after the fault window, hub-wide
    and per device, and duplicates since the start) and its derived times from
    per-device recovery data. A fault that never started has no window: the report
    stays as it is."""
    start, end = rep.started_at, rep.ended_at
    if start is None:
        return rep
    for t in telemetry:
        if t.enqueued_at < start:
            bucket = "messages_before"
        elif end is None or t.enqueued_at < end:
            bucket = "messages_during"
        else:
            bucket = "messages_after"
        setattr(rep, bucket, getattr(rep, bucket) + 1)
        if t.duplicate and t.enqueued_at >= start:
            rep.duplicates += 1
        d = rep.devices.get(t.device_id)
        if d is not None:
            setattr(d, bucket, getattr(d, bucket) + 1)
    detected = [d.detected_at for d in rep.devices.values()]
    if detected and all(x is not None for x in detected):
        rep.time_to_detect = max(max(x for x in detected if x is not None) - start, 0.0)
    back = [d.reconnected_at for d in rep.devices.values()]
    if back and all(x is not None for x in back) and end is not None:
        rep.time_to_recover = max(max(x for x in back if x is not None) - end, 0.0)
    return rep
