"""What a regional failover rolls back: the last `rpo` seconds of twin and registry changes.

IoT Hub replicates twins and the identity registry to the paired region with a recovery point of
0-5 minutes (failover-facts.md "Data loss (RPO)", from reliability-iot-hub.md), so a failover may
bring back an older twin or forget a device created just before it. The core records, per device,
the twin as it was before each change and when each device was created; times are the core's
`now`. Only what a rollback of at most MAX_RPO seconds can need is kept.
"""
import math
from collections import deque
from dataclasses import replace
from typing import Any

from .session import Twin, new_c2d_queue

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


# --- what the fault engine does at a failover's start (hub: the core, fault: the engine's Fault) ---

def data_loss(hub: Any, fault: Any) -> dict[str, Any]:
    """What the paired region never had (failover-facts.md "Data loss (RPO)", from
    reliability-iot-hub.md): unread telemetry, cloud-to-device messages, the last `rpo` s of twin
    and registry changes. Returns the detail of the `failover_data_loss` event."""
    now = hub.now
    scope = None if fault.device_id is None else [fault.device_id]
    unread = fault.params.get("unread", 0.0)
    # what was accepted at the very instant the failover began is included: it came first
    until = math.nextafter(now, math.inf)
    lost = hub.ledger.mark_lost_in_failover(now - unread, until, scope) if unread else 0
    dropped = 0 if fault.params.get("keep_c2d") else drop_c2d(hub, fault)
    rpo = fault.params.get("rpo", 0.0)
    restored, forgotten = roll_back(hub, now - rpo) if rpo and fault.device_id is None else ({}, [])
    return {"unread": unread, "telemetry_lost": lost, "c2d_dropped": dropped, "rpo": rpo,
            "twins_rolled_back": sorted(restored), "devices_forgotten": forgotten}


def drop_c2d(hub: Any, fault: Any) -> int:
    """Queued and un-acknowledged cloud-to-device messages of the devices in scope."""
    dropped = 0
    for device_id in [d for d in hub.c2d_queues if fault.targets(d)]:
        dropped += len(hub.c2d_queues.pop(device_id))
    for device_id, session in hub.sessions.items():
        if fault.targets(device_id):
            dropped += len(session.inflight)
            session.inflight.clear()
    return dropped


def requeue_inflight(hub: Any, device_id: str) -> None:
    """keep_c2d with sessions lost: un-acknowledged C2D goes back to the front of the queue."""
    session = hub.sessions[device_id]
    if session.inflight:
        queue = hub.c2d_queues.setdefault(device_id, new_c2d_queue())
        queue.extendleft(msg for _, msg in sorted(session.inflight.items(), reverse=True))
        session.inflight.clear()


def roll_back(hub: Any, since: float) -> tuple[dict[str, int], list[str]]:
    """The replica's view after a failover: twin changes and devices created since `since` are
    gone. Returns the desired versions restored and the devices forgotten."""
    restored: dict[str, int] = {}
    for device_id, before in hub.history.twins_at(since).items():
        if before is None:
            hub.twins.pop(device_id, None)
        else:
            hub.twins[device_id] = before
        restored[device_id] = before.desired_version if before else 1
    forgotten = [d for d in hub.history.created_since(since) if hub.registry.get(d) is not None]
    for device_id in forgotten:
        hub.registry.remove(device_id)
        hub.history.device_removed(device_id)
        hub.twins.pop(device_id, None)
        hub.c2d_queues.pop(device_id, None)
        hub.sessions.pop(device_id, None)
    return restored, forgotten
