"""A real Azure IoT Hub behind the `Hub` interface.

* Identities: with a service connection string (one with `SharedAccessKeyName=`) every test device
  is created through the registry (azure-iot-hub) as `iotfo-<run prefix>-<name>` and deleted at
  teardown; the run prefix starts with the UTC creation time, so a later run can sweep devices a
  crashed run left behind. A device connection string gives exactly that one device.
* The delivery ledger is read from the hub's built-in Event Hub-compatible endpoint with
  azure-eventhub, from the moment the backend was created, so it already covers a test's first send.
* Faults: the hub's own fault-injection messages, sent through the test's device client, and a
  regional manual failover through an ARM helper. Faults that need control of the hub's network
  stack (blackhole, refusals, lost or late PUBACKs) exist only on the embedded fake hub.

Nothing this module raises, logs or returns as a repr carries a key, a SAS signature or a token.
"""
import asyncio
import datetime
import hashlib
import inspect
import json
import logging
import math
import re
import secrets as _random
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

from ...fakehub.hub import Device, HubEvent, HubOperationError, MethodResponse, Telemetry
from ...iothub.auth import device_connection_string, make_sas_token, parse_connection_string
from ...fakehub.faults import DeviceRecovery, RecoveryReport, tally_messages
from ...iothub.core import c2d_body
from ...iothub.ledger import Ledger
from ...iothub.registry import check_device_id, new_key
from ...redaction import redact, remember
from .. import FaultNotSupported, Hub

__all__ = ["RealBackend", "RealBackendError", "RealFaultHandle", "derive_eventhub_connection_string",
           "telemetry_from_event", "DEVICE_PREFIX"]

log = logging.getLogger(__name__)

DEVICE_PREFIX = "iotfo-"
SWEEP_AGE = 3600.0          # devices of runs older than this are leftovers of a crashed run
SWEEP_LIST_LIMIT = 1000     # what the registry's device listing returns at most
EVENTHUB_OPTION = "--iothub-eventhub-connection"
_LEFTOVER = re.compile(r"^iotfo-(\d{14})[0-9a-f]{4}-")
_RUN_PREFIX = re.compile(r"^[A-Za-z0-9]{1,40}$")
_HTTP_TIMEOUT = (10.0, 60.0)          # (connect, read) seconds for registry and twin calls
_C2D_TIMEOUT = 60.0                   # uamqp's send has no deadline of its own
_LEDGER_CLOCK_SKEW = 2.0              # the hub's clock against ours when choosing where to start
_RECONNECT_OVERLAP = 30.0             # re-read this much before the last event seen; dupes are dropped
_METHOD_TIMEOUT_RANGE = (5, 300)      # what IoT Hub accepts for responseTimeoutInSeconds
_FAULT_POLL = 0.05
_DROP_GRACE = 1.0                     # how late the SDK's state-change callbacks may run
_INVOKE_DURATION = 5                  # DurationInSecs when throttle/auth faults name none, as C# e2e tests
_FAKE_ONLY = {
    "blackhole": "holding connections open in silence",
    "refuse": "answering CONNECT with a chosen CONNACK refusal",
    "drop_before_ack": "closing a connection after accepting a message but before its PUBACK",
    "delay_acks": "delaying PUBACKs",
}
_FAULT_KINDS = ("region_failover", "drop", "throttle", "expire_tokens") + tuple(_FAKE_ONLY)
_FAULT_KWARGS = {
    "region_failover": {"outage", "keep_sessions", "refuse"},
    "drop": {"graceful"},
    "throttle": {"rate", "seconds", "burst", "max_delay"},
    "expire_tokens": {"seconds"},
}


class RealBackendError(Exception):
    """The real-hub backend cannot do what was asked with the credentials it was given."""


# --- the built-in endpoint ---------------------------------------------------------------------

def _split_pairs(cs: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for part in cs.strip().strip(";").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _check_eventhub_connection_string(cs: Any) -> None:
    if not isinstance(cs, str) or not cs.strip():
        raise RealBackendError(f"{EVENTHUB_OPTION} is empty")
    fields = _split_pairs(cs)
    missing = [k for k in ("Endpoint", "SharedAccessKeyName", "SharedAccessKey", "EntityPath")
               if not fields.get(k)]
    if missing:
        raise RealBackendError(
            f"{EVENTHUB_OPTION} lacks {', '.join(missing)}: expected the built-in endpoint's "
            "'Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...;"
            "EntityPath=<Event Hub-compatible name>' (Azure portal: IoT Hub > Built-in endpoints)")
    remember(fields["SharedAccessKey"])


def derive_eventhub_connection_string(connection_string: str, *, timeout: float = 30.0,
                                      ca_bundle: Optional[str] = None, consumer_group: str = "$Default") -> str:
    """The built-in endpoint's Event Hub connection string, asked of the hub itself.

    This is what the azure-eventhub and Azure IoT samples do: open an AMQP receiver on the hub's own
    `amqps://<HostName>/messages/events/ConsumerGroups/<group>/Partitions/0`, authenticated by SASL
    PLAIN as `<policy>@sas.root.<hub name>` with a service SAS token for the hub. IoT Hub answers
    the attach with an `amqp:link:redirect` detach whose info names the Event Hubs namespace
    (`hostname`) and the entity (first segment of `address`); the same policy name and key are
    valid there. A HostName with an explicit `:port` is connected to as given.

    Uses the AMQP client inside azure-eventhub (`azure.eventhub._pyamqp`), which is not a public
    API; when it is missing or the hub does not redirect, RealBackendError says to pass the
    endpoint's connection string with --iothub-eventhub-connection instead.
    """
    fields = parse_connection_string(connection_string)
    host, policy, key = fields["HostName"], fields.get("SharedAccessKeyName"), fields.get("SharedAccessKey")
    if not policy or not key:
        raise RealBackendError(
            f"the built-in endpoint can only be found with a service connection string "
            f"(SharedAccessKeyName=...;SharedAccessKey=...); pass {EVENTHUB_OPTION}")
    remember(key)
    try:
        from azure.eventhub._pyamqp import ReceiveClient
        from azure.eventhub._pyamqp.authentication import SASLPlainAuth
        from azure.eventhub._pyamqp.error import AMQPLinkRedirect
    except ImportError as exc:
        raise RealBackendError(
            f"cannot look up the hub's built-in endpoint ({exc}); install azure-eventhub>=5.11 "
            f"or pass {EVENTHUB_OPTION}") from None
    hub_name = host.split(":")[0].split(".")[0]
    token = make_sas_token(host, key, ttl=max(300.0, timeout * 2), key_name=policy)
    options: Dict[str, Any] = {}
    if ":" in host:
        options["custom_endpoint_address"] = f"amqps://{host}"
    if ca_bundle:
        options["connection_verify"] = ca_bundle
    source = f"amqps://{host}/messages/events/ConsumerGroups/{consumer_group}/Partitions/0"
    client = ReceiveClient(host, source=source, auth=SASLPlainAuth(authcid=f"{policy}@sas.root.{hub_name}",
                                                                   passwd=token), **options)
    outcome: List[Any] = []

    def probe():
        try:
            client.receive_message_batch(max_batch_size=1, timeout=timeout)
            outcome.append(None)
        except AMQPLinkRedirect as redirect:
            outcome.append(redirect)
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)
        finally:
            try:
                client.close()
            except Exception:
                pass
    worker = threading.Thread(target=probe, name="iotfailover:eventhub-redirect", daemon=True)
    worker.start()
    worker.join(timeout + 5.0)
    hint = f"; pass the built-in endpoint's connection string with {EVENTHUB_OPTION}"
    if worker.is_alive() or not outcome:
        raise RealBackendError(f"the hub {host} did not redirect to its built-in endpoint within {timeout:g} s"
                               f" (AMQP port 5671 blocked?){hint}")
    result = outcome[0]
    if not isinstance(result, AMQPLinkRedirect):
        why = "accepted the receiver without redirecting" if result is None else redact(
            f"{type(result).__name__}: {result}")[:300]
        raise RealBackendError(f"looking up the built-in endpoint of {host} failed: {why}{hint}")
    namespace = result.hostname
    path = result.address.split("://", 1)[-1].partition("/")[2]
    entity = path.split("/")[0] or hub_name
    if not namespace:
        raise RealBackendError(f"the hub {host} redirected without naming the Event Hubs namespace{hint}")
    return f"Endpoint=sb://{namespace}/;SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={entity}"


