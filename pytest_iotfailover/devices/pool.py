"""Device-client factories: a plain SDK client, or a supervised pool of them.

Two recovery strategies, matching the two cases in DESIGN.md ("Pooled and non-pooled clients"):

* `create_client` returns an ordinary `IoTHubDeviceClient`; recovery is the SDK's own
  (`connection_retry=True` unless you say otherwise). After a regional failover such a client
  reconnects but never subscribes again, so C2D messages, direct methods and desired-property
  patches stop arriving; CONNACK 4/5 stop its retries for good.
* `DevicePool` runs N device identities behind one supervisor, like a .NET AMQP connection
  pool: the SDK's own retry is off, and a client that loses its connection is shut down and
  replaced by a new one, whose handlers are registered again. That is why C2D, methods and
  patches survive a lost session with the pool.
"""
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Self

from .. import checks
from ..connstr import device_fields
from ..deadline import Call
from . import wedge
from .backoff import DELTA_BACKOFF, MAX_BACKOFF, MIN_BACKOFF, OPERATION_TIMEOUT, Backoff
from .client import check_server_cert, create_client
from .errors import DeviceConnectionError, DeviceTimeoutError, Recreation
from .slots import Slot, SlotState
from .supervisor import HANDLER_NAMES, Sender, Supervisor, Watchdog

__all__ = ["DeviceConnectionError", "DevicePool", "DeviceTimeoutError", "Recreation", "create_client"]

log = logging.getLogger(__name__)

# sdk_kwargs the pool sets itself: letting a caller turn them back on would have the SDK and the
# pool reconnecting the same device against each other.
_POOL_OWNED_KWARGS = ("connection_retry", "auto_connect")


def _device_entry(item: Any) -> tuple[str, str]:
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"devices: expected (device_id, connection_string) pairs, got a "
                             f"{type(item).__name__} of {len(item)}")
        device_id, cs = item
    elif hasattr(item, "device_id") and hasattr(item, "connection_string"):
        device_id, cs = item.device_id, item.connection_string
    else:
        raise ValueError(f"devices: {type(item).__name__} is neither a (device_id, connection_string) "
                         "pair nor has .device_id and .connection_string")
    if not isinstance(device_id, str) or not device_id:
        raise ValueError(f"devices: device_id must be a non-empty string, got {device_id!r}")
    parsed = device_fields(f"devices: the connection string of {device_id!r}", cs)
    if parsed.get("DeviceId") != device_id:
        raise ValueError(f"devices: the connection string of {device_id!r} is for device "
                         f"{parsed.get('DeviceId')!r}")
    if "ModuleId" in parsed:
        raise ValueError(f"devices: the connection string of {device_id!r} is a module's")
    return device_id, cs


