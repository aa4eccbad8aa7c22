"""What a regional failover rolls back: the last `rpo` seconds of twin and registry changes.

IoT Hub replicates twins and the identity registry to the paired region with a recovery point of
0-5 minutes (failover-facts.md "Data loss (RPO)", from reliability-iot-hub.md), so a failover may
bring back an older twin or forget a device created just before it. The core records, per device,
the twin as it was before each change and when each device was created; times are the core's
`now`. Only what a rollback of at most MAX_RPO seconds can need is kept.
"""
from collections import deque
from dataclasses import replace

from .session import Twin

MAX_RPO = 300.0
# a device changing its twin many times a second would otherwise grow the history without bound;
# past this many changes in MAX_RPO a rollback restores a newer state than the exact one
_MAX_PER_DEVICE = 1000


def _copy(twin: Twin) -> Twin:
    return replace(twin, desired=dict(twin.desired), reported=dict(twin.reported))


class ChangeHistory:
    def __init__(self) -> None:
        self._twins: dict[str, deque[tuple[float, Twin | None]]] = {}
        self._created: dict[str, float] = {}

    def twin_changing(self, device_id: str, before: Twin | None, now: float) -> None:
        """Call before changing a twin; `before` None when the twin did not exist."""
        changes = self._twins.setdefault(device_id, deque(maxlen=_MAX_PER_DEVICE))
        changes.append((now, None if before is None else _copy(before)))
        while changes and changes[0][0] < now - MAX_RPO:
            changes.popleft()

    def device_created(self, device_id: str, now: float) -> None:
        self._created[device_id] = now
        for old in [d for d, at in self._created.items() if at < now - MAX_RPO]:
            del self._created[old]

    def device_removed(self, device_id: str) -> None:
        self._created.pop(device_id, None)
        self._twins.pop(device_id, None)

    def created_since(self, since: float) -> list[str]:
        return sorted(d for d, at in self._created.items() if at >= since)

    def twins_at(self, since: float) -> dict[str, Twin | None]:
        """Per device changed since `since`, its twin as it was then (None: it had none)."""
        out: dict[str, Twin | None] = {}
        for device_id, changes in self._twins.items():
            for at, before in changes:
                if at >= since:
                    out[device_id] = before
                    break
        for device_id, changes in self._twins.items():
            while changes and changes[-1][0] >= since:
                changes.pop()  # rolled back: the replica never saw them
        return out
