"""The delivery ledger: every telemetry message the hub accepted, in acceptance order."""
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set


@dataclass
class Telemetry:
    device_id: str
    message_id: Optional[str]
    body: bytes
    properties: Dict[str, str] = field(default_factory=dict)
    system_properties: Dict[str, str] = field(default_factory=dict)
    enqueued_at: float = 0.0
    dup: bool = False          # the MQTT DUP flag: the client says it is re-sending
    duplicate: bool = False    # this device already delivered a message with this message id
    qos: int = 1


class Ledger:
    """Thread-safe and append-only: nothing recorded is ever removed."""

    def __init__(self):
        self._items: List[Telemetry] = []
        self._seen: Dict[str, Set[str]] = {}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0

    def record(self, t: Telemetry) -> Telemetry:
        with self._lock:
            if t.message_id is not None:
                seen = self._seen.setdefault(t.device_id, set())
                if t.message_id in seen:
                    t.duplicate = True
                else:
                    seen.add(t.message_id)
            self._items.append(t)
            if self._waiters:
                self._cond.notify_all()
        return t

    def _wait(self, timeout: float) -> None:
        # record() skips notify_all while this is 0; the caller holds the lock
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def __len__(self):
        return len(self._items)

    def count(self, device_id: Optional[str] = None) -> int:
        with self._cond:
            if device_id is None:
                return len(self._items)
            return sum(1 for t in self._items if t.device_id == device_id)

    def items(self, device_id: Optional[str] = None, since: int = 0) -> List[Telemetry]:
        with self._cond:
            items = self._items[since:]
        if device_id is None:
            return items
        return [t for t in items if t.device_id == device_id]

    def wait_for(self, count: int, device_id: Optional[str] = None, timeout: float = 10.0) -> List[Telemetry]:
        """Block until `count` messages (of `device_id`, if given) are recorded."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                items = self.items(device_id)
                if len(items) >= count:
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    who = f" from device {device_id!r}" if device_id else ""
                    raise TimeoutError(
                        f"waited {timeout:g} s for {count} telemetry messages{who}; {len(items)} arrived")
                self._wait(remaining)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Re-check `predicate()` each time a message is recorded; False if still unmet at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wait(remaining)
            return True
