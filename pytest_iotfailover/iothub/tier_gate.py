"""Where the hub core asks the tier's throttles (tiers.py) before acting, and how it acts on the answer.

Shape first, then reject, as IoT Hub does (tiers.py, D-QT "Traffic shaping"): an `Admit` goes
ahead, a `Delay` is a `Timer` action the driver fires later (the core stays sans-IO), a `Reject`
is what the real hub answers: CONNACK 3 for a new connection, a close without PUBACK for D2C,
twin status 429, a 429001 error for a service call.

What is shaped and how:
- new connections: the CONNACK waits its turn (the hub-wide bucket; stats per device);
- D2C sends: recorded at once, the PUBACK waits (as the `throttle()` fault does);
- twin reads and updates: the request is handled when its turn comes;
- direct methods: the request reaches the device when its turn comes, metered in 4 KB chunks;
- C2D sends: a rejection fails the call; a delay is counted but the message is queued at once, since
  the service call returns synchronously here (simplification, assumption);
- registry operations: not throttled. The fake's registry calls (`FakeHub.add_device`) are test
  set-up, the counterpart of an import job, which D-QT throttles separately (assumption).
"""
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import HubOperationError
from .tiers import Delay, HubThrottles, Operation, Reject, Verdict

TIER_TIMER_KINDS = frozenset({"tier_connect", "tier_twin", "tier_method"})


class TierGate:
    """The core's side of throttling: holds the hub's `HubThrottles` and the deferred work."""
    throttles: HubThrottles
    now: float

    def _init_tier_gate(self, throttles: HubThrottles) -> None:
        self.throttles = throttles
        self._deferred: dict[Hashable, Callable[[], None]] = {}
        self._deferred_ids = 0

    _timer: Callable[[Hashable, float | None], None]  # the core's

    def _tier_verdict(self, operation: Operation, device_id: str | None, payload_bytes: int | None = None) -> Verdict:
        return self.throttles.acquire(operation, self.now, device=device_id, payload_bytes=payload_bytes)

    def _defer(self, kind: str, seconds: float, run: Callable[[], None]) -> None:
        self._deferred_ids += 1
        key = (kind, self._deferred_ids)
        self._deferred[key] = run
        self._timer(key, self.now + seconds)

    def _tier_fired(self, key: Hashable) -> None:
        run = self._deferred.pop(key, None)
        if run is not None:
            run()

    def _service_call_allowed(self, operation: Operation, device_id: str, payload_bytes: int | None = None) -> float:
        """The delay a service call gets (0: none), or HubOperationError with the hub's 429001/403010."""
        verdict = self._tier_verdict(operation, device_id, payload_bytes)
        if isinstance(verdict, Reject):
            raise HubOperationError(verdict.error.message, verdict.error.code)
        return verdict.seconds if isinstance(verdict, Delay) else 0.0

    def throttled_time(self, device_id: str | None) -> float:
        """Seconds `device_id` waited in the tier's shaping queues, over all operations."""
        return self.throttles.throttled_time(device_id)

    def throttle_report(self) -> dict[str | None, Any]:
        return self.throttles.report()