# names as the fake hub spells them (hub/iothub.py), so assertions read the same on either hub
_SYSTEM_NAMES = {
    "message-id": "message_id",
    "correlation-id": "correlation_id",
    "user-id": "user_id",
    "content-type": "content_type",
    "content-encoding": "content_encoding",
    "absolute-expiry-time": "expiry_time_utc",
    "iothub-enqueuedtime": "enqueued_time_utc",
    "iothub-creation-time-utc": "creation_time_utc",
    "iothub-interface-name": "interface_id",
    "dt-subject": "component_name",
    "x-opt-enqueued-time": "eventhub_enqueued_time",
}
_TIME_PROPERTIES = {"absolute-expiry-time", "creation-time", "iothub-enqueuedtime", "x-opt-enqueued-time"}


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _readable_name(raw: str) -> str:
    name = raw.lower()
    if name in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[name]
    for prefix in ("iothub-", "x-opt-"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace("-", "_")


def _utc_ms(value: Any) -> Optional[float]:
    if isinstance(value, datetime.datetime):
        return value.timestamp() * 1000.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _body_bytes(event) -> bytes:
    body = event.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    try:
        parts = list(body)
    except TypeError:
        parts = None
    if parts is not None and all(isinstance(p, (bytes, bytearray, memoryview)) for p in parts):
        return b"".join(bytes(p) for p in parts)
    # a value or sequence body: IoT Hub never produces one, but keep something readable
    return json.dumps(parts if parts is not None else body, default=_text).encode("utf-8")


def telemetry_from_event(event, partition_id: Optional[str] = None, clock: Callable[[], float] = time.time
                         ) -> Optional[Telemetry]:
    """One `EventData` from the built-in endpoint as the fake hub's `Telemetry`; None if no device sent it."""
    sysprops = event.system_properties or {}
    raw = {_text(k): v for k, v in sysprops.items()}
    device_id = _text(raw.get("iothub-connection-device-id")) or None
    if device_id is None:
        return None
    system: Dict[str, str] = {}
    for key, value in raw.items():
        if key.lower() in _TIME_PROPERTIES and _utc_ms(value) is not None:
            value = datetime.datetime.fromtimestamp(_utc_ms(value) / 1000.0, datetime.timezone.utc).isoformat()
        system[_readable_name(key)] = _text(value)
    if partition_id is not None:
        system["partition_id"] = str(partition_id)
    message_id = event.message_id
    message_id = _text(message_id) if message_id is not None else system.get("message_id")
    props = {_text(k): _text(v) for k, v in (event.properties or {}).items()}
    enqueued = _utc_ms(raw.get("iothub-enqueuedtime"))
    if enqueued is not None:
        enqueued_at = enqueued / 1000.0
    elif event.enqueued_time is not None:
        enqueued_at = event.enqueued_time.timestamp()
    else:
        enqueued_at = clock()
    return Telemetry(device_id, message_id, _body_bytes(event), props, system, enqueued_at, False, False, 1)


def _replay_key(t: Telemetry) -> Tuple:
    # The hub stamps iothub-enqueuedtime when it accepts a message: a re-read of the same event
    # (a restarted consumer, a failed-over endpoint) keeps it, a device's own re-send does not.
    stamp = t.system_properties.get("enqueued_time_utc") or t.system_properties.get("eventhub_enqueued_time")
    return (t.device_id, t.message_id, stamp, hashlib.sha1(t.body).hexdigest())


# --- errors from the service -----------------------------------------------------------------------

def _response_of(exc) -> Tuple[Optional[int], Any]:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    try:
        body = json.loads(response.text) if response is not None and response.text else None
    except (ValueError, TypeError, AttributeError):
        body = getattr(response, "text", None)
    return status, body


def _error_code(status: Optional[int], body: Any) -> int:
    if isinstance(body, dict):
        for key in ("errorCode", "ErrorCode"):
            if isinstance(body.get(key), int):
                return body[key]
        # the registry nests a second JSON document in "Message"
        nested = body.get("Message") or body.get("message")
        if isinstance(nested, str) and nested.lstrip().startswith("{"):
            try:
                return _error_code(status, json.loads(nested))
            except ValueError:
                pass
    return (status or 0) * 1000


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "Message", "ExceptionMessage"):
            if isinstance(body.get(key), str):
                return body[key]
    return _text(body)


