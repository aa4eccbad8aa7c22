"""DevicePool's moving parts: the supervisor that recreates lost clients, the watchdog that spots
clients which died silently, and the sender that retries an operation across clients.

Each works on the pool's shared state (its slots, under its condition) and is owned by one pool;
the pool's docstring describes the behaviour as a whole.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from azure.iot.device import exceptions as sdk_errors

from ..deadline import Call, call_with_deadline
from ..redaction import redact
from . import wedge
from .client import create_client
from .errors import DeviceConnectionError, DeviceTimeoutError, Recreation
from .slots import RECOVERING, Slot, SlotState

log = logging.getLogger("pytest_iotfailover.devices.pool")

# The SDK serialises every client's pipeline work on one process-wide thread and never bounds a
# shutdown; a client wedged in CONNECTING can take its 60 s CONNACK watchdog to let go.
_SHUTDOWN_TIMEOUT = 5.0
_MIN_SHUTDOWN_WAIT = 0.5  # what a shutdown still gets after a slow revive
# Recreation attempts running at once. Each waits mostly on the network, but more than this
# only queues up behind the SDK's single pipeline thread.
_MAX_PARALLEL_ATTEMPTS = 16
HANDLER_NAMES = ("on_message_received", "on_method_request_received",
                  "on_twin_desired_properties_patch_received")
HANDLER_NAMES = ("on_message_received", "on_method_request_received",
                 "on_twin_desired_properties_patch_received")
# Errors after which the same message may go out again on the same or the next client.
_RETRIABLE = (sdk_errors.ClientError, sdk_errors.OperationCancelled, sdk_errors.OperationTimeout)



class _Closing(Exception):
    """The pool began closing while a recreation attempt was running."""


def describe(exc: BaseException) -> str:
    """An error as one line for reasons and logs, its cause included, secrets redacted."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) != text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class Supervisor:
    """Notices lost clients and recreates them, one attempt thread per device at a time."""

    def __init__(self, pool: Any):
        self.pool = pool

    def prepare(self, slots: list[Slot]) -> None:
        """Give each NEW slot in `slots` a client that connect() will use first. Created on the
        caller's thread, so that bad SDK options raise there rather than turning into an endless
        series of failed attempts."""
        created: list[tuple[Slot, Any]] = []
        spare: list[Any] = []
        try:
            for slot in slots:
                created.append((slot, self._create(slot)))
        except BaseException:
            for _, client in created:
                self._shutdown(client)
            raise
        with self.pool._cond:
            closing = self.pool._closing
            for slot, client in created:
                if not closing and slot.state is SlotState.NEW and slot.client is None:
                    slot.client, slot.fresh, slot.installed = client, True, set()
                else:
                    spare.append(client)  # the pool closed, or a concurrent connect() got there first
        for client in spare:
            self._shutdown(client)

    def _create(self, slot: Slot):
        client = create_client(slot.connection_string, **self.pool._sdk_kwargs)
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
        with self.pool._cond:
            if self.pool._closing or slot.client is not client or slot.state is not SlotState.CONNECTED:
                return  # an old client's farewell, or a loss already being handled
            now = time.monotonic()
            slot.move(SlotState.RECREATING)
            slot.force = force
            slot.attempts, slot.reason, slot.last_error = 0, reason, None
            slot.lost_at = time.time()
            slot.next_at = now + self._delay(0)
            slot.deadline = now + self.pool._operation_timeout
            self.pool._cond.notify_all()
        log.info("%s: device %r: %s; recreating its client", self.pool._name, slot.device_id, reason)

    def _delay(self, attempt: int) -> float:
        return self.pool._backoff.delay(attempt)

    def _notify(self, _call: Call) -> None:
        with self.pool._cond:
            self.pool._cond.notify_all()

    def _start_supervisor(self) -> None:
        if self.pool._supervisor is None:
            self.pool._supervisor = threading.Thread(target=self._supervise, name=f"{self.pool._name}-supervisor",
                                                daemon=True)
            self.pool._supervisor.start()
            self.pool._watchdog = threading.Thread(target=self.pool._wd._watch, name=f"{self.pool._name}-watchdog", daemon=True)
            self.pool._watchdog.start()

    def _supervise(self) -> None:
        with self.pool._cond:
            while not self.pool._closing:
                now = time.monotonic()
                wake = None
                for slot in self.pool._slots.values():
                    if slot.state not in RECOVERING:
                        continue
                    if slot.state is not SlotState.FAILED:
                        if now >= slot.deadline:
                            slot.move(SlotState.FAILED)
                            self.pool._cond.notify_all()
                            log.warning("%s: device %r not back within its deadline: %s", self.pool._name,
                                        slot.device_id, slot.last_error or "no attempt finished")
                        else:
                            wake = slot.deadline if wake is None else min(wake, slot.deadline)
                    if slot.busy:
                        continue
                    if slot.next_at > now:
                        wake = slot.next_at if wake is None else min(wake, slot.next_at)
                    elif len(self.pool._attempt_threads) < _MAX_PARALLEL_ATTEMPTS:
                        slot.busy = True
                        t = threading.Thread(target=self._attempt, args=(slot,), daemon=True,
                                             name=f"{self.pool._name}-recreate:{slot.device_id}")
                        self.pool._attempt_threads.add(t)
                        t.start()
                    # else: a finishing attempt notifies us
                self.pool._cond.wait(None if wake is None else max(wake - now, 0.001))

    def _attempt(self, slot: Slot) -> None:
        client = None
        try:
            with self.pool._cond:
                old, fresh, force = slot.client, slot.fresh, slot.force
                slot.fresh = slot.force = False
            if old is not None and not fresh:
                if not force and old.connected and slot.was_connected:
                    # it came back by itself (the SDK's token renewal reconnects on its own)
                    self._resume(slot, old)
                    return
                self._retire(old, force)
                with self.pool._cond:
                    if slot.client is old:
                        slot.client, slot.installed = None, set()
                old = None
            client = old if fresh else self._create(slot)
            with self.pool._cond:
                if self.pool._closing:
                    raise _Closing()
                slot.client, slot.installed = client, set()
            call_with_deadline(client.connect, self.pool._connect_timeout, f"connect:{slot.device_id}",
                               name=f"{self.pool._name}-connect:{slot.device_id}")
            with slot.handler_lock:
                self._install_handlers(slot, client)
                with self.pool._cond:
                    if self.pool._closing:
                        raise _Closing()
                    if not client.connected:
                        raise sdk_errors.ConnectionDroppedError("lost the connection while subscribing")
                    self._publish(slot, client)
        except BaseException as exc:
            if client is not None:
                self._shutdown(client)
            with self.pool._cond:
                if slot.client is client:
                    slot.client, slot.installed = None, set()
                if not isinstance(exc, _Closing) and not self.pool._closing:
                    slot.attempts += 1
                    slot.last_error = describe(exc)
                    slot.next_at = time.monotonic() + self._delay(slot.attempts)
                    log.info("%s: device %r: attempt %d failed: %s", self.pool._name, slot.device_id,
                             slot.attempts, slot.last_error)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self.pool._cond:
                slot.busy = False
                self.pool._attempt_threads.discard(threading.current_thread())
                self.pool._cond.notify_all()

    def _resume(self, slot: Slot, client) -> None:
        with slot.handler_lock:
            self._install_handlers(slot, client)
            with self.pool._cond:
                if slot.client is client and client.connected and not self.pool._closing:
                    slot.move(SlotState.CONNECTED)
                    self.pool._cond.notify_all()
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
            self.pool._recreations.append(Recreation(slot.device_id, time.time(), reason))
            log.info("%s: device %r recreated (%s)", self.pool._name, slot.device_id, reason)
        slot.was_connected = True
        slot.attempts, slot.last_error = 0, None
        self.pool._cond.notify_all()

    def _retire(self, client, wedged: bool) -> None:
        """Shut a replaced client down and close what it leaves open, within _SHUTDOWN_TIMEOUT."""
        budget = _SHUTDOWN_TIMEOUT
        if wedged:
            # The SDK's shutdown waits for paho to report the disconnect, which a dead network
            # thread never does: it would take the whole budget and hold the device off the hub
            # that long. Reporting the loss for paho first lets the shutdown finish at once.
            started = time.monotonic()
            wedge.revive(client, timeout=budget)
            budget = max(budget - (time.monotonic() - started), _MIN_SHUTDOWN_WAIT)
        self._shutdown(client, budget)
        wedge.release(client)

    def _shutdown(self, client, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        with self.pool._cond:
            if client in self.pool._shut_down:
                return
            self.pool._shut_down.add(client)
        try:
            call_with_deadline(client.shutdown, timeout, "shutdown", name=f"{self.pool._name}-shutdown")
        except Exception as exc:
            # a client already gone, or one wedged in the SDK: either way it is not ours any more
            log.debug("%s: shutting a client down: %s", self.pool._name, describe(exc))

    def _install_handlers(self, slot: Slot, client) -> None:
        """Bring `client`'s SDK handlers in line with the pool's (caller holds slot.handler_lock)."""
        for name in HANDLER_NAMES:
            wanted = self.pool._handlers[name] is not None
            if wanted == (name in slot.installed):
                continue
            value = self._dispatcher(name, slot.device_id) if wanted else None
            # the SDK subscribes (or unsubscribes) before this returns
            call_with_deadline(functools.partial(setattr, client, name, value), self.pool._connect_timeout,
                               f"{name}:{slot.device_id}", name=f"{self.pool._name}-{name}:{slot.device_id}")
            if wanted:
                slot.installed.add(name)
            else:
                slot.installed.discard(name)

    def _dispatcher(self, name: str, device_id: str) -> Callable[[Any], None]:
        # looks the handler up per call, so replacing a handler needs no SDK round trip
        def dispatch(payload):
            handler = self.pool._handlers[name]
            if handler is not None:
                handler(device_id, payload)
        return dispatch

    def _sync_handlers(self, slot: Slot) -> None:
        with slot.handler_lock:
            with self.pool._cond:
                client = slot.client if slot.state is SlotState.CONNECTED else None
            if client is None:
                return  # whoever connects it next installs the handlers then
            try:
                self._install_handlers(slot, client)
            except Exception as exc:
                # a client that cannot subscribe is of no use: replace it even if it looks connected
                self._lost(slot, client, f"subscribing failed ({describe(exc)})", force=True)


class Watchdog:
    """Checks the connected clients for silent deaths (see devices/wedge.py)."""

    def __init__(self, pool: Any):
        self.pool = pool

    def _watch(self) -> None:
        absent_since: dict[str, float] = {}
        while not self.pool._stop_watching.wait(self.pool._watch_interval):
            try:
                self._watch_once(absent_since)
            except Exception as exc:
                log.debug("%s: watchdog: %s", self.pool._name, describe(exc))

    def _watch_once(self, absent_since: dict[str, float]) -> None:
        with self.pool._cond:
            if self.pool._closing:
                return
            live = [(s, s.client) for s in self.pool._slots.values()
                    if s.state is SlotState.CONNECTED and s.client is not None]
        on_hub = None
        if self.pool._liveness_probe is not None:
            try:
                ids = self.pool._liveness_probe()
                on_hub = None if ids is None else set(ids)
            except Exception:
                on_hub = None  # the hub cannot say right now: no opinion
        now = time.monotonic()
        for slot, client in live:
            found = wedge.diagnose(client)
            if found is None and on_hub is not None:
                if slot.device_id not in on_hub and client.connected:
                    since = absent_since.setdefault(slot.device_id, now)
                    if now - since >= self.pool._probe_grace:
                        found = wedge.hub_disagrees(client, slot.device_id, since)
                else:
                    absent_since.pop(slot.device_id, None)
            if found is not None:
                absent_since.pop(slot.device_id, None)
                self._wedged(slot, client, found)

    def _wedged(self, slot: Slot, client, found: wedge.Wedge) -> None:
        with self.pool._cond:
            if slot.client is not client or slot.state is not SlotState.CONNECTED:
                return
            self.pool._wedges.append(found)
        log.warning("%s: %s; replacing the client", self.pool._name, found.text)
        self.pool._sv._lost(slot, client, f"wedged: {found.text}", force=True)


class Sender:
    """Runs an SDK operation on a device's current client, again on the next one if it is lost."""

    def __init__(self, pool: Any):
        self.pool = pool

    def _operate(self, slot: Slot, method: str, arg: Any, deadline: float, limit: float, retry: bool) -> None:
        device_id = slot.device_id
        last_error = None
        while True:
            with self.pool._cond:
                client, generation = self._usable(slot, deadline, limit, method, last_error)
            call = Call(functools.partial(getattr(client, method), arg), f"{self.pool._name}-{method}:{device_id}",
                        self.pool._sv._notify)
            ack_by = None if self.pool._ack_timeout is None else time.monotonic() + self.pool._ack_timeout
            with self.pool._cond:
                while (not call.done.is_set() and slot.generation == generation
                       and slot.state is SlotState.CONNECTED and not self.pool._closing):
                    now = time.monotonic()
                    left = deadline - now
                    if left <= 0:
                        raise DeviceTimeoutError(
                            f"{method} to device {device_id!r} not acknowledged within {limit:g} s", device_id)
                    if ack_by is not None and now >= ack_by:
                        # connected, yet nothing acknowledged: a client that will never answer
                        found = wedge.Wedge(device_id, time.time(), None, None,
                                            f"{device_id}: {method} got no acknowledgement within "
                                            f"{self.pool._ack_timeout:g} s; it still reports connected")
                        wedge.record(found)
                        self.pool._wedges.append(found)
                        self.pool._sv._lost(slot, client, f"wedged: {found.text}", force=True)
                        break
                    self.pool._cond.wait(left if ack_by is None else min(left, max(ack_by - now, 0.001)))
            if call.done.is_set():
                if call.error is None:
                    return
                if not isinstance(call.error, _RETRIABLE):
                    raise call.error
                last_error = describe(call.error)
                if not retry:
                    raise DeviceConnectionError(f"{method} to device {device_id!r} failed: {last_error}",
                                                {device_id: last_error})
                with self.pool._cond:
                    # the state-change event usually follows the failure; give it a moment
                    if slot.generation == generation and slot.state is SlotState.CONNECTED and not self.pool._closing:
                        self.pool._cond.wait(max(min(self.pool._backoff.min, deadline - time.monotonic()), 0.01))
            elif not retry:
                last_error = "the client was lost before the call completed"
                raise DeviceConnectionError(f"{method} to device {device_id!r}: {last_error}",
                                            {device_id: last_error})

    def _usable(self, slot: Slot, deadline: float, limit: float, method: str, last_error: str | None):
        """The device's connected client and its generation (caller holds the condition)."""
        device_id = slot.device_id
        while True:
            if self.pool._closing:
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
                    f"({self.pool._operation_timeout:g} s); last error: {why}", {device_id: why})
            left = deadline - time.monotonic()
            if left <= 0:
                late = slot.last_error or last_error
                raise DeviceTimeoutError(
                    f"{method} to device {device_id!r}: no connection within {limit:g} s"
                    + (f"; last error: {late}" if late else ""), device_id)
            self.pool._cond.wait(left)