class DevicePool:
    """N device identities behind one supervisor, like a .NET AMQP connection pool: the SDK's
    own retry is off; on a lost connection the pool closes and recreates that client.

    Clients are created with `connection_retry=False` and `auto_connect=False`: the supervisor
    is the only one that connects, so a `send` racing with a recreation can never reconnect the
    old client behind the pool's back and knock the new one off the hub (IoT Hub keeps one
    connection per device id). `keep_alive` and other SDK options come from `sdk_kwargs`.

    Recovery: each client's `on_connection_state_change` only notes the loss and hands the
    device to the supervisor thread; shutting a client down from inside that SDK handler thread
    would deadlock. The supervisor runs recreation attempts (shut the old client down, create a
    new one, connect it within `connect_timeout`, register the handlers again) on short-lived
    worker threads, at most one per device, so that one device whose CONNECT hangs does not hold
    up the others. After the loss, and after every failed attempt, it waits

        delay = min(max_backoff, min_backoff + delta_backoff * (2**attempt - 1) * uniform(0.8, 1.2))

    where `attempt` counts failed attempts since the loss (so the first try comes `min_backoff`
    after it; only the exponential part is jittered, by +-20%). A device not back within
    `operation_timeout` of its loss is marked failed: `send` to it raises at once, naming it.
    Refusals with CONNACK 4/5 (the SDK's `CredentialError`) are failed attempts like any other:
    unlike the bare SDK, which stops reconnecting for good after one, the pool keeps trying, and
    it keeps trying a failed device too (every `max_backoff`), which rejoins when it gets back.

    Silent deaths: the SDK's network thread can die while the client still reports connected
    (see wedge.py); such a client never acknowledges anything again. A watchdog thread checks every
    connected client every `watch_interval` s and treats it as lost, like a dropped connection,
    when its network thread is dead, when a send on it got no acknowledgement within
    `ack_timeout` s (None: never), or when `liveness_probe()` (optional: returns the device ids the
    hub sees connected, or None when it cannot tell) has not listed it for `probe_grace` s. The
    client is then shut down on a daemon thread with a deadline, its sockets closed, a new one
    created with the handlers registered again, and sends in flight go out again on it. Each case
    is listed in `wedges` and in the recreation's reason.

    Thread-safe: every method may be called from any thread, and `send` and
    `send_method_response` also from inside the pool's handlers.
    """

    def __init__(self, devices: Iterable[Any], *, server_verification_cert: str | None = None,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 delta_backoff: float = DELTA_BACKOFF, operation_timeout: float = OPERATION_TIMEOUT, connect_timeout: float = 30.0,
                 ack_timeout: float | None = 60.0,
                 liveness_probe: Callable[[], Iterable[str] | None] | None = None,
                 probe_grace: float = 10.0, watch_interval: float = 0.25, **sdk_kwargs):
        self._backoff = Backoff.checked(min_backoff, max_backoff, delta_backoff)
        self._operation_timeout = checks.required_seconds("operation_timeout", operation_timeout, positive=True)
        self._connect_timeout = checks.required_seconds("connect_timeout", connect_timeout, positive=True)
        self._ack_timeout = checks.seconds("ack_timeout", ack_timeout, positive=True, allow_none=True)
        if liveness_probe is not None and not callable(liveness_probe):
            raise ValueError("liveness_probe must be callable with no arguments (returning the device "
                             "ids the hub sees connected), or None")
        self._liveness_probe = liveness_probe
        self._probe_grace = checks.required_seconds("probe_grace", probe_grace)
        self._watch_interval = checks.required_seconds("watch_interval", watch_interval, positive=True)
        for name in _POOL_OWNED_KWARGS:
            if name in sdk_kwargs:
                raise ValueError(f"{name} is set by the pool (it recovers clients itself); do not pass it")
        if check_server_cert(server_verification_cert) is not None:
            sdk_kwargs["server_verification_cert"] = server_verification_cert
        self._sdk_kwargs = dict(sdk_kwargs, connection_retry=False, auto_connect=False)
        self._slots: dict[str, Slot] = {}
        if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
            raise ValueError("devices must be an iterable of (device_id, connection_string) pairs "
                             "or of objects with .device_id and .connection_string")
        for item in devices:
            device_id, cs = _device_entry(item)
            if device_id in self._slots:
                raise ValueError(f"devices names device {device_id!r} more than once")
            self._slots[device_id] = Slot(device_id, cs)
        if not self._slots:
            raise ValueError("devices is empty: a pool needs at least one device")

        self._cond = threading.Condition()
        self._handlers: dict[str, Callable | None] = dict.fromkeys(HANDLER_NAMES)
        self._recreations: list[Recreation] = []
        self._attempt_threads: set = set()
        self._shut_down: weakref.WeakSet = weakref.WeakSet()
        self._supervisor: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._wedges: list[wedge.Wedge] = []
        self._closing = False
        self._closed = threading.Event()
        self._name = f"DevicePool-{id(self):x}"
        self._sv = Supervisor(self)
        self._wd = Watchdog(self)
        self._tx = Sender(self)

    # --- observation -------------------------------------------------------------------------

    @property
    def device_ids(self) -> list[str]:
        return list(self._slots)

    @property
    def clients(self) -> dict[str, Any]:
        """The current SDK client of each device; a device being recreated may be missing."""
        with self._cond:
            return {d: s.client for d, s in self._slots.items() if s.client is not None}

    @property
    def recreations(self) -> list[Recreation]:
        with self._cond:
            return list(self._recreations)

    @property
    def wedges(self) -> list[wedge.Wedge]:
        """Clients found dead while they claimed to be connected (and replaced), oldest first."""
        with self._cond:
            return list(self._wedges)

    @property
    def failed(self) -> dict[str, str]:
        """Devices not back within operation_timeout, with their last error."""
        with self._cond:
            return {d: s.last_error or "no attempt finished" for d, s in self._slots.items()
                    if s.state is SlotState.FAILED}

    def wait_connected(self, timeout: float | None = None, device_ids: Iterable[str] | None = None) -> None:
        """Block until every device (or those named) is connected; DeviceTimeoutError otherwise."""
        limit = self._timeout(timeout, self._operation_timeout)
        slots = [self._slot(d) for d in device_ids] if device_ids is not None else list(self._slots.values())
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                missing = [s.device_id for s in slots if s.state is not SlotState.CONNECTED]
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    why = "the pool is closed" if self._closing else f"within {limit:g} s"
                    raise DeviceTimeoutError(f"devices not connected {why}: {', '.join(map(repr, missing))}",
                                             missing[0])
                self._cond.wait(left)

    def __repr__(self) -> str:
        with self._cond:
            states = [s.state for s in self._slots.values()]
        connected, failed = states.count(SlotState.CONNECTED), states.count(SlotState.FAILED)
        state = "closed" if self._closing else (
            f"{connected} connected, {len(states) - connected - failed} recovering, {failed} failed")
        return f"<DevicePool of {len(states)} devices: {state}>"

    # --- connecting ----------------------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> Self:
        """Connect every device that is not connected, in parallel, retrying with the pool's backoff
        until `timeout` (default: connect_timeout). Raises DeviceConnectionError naming the devices
        still not connected then; the supervisor keeps trying those in the background."""
        limit = self._timeout(timeout, self._connect_timeout)
        with self._cond:
            if self._closing:
                raise RuntimeError("this DevicePool is closed")
            todo = [s for s in self._slots.values() if s.state is not SlotState.CONNECTED]
            need_client = [s for s in todo if s.state is SlotState.NEW and s.client is None]
        self._sv.prepare(need_client)
        now = time.monotonic()
        deadline = now + limit
        with self._cond:
            if self._closing:
                raise RuntimeError("this DevicePool is closed")
            for slot in todo:
                if slot.state in (SlotState.NEW, SlotState.FAILED):
                    # a device mid-recovery keeps its own deadline; these start afresh
                    if slot.state is SlotState.NEW:
                        slot.reason = "connect"
                    slot.move(SlotState.CONNECTING)
                    slot.attempts = 0
                    slot.deadline = deadline
                    if not slot.busy:
                        slot.next_at = now
            self._sv._start_supervisor()
            self._cond.notify_all()
            while True:
                pending = [s for s in todo if s.state not in (SlotState.CONNECTED, SlotState.FAILED)]
                left = deadline - time.monotonic()
                if not pending or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            if self._closing:
                raise RuntimeError("this DevicePool was closed while connecting")
            missing = {s.device_id: s.last_error or f"not connected within {limit:g} s"
                       for s in todo if s.state is not SlotState.CONNECTED}
        if missing:
            raise DeviceConnectionError(
                f"{len(missing)} of {len(self._slots)} devices could not connect: "
                + "; ".join(f"{d!r}: {why}" for d, why in missing.items()), missing)
        return self

    # --- the supervisor ------------------------------------------------------------------------

    # --- the watchdog: clients that died without telling the SDK -------------------------------

    # --- handlers ------------------------------------------------------------------------------

    def _set_handler(self, name: str, handler: Callable | None) -> None:
        if handler is not None and not callable(handler):
            raise ValueError(f"{name} must be callable with (device_id, payload), or None")
        with self._cond:
            self._handlers[name] = handler
            slots = list(self._slots.values())
        calls = [Call(functools.partial(self._sv._sync_handlers, s), f"{self._name}-handlers:{s.device_id}")
                 for s in slots]
        deadline = time.monotonic() + self._connect_timeout
        for call in calls:
            call.done.wait(max(deadline - time.monotonic(), 0))

    on_message_received = property(
        lambda self: self._handlers["on_message_received"],
        lambda self, h: self._set_handler("on_message_received", h),
        doc="Called with (device_id, azure.iot.device.Message) for each C2D message.")
    on_method_request_received = property(
        lambda self: self._handlers["on_method_request_received"],
        lambda self, h: self._set_handler("on_method_request_received", h),
        doc="Called with (device_id, MethodRequest); answer with send_method_response.")
    on_twin_desired_properties_patch_received = property(
        lambda self: self._handlers["on_twin_desired_properties_patch_received"],
        lambda self, h: self._set_handler("on_twin_desired_properties_patch_received", h),
        doc="Called with (device_id, patch dict) for each desired-properties patch.")

    # --- operations ----------------------------------------------------------------------------

    def send(self, device_id: str, message: Any, timeout: float | None = None) -> None:
        """`send_message` on the device's current client. If that client is lost or replaced
        before the hub acknowledges, the message goes out again on the next one (at least once:
        the hub may see it twice), until `timeout` (default: operation_timeout)."""
        slot = self._slot(device_id)
        limit = self._timeout(timeout, self._operation_timeout)
        self._tx._operate(slot, "send_message", message, time.monotonic() + limit, limit, retry=True)

    def send_method_response(self, device_id: str, response: Any, timeout: float | None = None) -> None:
        """Answer a direct method on the device's current client. Not retried on a new client: the
        request belonged to the connection it came in on."""
        slot = self._slot(device_id)
        limit = self._timeout(timeout, self._operation_timeout)
        self._tx._operate(slot, "send_method_response", response, time.monotonic() + limit, limit, retry=False)

            # else: the client was lost or replaced meanwhile; go again on the current one

    def _slot(self, device_id: str) -> Slot:
        slot = self._slots.get(device_id) if isinstance(device_id, str) else None
        if slot is None:
            raise ValueError(f"device_id {device_id!r} is not in this pool")
        return slot

    @staticmethod
    def _timeout(timeout: float | None, default: float) -> float:
        return default if timeout is None else checks.required_seconds("timeout", timeout, positive=True)

    # --- closing -------------------------------------------------------------------------------

    def close(self, timeout: float = 10) -> None:
        """Shut every client down, in parallel, within about `timeout` seconds. Idempotent."""
        limit = checks.required_seconds("timeout", timeout)
        with self._cond:
            first = not self._closing
            self._closing = True
            self._cond.notify_all()
        self._stop_watching.set()
        if not first:
            self._closed.wait(limit)
            return
        deadline = time.monotonic() + limit
        try:
            if self._supervisor is not None:
                self._supervisor.join(max(deadline - time.monotonic(), 0))
            with self._cond:
                clients = [s.client for s in self._slots.values() if s.client is not None]
                for slot in self._slots.values():
                    slot.client, slot.installed = None, set()
                    slot.move(SlotState.CLOSED)
                attempts = list(self._attempt_threads)
            closers = [threading.Thread(target=self._sv._shutdown, args=(c, max(deadline - time.monotonic(), 0)),
                                        name=f"{self._name}-close", daemon=True) for c in clients]
            for t in closers:
                t.start()
            for t in closers + attempts:
                t.join(max(deadline - time.monotonic(), 0))
        finally:
            self._closed.set()

    def __enter__(self) -> Self:
        try:
            return self.connect()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