def _is_http_error(exc: BaseException) -> bool:
    return getattr(getattr(exc, "response", None), "status_code", None) is not None


def _service_failure(what: str, exc: BaseException) -> Exception:
    """What to raise for a failed service call: the hub's answer, or why there was none."""
    if _is_http_error(exc):
        status, body = _response_of(exc)
        code = _error_code(status, body)
        return HubOperationError(redact(f"{what} failed: HTTP {status} ({code}): {_error_text(body)[:300]}"), code)
    return RealBackendError(redact(f"{what} failed: {type(exc).__name__}: {exc}")[:500])


class RealFaultHandle:
    """A fault-injection request sent through device clients, watched from the client side.

    `started_at` is when the hub was asked to act (request + DelayInSecs) or the first disconnect
    seen, whichever came first; `ended_at` is `started_at` + DurationInSecs. `wait()` returns when
    that window is over, `wait_recovered()` when every client is back (or `fault_watch` ran out);
    `report().devices` hold the disconnects and reconnects the clients' state-change callbacks
    (or their `connected` flag) showed. `ignored` names devices whose request the hub simply
    acknowledged, as a hub without fault injection enabled does; `send_errors` those whose client
    failed to send it. A request already sent cannot be withdrawn: `cancel()` only stops the waiting.
    """

    def __init__(self, backend: "RealBackend", kind: str, device_id: Optional[str], params: Dict[str, Any],
                 targets: Dict[str, Any], properties: Dict[str, str], delay: float, duration: float,
                 watch: float):
        self._backend = backend
        self.kind = kind
        self.device_id = device_id
        self._params = dict(params)
        self._targets = dict(targets)
        self.properties = dict(properties)
        self._delay = delay
        self._duration = duration
        self._watch = watch
        self._lock = threading.Lock()
        self._state = "pending"
        self.requested_at: Optional[float] = None
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._started = threading.Event()
        self._done = threading.Event()
        self._watching = threading.Event()
        self.send_errors: Dict[str, str] = {}
        self.ignored: set = set()       # devices whose request the hub acknowledged as plain telemetry
        self._recovery = {d: DeviceRecovery(d) for d in self._targets}
        self._taps: Dict[str, _StateTap] = {}
        self._initially_up: Dict[str, Optional[bool]] = {}

    params = property(lambda self: dict(self._params))
    state = property(lambda self: self._state)
    active = property(lambda self: self._state == "active")

    def _begin(self) -> "RealFaultHandle":
        clock = self._backend._clock
        for device_id, client in self._targets.items():
            self._taps[device_id] = _StateTap(_sdk_client(client, device_id), clock)
            self._initially_up[device_id] = _connected(client, device_id)
        self.requested_at = clock()
        for device_id, client in self._targets.items():
            message = _fault_message(self.properties)
            threading.Thread(target=self._send, args=(device_id, client, message), daemon=True,
                             name=f"iotfailover:fault-{self.kind}-{device_id}").start()
        threading.Thread(target=self._monitor, daemon=True,
                         name=f"iotfailover:fault-watch-{self.kind}").start()
        return self

    def _send(self, device_id: str, client, message) -> None:
        # A hub that honours the request closes the connection before acknowledging it; the SDK
        # keeps the message and sends it again after reconnecting, which is when this returns.
        # Shutting the client down ends it too.
        try:
            _send_through(client, device_id, message)
        except BaseException as exc:
            # A client without its own retry (a pool's) cancels the pending request when the hub
            # drops it, a moment before its state-change callback runs: that is the fault working.
            if not self._await_drop(device_id):
                self.send_errors[device_id] = redact(f"{type(exc).__name__}: {exc}")
            return
        # The SDK can reconnect and have the re-sent request acknowledged before its
        # state-change callbacks have run: give them a moment before calling the request ignored.
        if not self._await_drop(device_id) and _connected(client, device_id) is not False:
            # acknowledged on the connection it was meant to kill: taken for ordinary telemetry
            self.ignored.add(device_id)
            log.warning("IoT Hub acknowledged the %s request of device %r without acting on it: it honours "
                        "fault-injection messages only where Microsoft enabled them", self.properties.get(
                            "AzIoTHub_FaultOperationType"), device_id)

    def _dropped(self, device_id: str) -> bool:
        return bool(self._changes(device_id)) or self._recovery[device_id].disconnected_at is not None

    def _await_drop(self, device_id: str) -> bool:
        grace = time.monotonic() + _DROP_GRACE
        while not self._dropped(device_id) and time.monotonic() < grace:
            time.sleep(0.01)
        return self._dropped(device_id)

    def _monitor(self) -> None:
        clock = self._backend._clock
        start_at = self.requested_at + self._delay
        deadline = time.monotonic() + self._delay + self._duration + self._watch
        try:
            while time.monotonic() < deadline and self._state != "cancelled":
                now = clock()
                for device_id, client in self._targets.items():
                    self._observe(device_id, client, self._initially_up[device_id], now)
                disconnected = any(r.disconnected_at is not None for r in self._recovery.values())
                with self._lock:
                    if self._state == "pending" and (now >= start_at or disconnected):
                        self._state = "active"
                        self.started_at = min(now, start_at)
                        self._started.set()
                    if self._state == "active" and now >= self.started_at + self._duration:
                        self._state = "ended"
                        self.ended_at = self.started_at + self._duration
                        self._done.set()
                failed = [d for d in self._targets if d in self.ignored or d in self.send_errors]
                settled = all(r.reconnected_at is not None or d in failed
                              or _connected(self._targets[d], d) is None for d, r in self._recovery.items())
                if settled and (self._state == "ended" or len(failed) == len(self._targets)):
                    break
                time.sleep(_FAULT_POLL)
        finally:
            for tap in self._taps.values():
                tap.remove()
            with self._lock:
                if self._state in ("pending", "active"):
                    if self.started_at is None:
                        self.started_at = start_at
                    self._state = "ended"
                    self.ended_at = self.started_at + self._duration
                self._started.set()
                self._done.set()
            self._watching.set()

    def _observe(self, device_id: str, client, initially_up: Optional[bool], now: float) -> None:
        rec = self._recovery[device_id]
        if not initially_up:
            return  # nothing to lose
        tap = self._taps[device_id]
        # The SDK reconnects within milliseconds of a drop, too fast for polling to see reliably;
        # its state-change callbacks see it. They run late, on the SDK's handler thread, so the
        # state each one reads may already be the next one; polling covers clients without
        # callbacks (a pool's replacement client).
        tapped = tap.installed and _sdk_client(client, device_id) is tap.client
        changes = self._changes(device_id)
        up = _connected(client, device_id)
        if rec.disconnected_at is None:
            downs = [t for t, state in changes if state is False]
            if downs:
                rec.disconnected_at = downs[0]
            elif len(changes) >= 2:
                rec.disconnected_at = changes[0][0]  # the reconnect came before the first callback ran
            elif up is False:
                rec.disconnected_at = now
            else:
                return
            rec.detected_at = rec.disconnected_at
        if rec.reconnected_at is None:
            ups = [t for t, state in changes if state and t > rec.disconnected_at]
            if ups:
                rec.reconnected_at = ups[0]
            elif up and not tapped:
                rec.reconnected_at = now

    def _changes(self, device_id: str) -> List[Tuple[float, Optional[bool]]]:
        # a callback still queued from before the request (the client's own connect) is not the fault's
        return [c for c in list(self._taps[device_id].changes) if c[0] >= self.requested_at]

    def wait_started(self, timeout: Optional[float] = 30.0) -> "RealFaultHandle":
        if not self._started.wait(timeout):
            raise TimeoutError(f"fault {self.kind} did not start within {timeout:g} s")
        if self._state == "cancelled" and self.started_at is None:
            raise RuntimeError(f"fault {self.kind} was cancelled before it started")
        return self

    def wait(self, timeout: Optional[float] = 60.0) -> "RealFaultHandle":
        """Block until the fault's window is over; TimeoutError if it is not by then."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"fault {self.kind} still {self._state} after {timeout:g} s")
        return self

    def wait_recovered(self, timeout: Optional[float] = 60.0) -> "RealFaultHandle":
        """Block until every targeted client is back (or the watch ended); the report is final then."""
        if not self._watching.wait(timeout):
            missing = ", ".join(d for d, r in self._recovery.items() if r.reconnected_at is None)
            raise TimeoutError(f"clients hit by {self.kind} not all back after {timeout:g} s: {missing}")
        return self

    def cancel(self) -> "RealFaultHandle":
        with self._lock:
            if self._state in ("pending", "active"):
                self._state = "cancelled"
                self.ended_at = self._backend._clock()
        self._started.set()
        self._done.set()
        return self

    def report(self) -> RecoveryReport:
        rep = RecoveryReport(self.kind, self.device_id, self.params, self.started_at, self.ended_at)
        if self.started_at is None:
            return rep
        for device_id, rec in self._recovery.items():
            rep.devices[device_id] = DeviceRecovery(device_id, rec.disconnected_at, rec.detected_at,
                                                    rec.reconnected_at)
        tally_messages(rep, self._backend.telemetry(list(self._targets)))
        return rep

    def __enter__(self) -> "RealFaultHandle":
        return self

    def __exit__(self, *exc) -> None:
        if self._state in ("pending", "active"):
            self.cancel()

    def __repr__(self):
        return f"<RealFaultHandle {self.kind} {self._state}{' @' + self.device_id if self.device_id else ''}>"


class _FailoverHandle:
    """The ARM helper's failover handle; once it is over, the ledger follows the moved endpoint."""

    def __init__(self, backend: "RealBackend", inner, params: Dict[str, Any]):
        self._backend = backend
        self._inner = inner
        self.kind = "region_failover"
        self.device_id = None
        self._params = params
        self._reconnected = False

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def params(self) -> Dict[str, Any]:
        inner = getattr(self._inner, "params", None)
        return dict(self._params, **(inner if isinstance(inner, dict) else {}))

    def wait(self, *args, **kwargs):
        self._inner.wait(*args, **kwargs)
        if not self._reconnected:
            self._reconnected = True
            self._backend.reconnect_ledger()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        exit_ = getattr(self._inner, "__exit__", None)  # an ARM failover cannot be cancelled
        if exit_ is not None:
            exit_(*exc)

    def __repr__(self):
        return f"<region_failover via ARM: {self._inner!r}>"


