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
import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from azure.iot.device import exceptions as sdk_errors

from .. import checks
from ..connstr import device_fields
from ..deadline import Call, call_with_deadline
from ..redaction import redact
from . import wedge
from .backoff import DELTA_BACKOFF, MAX_BACKOFF, MIN_BACKOFF, OPERATION_TIMEOUT, Backoff
from .client import check_server_cert, create_client
from .slots import RECOVERING, Slot, SlotState

__all__ = ["create_client", "DevicePool", "Recreation", "DeviceConnectionError", "DeviceTimeoutError"]

log = logging.getLogger(__name__)

# The SDK serialises every client's pipeline work on one process-wide thread and never bounds a
# shutdown; a client wedged in CONNECTING can take its 60 s CONNACK watchdog to let go.
_SHUTDOWN_TIMEOUT = 5.0
# Recreation attempts running at once. Each waits mostly on the network, but more than this
# only queues up behind the SDK's single pipeline thread.
_MAX_PARALLEL_ATTEMPTS = 16
_HANDLER_NAMES = ("on_message_received", "on_method_request_received",
                  "on_twin_desired_properties_patch_received")
# sdk_kwargs the pool sets itself: letting a caller turn them back on would have the SDK and the
# pool reconnecting the same device against each other.
_POOL_OWNED_KWARGS = ("connection_retry", "auto_connect")
# Errors after which the same message may go out again on the same or the next client.
_RETRIABLE = (sdk_errors.ClientError, sdk_errors.OperationCancelled, sdk_errors.OperationTimeout)


class Recreation(NamedTuple):
    """One replaced client: which device, when the new one was connected (time.time()), and why."""
    device_id: str
    at: float
    reason: str


class DeviceConnectionError(ConnectionError):
    """Devices the pool cannot reach: `reasons` maps each device id to why (secrets redacted)."""

    def __init__(self, message: str, reasons: Dict[str, str]):
        super().__init__(message)
        self.reasons = dict(reasons)
        self.device_ids = list(reasons)


class DeviceTimeoutError(TimeoutError):
    """An operation on `device_id` did not finish within its deadline."""

    def __init__(self, message: str, device_id: str):
        super().__init__(message)
        self.device_id = device_id


