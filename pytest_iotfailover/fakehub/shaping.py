"""FakeHub's service calls through the tier's throttles: booked on the hub thread, waited for here.

IoT Hub shapes a service call it cannot serve yet - the HTTP request simply takes longer - and
refuses it with 429001 ThrottlingException once its queue is full (iothub/tiers.py, D-QT "Traffic
shaping"). A FakeHub call is the HTTP request here, so the wait happens in the thread that made
it: the hub thread only books the call (`IoTHubCore.book_service_call`, microseconds) and goes on
serving every connection; the caller then waits out the delay, at most the queue's
`max_queue_delay` (60 s by default), on an event that `FakeHub.stop()` sets, and makes the call.

A call is checked before it is booked: a `send_c2d` with a bad `ttl`, an over-size body or to an
unknown device, an `add_device` with a bad or taken id, a `remove_device` of an unknown one, is
refused at once and takes nothing from the throttle. D-QT does not say in which order the hub
validates and shapes a request; checking first is an assumption (README "How faithful is the fake").

Identity registry operations (create, update, delete: `add_device`, `add_devices`,
`set_device_enabled`, `remove_device`) and C2D sends are shaped this way; the rows, 100/min/unit on
S1, and the burst of a minute's worth are in iothub/tiers.py.

`throttle=False` on a registry call is test set-up, modelled as an import job: D-QT sends bulk
identity work there ("Reading or updating a large number of device identities is supported through
import and export jobs"), and jobs are outside the registry operations throttle. The plugin's
fixtures create their devices so unless `--iothub-throttle-setup` is given (a labelled choice,
README "Throttling").
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..iothub.registry import Device, check_device_id
from ..iothub.tiers import Operation, Shaping, ThrottleStats

if TYPE_CHECKING:
    from ..iothub.core import IoTHubCore

__all__ = ["BULK_REGISTRY_LIMIT", "ServiceShaping"]

T = TypeVar("T")

# Bulk Registry - Update Registry (IoT Hub REST API): "A maximum of 100 devices can be specified per
# invocation". Each device in the call counts as one registry operation: an assumption, supported by
# Iot-Telemetry-Simulator #39, where calls of 50 devices ran into the CRUD throttle after 200 devices.
BULK_REGISTRY_LIMIT = 100


class ServiceShaping:
    """The FakeHub side of service-call shaping (a mixin; FakeHub supplies the hub plumbing)."""
    _thread: threading.Thread | None
    gateway_host: str | None
    _call: Callable[..., Any]
    _act: Callable[..., Any]
    _running_core: Callable[[], IoTHubCore]
    _core: IoTHubCore | None
    registry: Any

    def _init_shaping(self, shaping: Shaping | Mapping[Operation, Shaping] | None) -> None:
        self._shaping = shaping
        self._shaping_stop = threading.Event()   # set by stop(): a waiting call gives up at once
        self._booked = threading.local()         # the booking this thread's next step carries

    def _install_shaping(self, core: IoTHubCore) -> None:
        if self._shaping is not None and core.throttles.tier is not None:
            core.throttles = core.throttles.tier.throttles(self._shaping)

    def _is_running(self) -> bool:
        return bool(getattr(self, "running", False))

    def _on_hub_thread(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    def _shape(self, operation: Operation, device_id: str | None, what: str, *, count: int = 1,
               carry: bool = False, check: Callable[[], None] | None = None) -> float:
        """Book `what` on the tier's throttle, then wait its delay in this thread; the seconds waited.

        HubOperationError (429001 past the queue, 503001 during a failover, ...) comes from the
        booking, before any wait, and so does whatever `check` (run on the hub thread) raises for
        the call's arguments. `carry`: the next `_act` of this thread makes the booked call.
        """
        book = functools.partial(self._running_core().book_service_call, check=check)
        delay = self._act(book, operation, device_id, what, count)
        # on the hub thread (a callback of the hub) a wait would stall every connection: not waited
        if delay > 0 and not self._on_hub_thread() and self._shaping_stop.wait(delay):
            raise RuntimeError(f"{what}: the FakeHub was stopped while the call waited {delay:.2f} s "
                               "in the tier's shaping queue")
        if carry:
            self._booked.value = (operation, device_id)
        return delay

    def _shape_registry(self, device_id: str, what: str, throttle: bool, *, new: bool = False,
                        keys: tuple[str | None, str | None] = (None, None)) -> None:
        """Book a registry call on one device, checked first: `new`, an identity to create (a bad
        id or key, or one in use, is refused at once); else one that must exist."""
        if throttle:
            registry = self.registry
            check = functools.partial(registry.check_new, device_id, *keys) if new else \
                functools.partial(registry.check_known, device_id)
            self._shape(Operation.REGISTRY_OPERATION, device_id, what, check=check)

    def _shape_c2d(self, device_id: str, properties: dict[str, Any] | None, ttl: Any, expiry_time: Any,
                   ack: Any) -> None:
        """Book a C2D send whose terms (`ttl`, `expiry_time`, `ack`) are checked first."""
        core = self._running_core()
        self._shape(Operation.C2D_SEND, device_id, "send_c2d", carry=True,
                    check=functools.partial(core.c2d_check, properties, ttl, expiry_time, ack))

    def _carry_booking(self, step: Callable[[], T]) -> Callable[[], T]:
        """`step` as it must run on the hub thread: with this thread's booking, if it made one."""
        booking = getattr(self._booked, "value", None)
        if booking is None:
            return step
        self._booked.value = None
        core = self._running_core()
        return lambda: core.run_prebooked(booking, step)

    # --- public ----------------------------------------------------------------------------------

    def set_device_enabled(self, device_id: str, enabled: bool, *, throttle: bool = True) -> Device:
        """Enable or disable an identity (a registry update); disabling disconnects the device."""
        self._shape_registry(device_id, "set_device_enabled", throttle and self._is_running())
        dev = self.registry.set_enabled(device_id, enabled)
        if not enabled and self._is_running():
            self._act(self._running_core().device_disabled, device_id, False)
        return dev

    def add_devices(self, device_ids: Iterable[str], *, throttle: bool = True) -> list[Device]:
        """Create several device identities in one bulk registry call (at most 100 devices, as IoT
        Hub's bulk API takes); each counts as one registry operation and the whole call waits its
        turn once. `throttle=False`: test set-up, an import job with no such limit (module docstring).
        """
        ids = list(device_ids)
        seen: set[str] = set()
        problems = [why for why in (self._bulk_problem(i, d, seen) for i, d in enumerate(ids)) if why]
        if not ids or problems or (throttle and len(ids) > BULK_REGISTRY_LIMIT):
            raise ValueError("add_devices: " + ("; ".join(problems[:5]) if problems else
                             "no device ids given" if not ids else
                             f"{len(ids)} devices in one call; IoT Hub's bulk registry API takes at most "
                             f"{BULK_REGISTRY_LIMIT} (throttle=False for test set-up takes any number)"))
        if self.gateway_host is None:
            raise RuntimeError("start the FakeHub before adding devices (their connection strings need its address)")
        if throttle:
            self._shape(Operation.REGISTRY_OPERATION, None, "add_devices", count=len(ids))
        core = self._running_core()
        return [self._act(core.add_device, device_id, None, None, True) for device_id in ids]

    def _bulk_problem(self, index: int, device_id: Any, seen: set[str]) -> str | None:
        try:
            check_device_id(device_id)
        except (TypeError, ValueError) as exc:
            return f"device_ids[{index}]: {exc}"
        if device_id in seen:
            return f"device id {device_id!r} is given twice"
        seen.add(device_id)
        if self.registry.get(device_id) is not None:
            return f"device {device_id!r} already exists"
        return None

    def throttled_time(self, device_id: str | None = None) -> float:
        """Seconds `device_id` (None: calls made without a device) waited in the tier's shaping
        queues, over all operations; 0 on an unthrottled hub."""
        core = self._core
        return 0.0 if core is None or not self._is_running() else self._call(core.throttled_time, device_id)

    def throttle_stats(self) -> dict[str, ThrottleStats]:
        """Per throttled operation ("c2d_send", "registry_operation", "new_connection", ...): how many
        calls the tier admitted at once, delayed (`delayed_seconds` in all) and refused with 429001.
        Empty on an unthrottled hub (tier=None)."""
        core = self._running_core()
        return self._call(core.throttle_totals)