class _StateTap:
    """Times a client's connection-state changes, still calling the handler it already had."""

    def __init__(self, client, clock: Callable[[], float]):
        self.client = client
        self.changes: List[Tuple[float, Optional[bool]]] = []  # (when, `connected` as the callback saw it)
        self.previous = getattr(client, "on_connection_state_change", None)
        previous = self.previous

        def note():
            self.changes.append((clock(), getattr(client, "connected", None)))
        if inspect.iscoroutinefunction(previous):
            async def tap():
                note()
                await previous()
        else:
            def tap():
                note()
                if previous is not None:
                    previous()
        self.tap = tap
        self.installed = False
        if hasattr(client, "on_connection_state_change"):
            try:
                client.on_connection_state_change = tap
                self.installed = True
            except Exception:
                pass  # polling only

    def remove(self) -> None:
        # only if nobody replaced it meanwhile
        if self.installed and getattr(self.client, "on_connection_state_change", None) is self.tap:
            try:
                self.client.on_connection_state_change = self.previous
            except Exception:
                pass
        self.installed = False


def _fault_message(properties: Dict[str, str]):
    from azure.iot.device import Message
    message = Message("", message_id=f"iotfo-fault-{uuid.uuid4().hex[:16]}")
    message.custom_properties.update(properties)
    return message


async def _await(awaitable):
    return await awaitable


def _sdk_client(client, device_id: str):
    if hasattr(client, "send_message"):
        return client
    # A DevicePool: its current client for the device. Not pool.send(), which retries on a new
    # client after the drop and so would ask the hub for the fault again and again.
    clients = getattr(client, "clients", None)
    return clients.get(device_id) if isinstance(clients, dict) else None


