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
- C2D sends and identity registry operations (create, update, delete): service calls that return
  synchronously, so the caller waits, not the hub. The driver books the call first
  (`book_service_call`: the delay, or the 429001 refusal), waits the delay in the caller's thread,
  then makes the call. The booking first runs the call's own argument checks (`check`): a call
  refused for its arguments is refused at once and takes nothing from the throttle (an
  assumption: D-QT does not say whether the hub validates a request before or after shaping it;
  refusing at once is what a caller can act on soonest). A C2D send booked that way carries its booking into the core's own check
  (`run_prebooked`), so it is counted once. A core driven without that step (a sans-IO test)
  still counts the C2D send and refuses it past the queue; it just does not wait.
"""
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ..errors import HubOperationError
from .tiers import Delay, HubThrottles, Operation, Reject, ThrottleStats, Verdict

TIER_TIMER_KINDS = frozenset({"tier_connect", "tier_twin", "tier_method"})
# the service calls whose callers wait their turn in the driver (the rest are shaped in the core)
SERVICE_SHAPED = frozenset({Operation.C2D_SEND, Operation.REGISTRY_OPERATION})

T = TypeVar("T")
Booking = tuple[Operation, str | None]


class TierGate:
    """The core's side of throttling: holds the hub's `HubThrottles` and the deferred work."""
    throttles: HubThrottles
    now: float
    events: Any                                                        # the core's EventLog
    _timer: Callable[[Hashable, float | None], None]                   # the core's
    _step: Callable[..., tuple[Any, list[Any]]]                        # the core's
    _service_available: Callable[[str | None, str], None]              # the core's (a failover)
    _registered: Callable[[str], None]                                 # the core's

    def _init_tier_gate(self, throttles: HubThrottles) -> None:
        self.throttles = throttles
        self._deferred: dict[Hashable, Callable[[], None]] = {}
        self._deferred_ids = 0
        self._prebooked: Booking | None = None

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
        if self._prebooked == (operation, device_id):
            self._prebooked = None  # booked (and waited for) by the driver: not counted twice
            return 0.0
        verdict = self._tier_verdict(operation, device_id, payload_bytes)
        if isinstance(verdict, Reject):
            self.events.add("throttled", device_id, operation=operation.value, error_code=verdict.error.code)
            raise HubOperationError(verdict.error.message, verdict.error.code)
        return verdict.seconds if isinstance(verdict, Delay) else 0.0

    # --- service calls whose caller waits (driver entry points) ----------------------------------

    def book_service_call(self, operation: Operation, device_id: str | None, what: str, count: int,
                          now: float, check: Callable[[], None] | None = None) -> tuple[float, list[Any]]:
        """Book `what` (`count` operations in one request) on the tier's throttle: the seconds the
        caller must wait before making the call (0: at once), or HubOperationError - 503001 during
        a failover, 404001 for a C2D send to an unknown device, 429001 past the shaping queue.
        `check` (run on the hub thread, at `now`) raises what the call itself would for its
        arguments; it runs before the throttle is asked, so a refused call costs no budget."""
        return self._step(now, self._book, operation, device_id, what, count, check)

    def _book(self, operation: Operation, device_id: str | None, what: str, count: int,
              check: Callable[[], None] | None = None) -> float:
        if operation not in SERVICE_SHAPED:
            raise ValueError(f"{operation.value} is shaped by the hub itself, not booked by its caller")
        # refused at once, not after a wait: the outage (as the calls themselves do), an unknown device
        self._service_available(device_id if operation is Operation.C2D_SEND else None, what)
        if operation is Operation.C2D_SEND and device_id is not None:
            self._registered(device_id)
        if check is not None:
            check()
        verdict = self.throttles.acquire(operation, self.now, device=device_id, count=count)
        if isinstance(verdict, Reject):
            self.events.add("throttled", device_id, operation=operation.value, call=what, count=count,
                            error_code=verdict.error.code)
            raise HubOperationError(f"{what}: {verdict.error.message}", verdict.error.code)
        if isinstance(verdict, Delay):
            # the caller's wait is service-side throttling a user should see (README "Throttling")
            self.events.add("throttle_delay", device_id, operation=operation.value, call=what, count=count,
                            seconds=round(verdict.seconds, 3))
            return verdict.seconds
        return 0.0

    def run_prebooked(self, booking: Booking, fn: Callable[[], T]) -> T:
        """Run `fn` (one step of the core) with `booking` already made: the core's own throttle
        check for that operation and device passes once without counting again."""
        self._prebooked = booking
        try:
            return fn()
        finally:
            self._prebooked = None

    # --- observation ---------------------------------------------------------------------------

    def throttled_time(self, device_id: str | None) -> float:
        """Seconds `device_id` waited in the tier's shaping queues, over all operations."""
        return self.throttles.throttled_time(device_id)

    def throttle_report(self) -> dict[str | None, Any]:
        return self.throttles.report()

    def throttle_totals(self) -> dict[str, ThrottleStats]:
        """Per operation: how many calls the tier admitted, delayed (and for how long) and refused."""
        return {operation.value: stats for operation, stats in self.throttles.totals().items()}
