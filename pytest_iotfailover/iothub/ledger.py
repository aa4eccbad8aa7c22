"""The delivery ledger: every telemetry message the hub accepted, in acceptance order."""
from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class Telemetry:
    device_id: str
    message_id: str | None
    body: bytes
    properties: dict[str, str] = field(default_factory=dict)
    system_properties: dict[str, str] = field(default_factory=dict)
    enqueued_at: float = 0.0
    dup: bool = False          # the MQTT DUP flag: the client says it is re-sending
    duplicate: bool = False    # this device already delivered a message with this message id
    qos: int = 1
    lost_in_failover: bool = False  # accepted, then lost unread from the built-in endpoint


class Ledger:
    """Append-only: nothing recorded is ever removed. A plain store: one thread writes (the
    hub's); readers on other threads get copies (a list slice is atomic). Waiting for records
    is the driver's business (waiting.py)."""

    def __init__(self) -> None:
        self._items: list[Telemetry] = []
        self._seen: dict[str, set[str]] = {}

    def record(self, t: Telemetry) -> Telemetry:
        if t.message_id is not None:
            seen = self._seen.setdefault(t.device_id, set())
            if t.message_id in seen:
                t.duplicate = True
            else:
                seen.add(t.message_id)
        self._items.append(t)
        return t

    def __len__(self) -> int:
        return len(self._items)

    def count(self, device_id: str | None = None) -> int:
        if device_id is None:
            return len(self._items)
        return sum(1 for t in self._items[:] if t.device_id == device_id)

    def items(self, device_id: str | None = None, since: int = 0) -> list[Telemetry]:
        items = self._items[since:]
        if device_id is None:
            return items
        return [t for t in items if t.device_id == device_id]

    def mark_lost_in_failover(self, since: float, until: float,
                              device_ids: Collection[str] | None = None) -> int:
        """Mark the records enqueued in [since, until) (of `device_ids`, all when None) as lost
        in a failover; how many were newly marked. Records stay: only the telemetry view hides them."""
        marked = 0
        for t in reversed(self._items[:]):
            if t.enqueued_at < since:
                break  # acceptance order is enqueue order
            if t.enqueued_at >= until or t.lost_in_failover:
                continue
            if device_ids is None or t.device_id in device_ids:
                t.lost_in_failover = True
                marked += 1
        return marked
