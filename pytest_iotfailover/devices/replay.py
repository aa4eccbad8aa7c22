"""What `Outbox(replay=)` sends again after a failover.

A regional failover loses messages the hub acknowledged but no backend had read yet
(failover-facts.md "Data loss (RPO)", from reliability-iot-hub.md); the device cannot tell which.
After a lane stalled for at least `outage` s (no acknowledgement while a message waited: the hub was
away, longer than a blip), the outbox re-sends every message its lanes had acknowledged in the
`seconds` before the stall began, each on its own lane, with the same message ids: the backend
deduplicates.
"""
import collections
from typing import Any

from .. import checks


class Replay:
    def __init__(self, seconds: float, outage: float, capacity: int):
        self.seconds = checks.required_seconds("replay", seconds)
        self.outage = checks.required_seconds("replay_outage", outage, positive=True)
        # bounded like the outbox itself: at most `capacity` acknowledged messages remembered per lane
        self.capacity = capacity
        self._recent: dict[Any, collections.deque[tuple[float, Any]]] = {}
        self._last_ack: dict[Any, float] = {}
        self._replayed_until: float | None = None

    def acked(self, lane_key: Any, entry: Any, first_try: float | None, now: float) -> list[Any]:
        """Note `entry`'s acknowledgement at `now` (monotonic); the entries to send again, oldest first."""
        if not self.seconds:
            return []
        recent = self._recent.setdefault(lane_key, collections.deque(maxlen=self.capacity))
        began = max(self._last_ack.get(lane_key, float("-inf")), first_try if first_try is not None else now)
        again: list[Any] = []
        if now - began >= self.outage:
            # Up to now, not to `began`: another lane may have had a message acknowledged after this
            # lane's stall began and before the failover hit it. When another lane already replayed
            # for this same outage, only up to where that replay reached: what was acknowledged
            # since (its replays among them) came after the hub was back.
            high = now
            if self._replayed_until is not None and began <= self._replayed_until:
                high = self._replayed_until
            again = self._take(began - self.seconds, high)
            self._replayed_until = high
        self._last_ack[lane_key] = now
        recent.append((now, entry))
        while recent and recent[0][0] < now - self.seconds:
            recent.popleft()
        return again

    def _take(self, low: float, high: float) -> list[Any]:
        """Every lane's entries acknowledged in [low, high], oldest first, forgotten here. A failover
        is hub-wide: a pool's lane that had nothing waiting during the outage sees no stall of its
        own, yet what it had acknowledged just before is as much at risk as the stalled lane's."""
        taken: list[tuple[float, Any]] = []
        for key, recent in self._recent.items():
            kept: collections.deque[tuple[float, Any]] = collections.deque(maxlen=self.capacity)
            for at, entry in recent:
                if low <= at <= high and entry.state == "acked":
                    taken.append((at, entry))
                else:
                    kept.append((at, entry))
            self._recent[key] = kept
        taken.sort(key=lambda pair: pair[0])
        return [entry for _, entry in taken]