class _Closing(Exception):
    """The pool began closing while a recreation attempt was running."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) != text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


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

    def __init__(self, devices: Iterable[Any], *, server_verification_cert: Optional[str] = None,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 delta_backoff: float = DELTA_BACKOFF, operation_timeout: float = OPERATION_TIMEOUT, connect_timeout: float = 30.0,
                 ack_timeout: Optional[float] = 60.0,
                 liveness_probe: Optional[Callable[[], Optional[Iterable[str]]]] = None,
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
        self._slots: Dict[str, Slot] = {}
        if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
            raise ValueError("devices must be an iterable of (device_id, connection_string) pairs "
                             "or of objects with .device_id and .connection_string")
        for item in devices:
            device_id, cs = self._device_entry(item)
            if device_id in self._slots:
                raise ValueError(f"devices names device {device_id!r} more than once")
            self._slots[device_id] = Slot(device_id, cs)
        if not self._slots:
            raise ValueError("devices is empty: a pool needs at least one device")

        self._cond = threading.Condition()
        self._handlers: Dict[str, Optional[Callable]] = dict.fromkeys(_HANDLER_NAMES)
        self._recreations: List[Recreation] = []
        self._attempt_threads: set = set()
        self._shut_down: "weakref.WeakSet" = weakref.WeakSet()
        self._supervisor: Optional[threading.Thread] = None
        self._watchdog: Optional[threading.Thread] = None
        self._stop_watching = threading.Event()
        self._wedges: List[wedge.Wedge] = []
        self._closing = False
        self._closed = threading.Event()
        self._name = f"DevicePool-{id(self):x}"

    @staticmethod
    def _device_entry(item: Any) -> Tuple[str, str]:
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

    # --- observation -------------------------------------------------------------------------

    @property
    def device_ids(self) -> List[str]:
        return list(self._slots)

    @property
    def clients(self) -> Dict[str, Any]:
        """The current SDK client of each device; a device being recreated may be missing."""
        with self._cond:
            return {d: s.client for d, s in self._slots.items() if s.client is not None}

    @property
    def recreations(self) -> List[Recreation]:
        with self._cond:
            return list(self._recreations)

    @property
    def wedges(self) -> List[wedge.Wedge]:
        """Clients found dead while they claimed to be connected (and replaced), oldest first."""
        with self._cond:
            return list(self._wedges)

    @property
    def failed(self) -> Dict[str, str]:
        """Devices not back within operation_timeout, with their last error."""
        with self._cond:
            return {d: s.last_error or "no attempt finished" for d, s in self._slots.items()
                    if s.state is SlotState.FAILED}

    def wait_connected(self, timeout: Optional[float] = None, device_ids: Optional[Iterable[str]] = None) -> None:
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

    def connect(self, timeout: Optional[float] = None) -> "DevicePool":
        """Connect every device that is not connected, in parallel, retrying with the pool's backoff
        until `timeout` (default: connect_timeout). Raises DeviceConnectionError naming the devices
        still not connected then; the supervisor keeps trying those in the background."""
        limit = self._timeout(timeout, self._connect_timeout)
        with self._cond:
            if self._closing:
                raise RuntimeError("this DevicePool is closed")
            todo = [s for s in self._slots.values() if s.state is not SlotState.CONNECTED]
            need_client = [s for s in todo if s.state is SlotState.NEW and s.client is None]
        # created up front, on the caller's thread, so that bad SDK options raise here rather than
        # turning into an endless series of failed attempts
        created, spare = [], []
        try:
            for slot in need_client:
                created.append((slot, self._create(slot)))
        except BaseException:
            for _, client in created:
                self._shutdown(client)
            raise
        now = time.monotonic()
        deadline = now + limit
        with self._cond:
            closing = self._closing
            for slot, client in created:
                if not closing and slot.state is SlotState.NEW and slot.client is None:
                    slot.client, slot.fresh, slot.installed = client, True, set()
                else:
                    spare.append(client)  # the pool closed, or a concurrent connect() got there first
        for client in spare:
            self._shutdown(client)
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
            self._start_supervisor()
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

    def _create(self, slot: Slot):
        client = create_client(slot.connection_string, **self._sdk_kwargs)
        client.on_connection_state_change = self._state_watcher(slot, client)
        wedge.watch(client, slot.device_id)
        return client

    def _state_watcher(self, slot: Slot, client) -> Callable[[], None]:
        def on_connection_state_change():
            # runs on the SDK's handler thread: note the loss and return, never block here
            if not client.connected:
                self._lost(slot, client, "connection lost")
        return on_connection_state_change

    def _lost(self, slot: Slot, client, reason: str, force: bool = False) -> None:
        with self._cond:
            if self._closing or slot.client is not client or slot.state is not SlotState.CONNECTED:
                return  # an old client's farewell, or a loss already being handled
            now = time.monotonic()
            slot.move(SlotState.RECREATING)
            slot.force = force
            slot.attempts, slot.reason, slot.last_error = 0, reason, None
            slot.lost_at = time.time()
            slot.next_at = now + self._delay(0)
            slot.deadline = now + self._operation_timeout
            self._cond.notify_all()
        log.info("%s: device %r: %s; recreating its client", self._name, slot.device_id, reason)

    def _delay(self, attempt: int) -> float:
        return self._backoff.delay(attempt)

    def _notify(self, _call: Call) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the supervisor ------------------------------------------------------------------------

    def _start_supervisor(self) -> None:
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name=f"{self._name}-supervisor",
                                                daemon=True)
            self._supervisor.start()
            self._watchdog = threading.Thread(target=self._watch, name=f"{self._name}-watchdog", daemon=True)
            self._watchdog.start()

    # --- the watchdog: clients that died without telling the SDK -------------------------------

    def _watch(self) -> None:
        absent_since: Dict[str, float] = {}
        while not self._stop_watching.wait(self._watch_interval):
            try:
                self._watch_once(absent_since)
            except Exception as exc:  # keep watching the others
                log.debug("%s: watchdog: %s", self._name, _describe(exc))

    def _watch_once(self, absent_since: Dict[str, float]) -> None:
        with self._cond:
            if self._closing:
                return
            live = [(s, s.client) for s in self._slots.values()
                    if s.state is SlotState.CONNECTED and s.client is not None]
        on_hub = None
        if self._liveness_probe is not None:
            try:
                ids = self._liveness_probe()
                on_hub = None if ids is None else set(ids)
            except Exception:
                on_hub = None  # the hub cannot say right now: no opinion
        now = time.monotonic()
        for slot, client in live:
            found = wedge.diagnose(client)
            if found is None and on_hub is not None:
                if slot.device_id not in on_hub and client.connected:
                    since = absent_since.setdefault(slot.device_id, now)
                    if now - since >= self._probe_grace:
                        found = wedge.hub_disagrees(client, slot.device_id, since)
                else:
                    absent_since.pop(slot.device_id, None)
            if found is not None:
                absent_since.pop(slot.device_id, None)
                self._wedged(slot, client, found)

    def _wedged(self, slot: Slot, client, found: wedge.Wedge) -> None:
        with self._cond:
            if slot.client is not client or slot.state is not SlotState.CONNECTED:
                return
            self._wedges.append(found)
        log.warning("%s: %s; replacing the client", self._name, found.text)
        self._lost(slot, client, f"wedged: {found.text}", force=True)

    def _supervise(self) -> None:
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                wake = None
                for slot in self._slots.values():
                    if slot.state not in RECOVERING:
                        continue
                    if slot.state is not SlotState.FAILED:
                        if now >= slot.deadline:
                            slot.move(SlotState.FAILED)
                            self._cond.notify_all()
                            log.warning("%s: device %r not back within its deadline: %s", self._name,
                                        slot.device_id, slot.last_error or "no attempt finished")
                        else:
                            wake = slot.deadline if wake is None else min(wake, slot.deadline)
                    if slot.busy:
                        continue
                    if slot.next_at > now:
                        wake = slot.next_at if wake is None else min(wake, slot.next_at)
                    elif len(self._attempt_threads) < _MAX_PARALLEL_ATTEMPTS:
                        slot.busy = True
                        t = threading.Thread(target=self._attempt, args=(slot,), daemon=True,
                                             name=f"{self._name}-recreate:{slot.device_id}")
                        self._attempt_threads.add(t)
                        t.start()
                    # else: a finishing attempt notifies us
                self._cond.wait(None if wake is None else max(wake - now, 0.001))

    def _attempt(self, slot: Slot) -> None:
        client = None
        try:
            with self._cond:
                old, fresh, force = slot.client, slot.fresh, slot.force
                slot.fresh = slot.force = False
            if old is not None and not fresh:
                if not force and old.connected and slot.was_connected:
                    # it came back by itself (the SDK's token renewal reconnects on its own)
                    self._resume(slot, old)
                    return
                self._shutdown(old)
                wedge.release(old)
                with self._cond:
                    if slot.client is old:
                        slot.client, slot.installed = None, set()
                old = None
            client = old if fresh else self._create(slot)
            with self._cond:
                if self._closing:
                    raise _Closing()
                slot.client, slot.installed = client, set()
            call_with_deadline(client.connect, self._connect_timeout, f"connect:{slot.device_id}",
                               name=f"{self._name}-connect:{slot.device_id}")
            with slot.handler_lock:
                self._install_handlers(slot, client)
                with self._cond:
                    if self._closing:
                        raise _Closing()
                    if not client.connected:
                        raise sdk_errors.ConnectionDroppedError("lost the connection while subscribing")
                    self._publish(slot, client)
        except BaseException as exc:
            if client is not None:
                self._shutdown(client)
            with self._cond:
                if slot.client is client:
                    slot.client, slot.installed = None, set()
                if not isinstance(exc, _Closing) and not self._closing:
                    slot.attempts += 1
                    slot.last_error = _describe(exc)
                    slot.next_at = time.monotonic() + self._delay(slot.attempts)
                    log.info("%s: device %r: attempt %d failed: %s", self._name, slot.device_id,
                             slot.attempts, slot.last_error)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._cond:
                slot.busy = False
                self._attempt_threads.discard(threading.current_thread())
                self._cond.notify_all()

    def _resume(self, slot: Slot, client) -> None:
        with slot.handler_lock:
            self._install_handlers(slot, client)
            with self._cond:
                if slot.client is client and client.connected and not self._closing:
                    slot.move(SlotState.CONNECTED)
                    self._cond.notify_all()
                    return
        raise sdk_errors.ConnectionDroppedError("lost the connection again")

    def _publish(self, slot: Slot, client) -> None:
        """Make `client` the device's current one (caller holds the condition)."""
        slot.move(SlotState.CONNECTED)
        slot.generation += 1
        if slot.was_connected:
            down = time.time() - slot.lost_at if slot.lost_at is not None else 0.0
            reason = f"{slot.reason}; back after {down:.2f} s"
            if slot.attempts:
                reason += f" and {slot.attempts} failed attempt(s), the last: {slot.last_error}"
            self._recreations.append(Recreation(slot.device_id, time.time(), reason))
            log.info("%s: device %r recreated (%s)", self._name, slot.device_id, reason)
        slot.was_connected = True
        slot.attempts, slot.last_error = 0, None
        self._cond.notify_all()

    def _shutdown(self, client, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        with self._cond:
            if client in self._shut_down:
                return
            self._shut_down.add(client)
        try:
            call_with_deadline(client.shutdown, timeout, "shutdown", name=f"{self._name}-shutdown")
        except Exception as exc:
            # a client already gone, or one wedged in the SDK: either way it is not ours any more
            log.debug("%s: shutting a client down: %s", self._name, _describe(exc))

    # --- handlers ------------------------------------------------------------------------------

    def _install_handlers(self, slot: Slot, client) -> None:
        """Bring `client`'s SDK handlers in line with the pool's (caller holds slot.handler_lock)."""
        for name in _HANDLER_NAMES:
            wanted = self._handlers[name] is not None
            if wanted == (name in slot.installed):
                continue
            value = self._dispatcher(name, slot.device_id) if wanted else None
            # the SDK subscribes (or unsubscribes) before this returns
            call_with_deadline(lambda n=name, v=value: setattr(client, n, v), self._connect_timeout,
                               f"{name}:{slot.device_id}", name=f"{self._name}-{name}:{slot.device_id}")
            if wanted:
                slot.installed.add(name)
            else:
                slot.installed.discard(name)

    def _dispatcher(self, name: str, device_id: str) -> Callable[[Any], None]:
        # looks the handler up per call, so replacing a handler needs no SDK round trip
        def dispatch(payload):
            handler = self._handlers[name]
            if handler is not None:
                handler(device_id, payload)
        return dispatch

    def _set_handler(self, name: str, handler: Optional[Callable]) -> None:
        if handler is not None and not callable(handler):
            raise ValueError(f"{name} must be callable with (device_id, payload), or None")
        with self._cond:
            self._handlers[name] = handler
            slots = list(self._slots.values())
        calls = [Call(lambda s=s: self._sync_handlers(s), f"{self._name}-handlers:{s.device_id}")
                 for s in slots]
        deadline = time.monotonic() + self._connect_timeout
        for call in calls:
            call.done.wait(max(deadline - time.monotonic(), 0))

    def _sync_handlers(self, slot: Slot) -> None:
        with slot.handler_lock:
            with self._cond:
                client = slot.client if slot.state is SlotState.CONNECTED else None
            if client is None:
                return  # whoever connects it next installs the handlers then
            try:
                self._install_handlers(slot, client)
            except Exception as exc:
                # a client that cannot subscribe is of no use: replace it even if it looks connected
                self._lost(slot, client, f"subscribing failed ({_describe(exc)})", force=True)

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

    def send(self, device_id: str, message: Any, timeout: Optional[float] = None) -> None:
        """`send_message` on the device's current client. If that client is lost or replaced
        before the hub acknowledges, the message goes out again on the next one (at least once:
        the hub may see it twice), until `timeout` (default: operation_timeout)."""
        slot = self._slot(device_id)
        limit = self._timeout(timeout, self._operation_timeout)
        self._operate(slot, "send_message", message, time.monotonic() + limit, limit, retry=True)

    def send_method_response(self, device_id: str, response: Any, timeout: Optional[float] = None) -> None:
        """Answer a direct method on the device's current client. Not retried on a new client: the
        request belonged to the connection it came in on."""
        slot = self._slot(device_id)
        limit = self._timeout(timeout, self._operation_timeout)
        self._operate(slot, "send_method_response", response, time.monotonic() + limit, limit, retry=False)

    def _operate(self, slot: Slot, method: str, arg: Any, deadline: float, limit: float, retry: bool) -> None:
        device_id = slot.device_id
        last_error = None
        while True:
            with self._cond:
                client, generation = self._usable(slot, deadline, limit, method, last_error)
            call = Call(lambda: getattr(client, method)(arg), f"{self._name}-{method}:{device_id}", self._notify)
            ack_by = None if self._ack_timeout is None else time.monotonic() + self._ack_timeout
            with self._cond:
                while (not call.done.is_set() and slot.generation == generation
                       and slot.state is SlotState.CONNECTED and not self._closing):
                    now = time.monotonic()
                    left = deadline - now
                    if left <= 0:
                        raise DeviceTimeoutError(
                            f"{method} to device {device_id!r} not acknowledged within {limit:g} s", device_id)
                    if ack_by is not None and now >= ack_by:
                        # connected, yet nothing acknowledged: a client that will never answer
                        found = wedge.Wedge(device_id, time.time(), None, None,
                                            f"{device_id}: {method} got no acknowledgement within "
                                            f"{self._ack_timeout:g} s; it still reports connected")
                        wedge.record(found)
                        self._wedges.append(found)
                        self._lost(slot, client, f"wedged: {found.text}", force=True)
                        break
                    self._cond.wait(left if ack_by is None else min(left, max(ack_by - now, 0.001)))
            if call.done.is_set():
                if call.error is None:
                    return
                if not isinstance(call.error, _RETRIABLE):
                    raise call.error
                last_error = _describe(call.error)
                if not retry:
                    raise DeviceConnectionError(f"{method} to device {device_id!r} failed: {last_error}",
                                                {device_id: last_error})
                with self._cond:
                    # the state-change event usually follows the failure; give it a moment
                    if slot.generation == generation and slot.state is SlotState.CONNECTED and not self._closing:
                        self._cond.wait(max(min(self._backoff.min, deadline - time.monotonic()), 0.01))
            elif not retry:
                last_error = "the client was lost before the call completed"
                raise DeviceConnectionError(f"{method} to device {device_id!r}: {last_error}",
                                            {device_id: last_error})
            # else: the client was lost or replaced meanwhile; go again on the current one

    def _usable(self, slot: Slot, deadline: float, limit: float, method: str, last_error: Optional[str]):
        """The device's connected client and its generation (caller holds the condition)."""
        device_id = slot.device_id
        while True:
            if self._closing:
                raise DeviceConnectionError(f"{method} to device {device_id!r}: the pool is closed",
                                            {device_id: "the pool is closed"})
            if slot.state is SlotState.CONNECTED:
                return slot.client, slot.generation
            if slot.state is SlotState.NEW:
                raise DeviceConnectionError(f"{method} to device {device_id!r}: not connected; call connect() first",
                                            {device_id: "not connected"})
            if slot.state is SlotState.FAILED:
                why = slot.last_error or last_error or "no attempt finished"
                raise DeviceConnectionError(
                    f"device {device_id!r} is unavailable: not reconnected within operation_timeout "
                    f"({self._operation_timeout:g} s); last error: {why}", {device_id: why})
            left = deadline - time.monotonic()
            if left <= 0:
                why = slot.last_error or last_error
                raise DeviceTimeoutError(
                    f"{method} to device {device_id!r}: no connection within {limit:g} s"
                    + (f"; last error: {why}" if why else ""), device_id)
            self._cond.wait(left)

    def _slot(self, device_id: str) -> Slot:
        slot = self._slots.get(device_id) if isinstance(device_id, str) else None
        if slot is None:
            raise ValueError(f"device_id {device_id!r} is not in this pool")
        return slot

    @staticmethod
    def _timeout(timeout: Optional[float], default: float) -> float:
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
            closers = [threading.Thread(target=self._shutdown, args=(c, max(deadline - time.monotonic(), 0)),
                                        name=f"{self._name}-close", daemon=True) for c in clients]
            for t in closers:
                t.start()
            for t in closers + attempts:
                t.join(max(deadline - time.monotonic(), 0))
        finally:
            self._closed.set()

    def __enter__(self) -> "DevicePool":
        try:
            return self.connect()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