def _send_through(client, device_id: str, message) -> None:
    sdk_client = _sdk_client(client, device_id)
    if sdk_client is None:
        raise RuntimeError(f"no client for {device_id!r} to send the fault request through")
    result = sdk_client.send_message(message)
    if inspect.isawaitable(result):
        # an aio client: its pipeline runs on the SDK's own threads, any event loop can wait on it
        asyncio.run(_await(result))


def _connected(client, device_id: str) -> Optional[bool]:
    sdk_client = _sdk_client(client, device_id)
    if sdk_client is None:
        return False if hasattr(client, "clients") else None
    return bool(sdk_client.connected) if hasattr(sdk_client, "connected") else None


def _whole_seconds(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return int(math.ceil(value))


class RealBackend(Hub):
    """A real IoT Hub: ephemeral devices, a ledger from the built-in endpoint, injected faults."""

    kind = "real"
    ca_pem = None

    def __init__(self, connection_string: str, *, eventhub_connection_string: Optional[str] = None,
                 run_prefix: Optional[str] = None, registry=None, eventhub_consumer_factory=None,
                 sweep: bool = True, clock: Callable[[], float] = time.time, arm=None,
                 ca_bundle: Optional[str] = None, consumer_group: str = "$Default",
                 fault_watch: float = 60.0):
        """`registry`: an IoTHubRegistryManager (default: one for `connection_string`).
        `eventhub_consumer_factory(connection_string)`: an EventHubConsumerClient-like object
        (default: EventHubConsumerClient.from_connection_string). `arm`: the ARM failover helper,
        without which `region_failover` is unavailable. `ca_bundle`: a PEM file to trust for the
        hub's HTTPS and AMQP endpoints (a TLS-inspecting proxy, a test stub)."""
        if not isinstance(connection_string, str):
            raise RealBackendError("--iothub-connection must be a connection string")
        try:
            fields = parse_connection_string(connection_string)
        except ValueError as exc:
            raise RealBackendError(f"--iothub-connection: {redact(str(exc))}") from None
        for secret in (fields.get("SharedAccessKey"), fields.get("SharedAccessSignature")):
            remember(secret)
        self._connection_string = connection_string
        self._clock = clock
        self.hostname = fields["HostName"]
        self.created_at = clock()
        self._ca_bundle = ca_bundle
        self._consumer_group = consumer_group
        self._arm = arm
        self._fault_watch = float(fault_watch)
        self._lock = threading.RLock()
        self._devices: Dict[str, Device] = {}
        self._aliases: Dict[str, str] = {}
        self._ours: set = set()
        self._clients: Dict[str, Any] = {}
        self._epochs: Dict[str, int] = {}
        self._registry = None
        self._consumer = None
        self._consumer_thread: Optional[threading.Thread] = None
        self._closed = False
        self._failed_over = False
        if "SharedAccessKeyName" in fields:
            if "SharedAccessKey" not in fields:
                raise RealBackendError("--iothub-connection: a service connection string needs SharedAccessKey=")
            self.mode = "service"
            self._single: Optional[Device] = None
        elif "DeviceId" in fields:
            if "ModuleId" in fields:
                raise RealBackendError("--iothub-connection: a module connection string is not supported; "
                                       "give a device or service connection string")
            if "SharedAccessKey" not in fields:
                raise RealBackendError("--iothub-connection: a device connection string needs SharedAccessKey= "
                                       "(X.509 and SAS-token connection strings are not supported)")
            self.mode = "device"
            # verbatim: a GatewayHostName in it (an IoT Edge gateway) is part of how the device connects
            self._single = Device(fields["DeviceId"], fields["SharedAccessKey"], connection_string.strip())
        else:
            raise RealBackendError("--iothub-connection: expected a service connection string "
                                   "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...) or a device one "
                                   "(HostName=...;DeviceId=...;SharedAccessKey=...)")
        if run_prefix is None:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.created_at))
            run_prefix = stamp + _random.token_hex(2)
        elif not isinstance(run_prefix, str) or not _RUN_PREFIX.match(run_prefix):
            raise ValueError(f"run_prefix must be 1-40 ASCII letters and digits, got {run_prefix!r}")
        self.run_prefix = run_prefix

        self.ledger = Ledger()
        self.ledger_errors: List[str] = []
        self._replays: set = set()
        self._last_seen: Dict[str, float] = {}
        self._partitions: set = set()
        self._consumer_factory = (self._default_consumer if eventhub_consumer_factory is None
                                  else eventhub_consumer_factory)
        self._eventhub_derived = eventhub_connection_string is None
        if eventhub_connection_string is None and self.mode == "device":
            raise RealBackendError(
                f"with a device connection string the delivery ledger needs the built-in endpoint's own "
                f"connection string: pass {EVENTHUB_OPTION} (a device key cannot read it)")
        if eventhub_connection_string is not None:
            _check_eventhub_connection_string(eventhub_connection_string)
        try:
            if self.mode == "service":
                self._registry = registry if registry is not None else self._open_registry()
                if sweep:
                    self.sweep_leftovers()
            if eventhub_connection_string is None:
                eventhub_connection_string = self._derive_eventhub()
                _check_eventhub_connection_string(eventhub_connection_string)
            self._eventhub_cs = eventhub_connection_string
            self._start_consumer(self.created_at - _LEDGER_CLOCK_SKEW)
        except BaseException:
            self.close()
            raise

    # --- plumbing ----------------------------------------------------------------------------

    def _open_registry(self):
        try:
            from azure.iot.hub import IoTHubRegistryManager
        except ImportError as exc:
            raise RealBackendError(f"a real hub with a service connection string needs azure-iot-hub and six "
                                   f"(which it uses without declaring it): pip install azure-iot-hub six ({exc})"
                                   ) from None
        try:
            registry = IoTHubRegistryManager.from_connection_string(self._connection_string)
        except Exception as exc:
            raise RealBackendError(f"--iothub-connection: {redact(str(exc))}") from None
        config = getattr(getattr(registry, "protocol", None), "config", None)
        if config is not None:
            config.connection.timeout = _HTTP_TIMEOUT
            if self._ca_bundle:
                config.connection.verify = self._ca_bundle
        return registry

    def _derive_eventhub(self) -> str:
        return derive_eventhub_connection_string(self._connection_string, ca_bundle=self._ca_bundle,
                                                 consumer_group=self._consumer_group)

    def _default_consumer(self, eventhub_connection_string: str):
        try:
            from azure.eventhub import EventHubConsumerClient
        except ImportError as exc:
            raise RealBackendError(f"the delivery ledger of a real hub needs azure-eventhub: "
                                   f"pip install azure-eventhub ({exc})") from None
        options = {"connection_verify": self._ca_bundle} if self._ca_bundle else {}
        return EventHubConsumerClient.from_connection_string(eventhub_connection_string,
                                                             consumer_group=self._consumer_group, **options)

    def _need_service(self, what: str):
        if self._registry is None:
            raise RealBackendError(
                f"{what} needs a service connection string (HostName=...;SharedAccessKeyName=...;"
                f"SharedAccessKey=...) in --iothub-connection; a device connection string cannot act as "
                f"the service")
        return self._registry

    def _resolve(self, device_id: str) -> str:
        with self._lock:
            if device_id in self._devices:
                return device_id
            return self._aliases.get(device_id, device_id)

    @staticmethod
    def _call(what: str, fn, *args):
        try:
            return fn(*args)
        except (RealBackendError, HubOperationError):
            raise
        except Exception as exc:
            raise _service_failure(what, exc) from None

    # --- identities --------------------------------------------------------------------------

    def create_device(self, device_id: str) -> Device:
        if self.mode == "device":
            with self._lock:
                if self._single.device_id in self._devices:
                    raise RealBackendError(
                        "a device connection string gives one device; device_client_factory(count>1), pools and a "
                        "second iothub_device need a service connection string (SharedAccessKeyName=...)")
                self._devices[self._single.device_id] = self._single
                self._ours.add(self._single.device_id)
                # every test gets this same device: it sees only what arrives from now on
                self._epochs[self._single.device_id] = len(self.ledger)
                if device_id != self._single.device_id:
                    self._aliases[device_id] = self._single.device_id
            return self._single
        check_device_id(device_id)
        full_id = device_id if device_id.startswith(f"{DEVICE_PREFIX}{self.run_prefix}-") else \
            f"{DEVICE_PREFIX}{self.run_prefix}-{device_id}"
        check_device_id(full_id)
        primary, secondary = new_key(), new_key()
        remember(primary, secondary)
        with self._lock:
            # telemetry may reach the ledger before the registry call has returned
            self._ours.add(full_id)
        self._call(f"creating device {full_id!r}", self._registry.create_device_with_sas,
                   full_id, primary, secondary, "enabled")
        device = Device(full_id, primary, device_connection_string(self.hostname, full_id, primary), secondary)
        with self._lock:
            self._devices[full_id] = device
            if device_id != full_id:
                self._aliases[device_id] = full_id
        return device

    def delete_device(self, device_id: str) -> None:
        full_id = self._resolve(device_id)
        with self._lock:
            self._clients.pop(full_id, None)
            self._devices.pop(full_id, None)
        if self.mode == "device":
            return  # not ours to delete
        try:
            self._call(f"deleting device {full_id!r}", self._registry.delete_device, full_id)
        except HubOperationError as exc:
            if exc.error_code // 1000 != 404:  # already gone is what we wanted
                raise

    def sweep_leftovers(self, max_age: float = SWEEP_AGE) -> List[str]:
        """Delete `iotfo-` devices of runs that started more than `max_age` s ago; warn, never fail."""
        registry = self._need_service("sweeping leftover devices")
        now = self._clock()
        try:
            listed = registry.get_devices(SWEEP_LIST_LIMIT) or []
        except Exception as exc:
            warnings.warn(redact(f"pytest-iotfailover: could not list devices to sweep leftovers: "
                                 f"{type(exc).__name__}: {exc}")[:500], RuntimeWarning, stacklevel=2)
            return []
        removed = []
        for item in listed:
            device_id = getattr(item, "device_id", None) or (
                item.get("deviceId") if isinstance(item, dict) else None)
            m = _LEFTOVER.match(device_id or "")
            if not m:
                continue
            try:
                born = datetime.datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
            except ValueError:
                continue
            if now - born <= max_age:
                continue
            try:
                registry.delete_device(device_id)
                removed.append(device_id)
            except Exception as exc:
                warnings.warn(redact(f"pytest-iotfailover: could not delete leftover device {device_id!r}: "
                                     f"{type(exc).__name__}: {exc}")[:500], RuntimeWarning, stacklevel=2)
        if removed:
            log.info("deleted %d leftover devices of earlier runs", len(removed))
        return removed

    def register_client(self, device_id: str, client) -> None:
        """The device client faults are injected through (the hub's fault requests are D2C messages)."""
        if not (hasattr(client, "send_message") or isinstance(getattr(client, "clients", None), dict)):
            raise TypeError(f"register_client needs a device client with send_message() or a DevicePool, "
                            f"not {type(client).__name__}")
        with self._lock:
            self._clients[self._resolve(device_id)] = client

    def unregister_client(self, device_id: str, client=None) -> None:
        with self._lock:
            full_id = self._resolve(device_id)
            if client is None or self._clients.get(full_id) is client:
                self._clients.pop(full_id, None)

    # --- the ledger ----------------------------------------------------------------------------

    def _start_consumer(self, start: float) -> None:
        consumer = self._consumer_factory(self._eventhub_cs)
        position = datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
        self._consumer = consumer
        self._consumer_thread = threading.Thread(target=self._consume, args=(consumer, position),
                                                 name="iotfailover:eventhub-ledger", daemon=True)
        self._consumer_thread.start()

    def _consume(self, consumer, position: datetime.datetime) -> None:
        try:
            consumer.receive(on_event=self._on_event, on_error=self._on_consumer_error,
                             on_partition_initialize=self._on_partition, starting_position=position,
                             starting_position_inclusive=True)
        except Exception as exc:
            if consumer is self._consumer and not self._closed:
                self._on_consumer_error(None, exc)

    def _on_partition(self, context) -> None:
        pid = getattr(context, "partition_id", None)
        if pid is not None:
            with self._lock:
                self._partitions.add(pid)

    def _on_consumer_error(self, context, exc) -> None:
        pid = getattr(context, "partition_id", None)
        where = f" (partition {pid})" if pid is not None else ""
        text = redact(f"reading the built-in endpoint{where}: {type(exc).__name__}: {exc}")[:500]
        self.ledger_errors.append(text)
        log.warning("%s", text)

    def _on_event(self, context, event) -> None:
        if event is None:
            return
        pid = getattr(context, "partition_id", None)
        enqueued = getattr(event, "enqueued_time", None)
        if pid is not None and enqueued is not None:
            with self._lock:
                self._partitions.add(pid)
                self._last_seen[pid] = max(self._last_seen.get(pid, 0.0), enqueued.timestamp())
        try:
            t = telemetry_from_event(event, pid, self._clock)
        except Exception as exc:
            self._on_consumer_error(context, exc)
            return
        if t is None:
            return
        with self._lock:
            if t.device_id not in self._ours:
                return
            key = _replay_key(t)
            if key in self._replays:
                return
            self._replays.add(key)
        self.ledger.record(t)

    def _stop_consumer(self, timeout: float = 10.0) -> None:
        consumer, thread = self._consumer, self._consumer_thread
        self._consumer = self._consumer_thread = None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:
                log.warning("%s", redact(f"closing the built-in endpoint reader: {exc}"))
        if thread is not None:
            thread.join(timeout)

    def reconnect_ledger(self, eventhub_connection_string: Optional[str] = None) -> None:
        """Restart the ledger's reader, e.g. after a failover moved the built-in endpoint.

        It starts again a little before the last event seen on any partition (or the backend's
        start); events read twice are recorded once. A derived endpoint is looked up again."""
        if eventhub_connection_string is not None:
            _check_eventhub_connection_string(eventhub_connection_string)
        self._stop_consumer()
        if eventhub_connection_string is not None:
            self._eventhub_cs = eventhub_connection_string
            self._eventhub_derived = False
        elif self._eventhub_derived:
            self._eventhub_cs = self._derive_eventhub()
        with self._lock:
            floor = self.created_at - _LEDGER_CLOCK_SKEW
            seen = [self._last_seen.get(p, floor) for p in self._partitions] or [floor]
        self._start_consumer(max(min(seen) - _RECONNECT_OVERLAP, floor))

    def telemetry(self, device_ids: Optional[Collection[str]] = None) -> List[Telemetry]:
        items = self.ledger.items()
        if self._epochs:
            items = [t for i, t in enumerate(items) if i >= self._epochs.get(t.device_id, 0)]
        if device_ids is None:
            return items
        wanted = {self._resolve(d) for d in device_ids}
        return [t for t in items if t.device_id in wanted]

    def wait_until(self, predicate, timeout):
        return self.ledger.wait_until(predicate, timeout)

    def events(self, device_ids: Optional[Collection[str]] = None) -> List[HubEvent]:
        """Always empty: a real hub keeps no connection log this backend could read (Azure Monitor's
        connection logs arrive minutes late), so recovery is measured from the clients' side."""
        return []

    # --- service operations ------------------------------------------------------------------

    def send_c2d(self, device_id: str, body, properties=None) -> str:
        registry = self._need_service("send_c2d")
        body = c2d_body(body)
        props = {str(k): ("" if v is None else str(v)) for k, v in (properties or {}).items()}
        props.setdefault("messageId", f"c2d-{uuid.uuid4()}")
        full_id = self._resolve(device_id)
        outcome: List[Any] = []

        def send():
            try:
                outcome.append(registry.send_c2d_message(full_id, bytes(body), props))
            except BaseException as exc:
                outcome.append(exc)
        worker = threading.Thread(target=send, name="iotfailover:c2d", daemon=True)
        worker.start()
        worker.join(_C2D_TIMEOUT)
        if worker.is_alive():
            raise RealBackendError(f"sending a C2D message to {full_id!r} did not finish within "
                                   f"{_C2D_TIMEOUT:g} s (AMQP port 5671 blocked?)")
        if outcome and isinstance(outcome[0], BaseException):
            raise _service_failure(f"sending a C2D message to {full_id!r}", outcome[0]) from None
        return props["messageId"]

    def invoke_method(self, device_id: str, method_name: str, payload=None,
                      timeout: float = 30.0) -> MethodResponse:
        registry = self._need_service("invoke_method")
        from azure.iot.hub.models import CloudToDeviceMethod
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"method timeout must be a positive number of seconds, got {timeout!r}")
        low, high = _METHOD_TIMEOUT_RANGE
        if timeout > high:
            raise ValueError(f"IoT Hub waits at most {high} s for a direct method response, got {timeout!r}")
        seconds = max(low, int(math.ceil(timeout)))
        full_id = self._resolve(device_id)
        request = CloudToDeviceMethod(method_name=method_name, payload=payload,
                                      response_timeout_in_seconds=seconds, connect_timeout_in_seconds=0)
        devices_api = getattr(getattr(registry, "protocol", None), "devices", None)
        try:
            if devices_api is not None:
                # the registry manager's own call keeps its 60 s read timeout; a method may take longer
                result = devices_api.invoke_method(full_id, request, timeout=(_HTTP_TIMEOUT[0], seconds + 30))
            else:
                result = registry.invoke_device_method(full_id, request)
        except Exception as exc:
            status, body = _response_of(exc) if _is_http_error(exc) else (None, None)
            code = _error_code(status, body)
            if status in (404, 504) and code != 404001:
                # offline, or no answer in time: an outcome of the call, as on the fake hub, not an error
                fallback = "device is not online" if status == 404 else f"device did not answer within {seconds} s"
                return MethodResponse(status, {"errorCode": code, "message": _error_text(body)[:300] or fallback})
            raise _service_failure(f"invoking {method_name!r} on {full_id!r}", exc) from None
        return MethodResponse(int(result.status), result.payload)

    def get_twin(self, device_id: str) -> Dict[str, Any]:
        registry = self._need_service("get_twin")
        full_id = self._resolve(device_id)
        twin = self._call(f"reading the twin of {full_id!r}", registry.get_twin, full_id)
        props = getattr(twin, "properties", None)
        out = {}
        for part in ("desired", "reported"):
            section = dict(getattr(props, part, None) or {})
            out[part] = _without_metadata(section)
            out[part].setdefault("$version", section.get("$version", 1))
        return out

    def update_desired(self, device_id: str, patch: Dict[str, Any]) -> int:
        registry = self._need_service("update_desired")
        if not isinstance(patch, dict):
            raise HubOperationError("desired patch must be a JSON object (dict)", 400004)
        try:
            json.dumps(patch)
        except (TypeError, ValueError) as exc:
            raise HubOperationError(f"desired patch is not JSON-serialisable: {exc}", 400004) from None
        from azure.iot.hub.models import Twin, TwinProperties
        full_id = self._resolve(device_id)
        twin = self._call(f"updating the desired properties of {full_id!r}", registry.update_twin,
                          full_id, Twin(properties=TwinProperties(desired=patch)), "*")
        desired = getattr(getattr(twin, "properties", None), "desired", None) or {}
        version = desired.get("$version")
        if not isinstance(version, int):
            raise RealBackendError(f"the hub's answer to the twin update of {full_id!r} has no desired $version")
        return version

    # --- faults ------------------------------------------------------------------------------

    def start_fault(self, kind: str, **kwargs):
        if kind in _FAKE_ONLY:
            raise FaultNotSupported(f"{kind} cannot be produced on a real IoT Hub: it needs "
                                    f"{_FAKE_ONLY[kind]}, which only the embedded fake hub can do")
        if kind not in _FAULT_KINDS:
            raise FaultNotSupported(f"unknown fault {kind!r}; a real hub knows {', '.join(_FAULT_KINDS[:4])}")
        device_id = kwargs.pop("device_id", None)
        at = kwargs.pop("at", None)
        after_messages = kwargs.pop("after_messages", None)
        unknown = set(kwargs) - _FAULT_KWARGS[kind]
        if unknown:
            raise TypeError(f"{kind}() got unexpected keyword arguments {', '.join(sorted(unknown))}")
        if after_messages is not None:
            raise FaultNotSupported("after_messages= needs the hub to count accepted messages as they arrive; "
                                    "a real hub cannot: use at= instead")
        if kind == "region_failover":
            return self._region_failover(device_id, at, kwargs)
        if kind == "drop":
            graceful = kwargs.get("graceful", False)
            if not isinstance(graceful, bool):
                raise TypeError(f"graceful must be True or False, got {graceful!r}")
            operation, duration = ("ShutDownMqtt" if graceful else "KillTcp"), 0
        else:
            operation = "InvokeThrottling" if kind == "throttle" else "InvokeAuthError"
            seconds = kwargs.get("seconds")
            duration = _whole_seconds("seconds", _INVOKE_DURATION if seconds is None else seconds)
        delay = _whole_seconds("at", at) if at is not None else 1
        properties = {"AzIoTHub_FaultOperationType": operation, "AzIoTHub_FaultOperationCloseReason": "boom",
                      "AzIoTHub_FaultOperationDelayInSecs": str(delay)}
        if operation.startswith("Invoke"):
            properties["AzIoTHub_FaultOperationDurationInSecs"] = str(duration)
        targets = self._fault_targets(kind, device_id)
        params = dict(kwargs, operation=operation, delay=delay, duration=duration)
        handle = RealFaultHandle(self, kind, None if device_id is None else self._resolve(device_id), params,
                                 targets, properties, float(delay), float(duration), self._fault_watch)
        return handle._begin()

    def _fault_targets(self, kind: str, device_id: Optional[str]) -> Dict[str, Any]:
        with self._lock:
            if device_id is not None:
                full_id = self._resolve(device_id)
                client = self._clients.get(full_id)
                if client is None:
                    raise RealBackendError(
                        f"{kind} on a real hub is requested through the device's own client, and none is "
                        f"registered for {full_id!r}: connect one (device_client / device_client_factory) or call "
                        f"register_client({full_id!r}, client)")
                return {full_id: client}
            if not self._clients:
                raise RealBackendError(f"{kind} on a real hub is requested through device clients, and none is "
                                       "registered: connect one first or call register_client(device_id, client)")
            return dict(self._clients)

    def _region_failover(self, device_id, at, kwargs):
        opt_in = ("a regional failover of a real IoT Hub is a manual failover through Azure Resource Manager "
                  "and must be allowed explicitly: pass --iothub-allow-failover=<hub name>, --iothub-subscription "
                  "and --iothub-resource-group (10 min to 2 h of disruption; 2 failovers and 2 failbacks a day)")
        if self._arm is None:
            raise FaultNotSupported(opt_in)
        if device_id is not None:
            raise FaultNotSupported("a regional failover moves the whole hub; device_id= cannot narrow it "
                                    "on a real hub")
        if at:
            raise FaultNotSupported("a real regional failover starts when requested; at= is not available")
        # without the opt-in, ArmFailover raises FailoverNotAllowed: the test errors (it asked for
        # something it may not have) rather than skipping quietly
        inner = self._arm.failover()
        self._failed_over = True
        return _FailoverHandle(self, inner, dict(kwargs))

    def finish(self, failback: bool = False) -> None:
        """End of the session: with `failback`, return a hub this run failed over to its first region."""
        if failback and self._arm is not None and self._failed_over:
            self._arm.failback().wait()
            self._failed_over = False

    # --- life cycle ----------------------------------------------------------------------------

    def client_kwargs(self) -> Dict[str, Any]:
        return {}  # the hub's certificate chains to a public CA the SDK already trusts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_consumer()
        registry, self._registry = self._registry, None
        if registry is not None:
            amqp = getattr(registry, "amqp_svc_client", None)
            for closer in (getattr(amqp, "disconnect_sync", None),
                           getattr(getattr(registry, "protocol", None), "close", None)):
                if closer is not None:
                    try:
                        closer()
                    except Exception as exc:
                        log.warning("%s", redact(f"closing the registry client: {exc}"))

    def __repr__(self):
        ledger = getattr(self, "ledger", None)
        return (f"<RealBackend {getattr(self, 'mode', '?')} {self.hostname} "
                f"run={getattr(self, 'run_prefix', '?')} devices={len(self._devices)} "
                f"ledger={len(ledger) if ledger is not None else 0}>")


def _without_metadata(section: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in section.items():
        if key == "$metadata":
            continue
        out[key] = _without_metadata(value) if isinstance(value, dict) else value
    return out
