"""The delivery ledger of a real hub, read from its built-in Event Hub-compatible
endpoint.

The endpoint's connection string is given (--iothub-eventhub-connection) or asked of
the hub itself; azure-eventhub reads every partition from the moment the backend was
created, so the ledger already covers a test's first send.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ...iothub.auth import parse_connection_string
from ...iothub.ledger import Telemetry
from ...redaction import redact, remember
from ...sas import make_sas_token
from ...waiting import WaitingLedger as Ledger
from .errors import RealBackendError, text_of

__all__ = ["EVENTHUB_OPTION", "EndpointLedger", "check_eventhub_connection_string",
           "default_consumer_factory", "derive_eventhub_connection_string",
           "parse_eventhub_connection_string", "telemetry_from_event"]

log = logging.getLogger(__name__)

EVENTHUB_OPTION = "--iothub-eventhub-connection"
LEDGER_CLOCK_SKEW = 2.0  # the hub's clock against ours when choosing where to start
# re-read this much before the last event seen; what is read twice is dropped
RECONNECT_OVERLAP = 30.0
_EVENTHUB_KEYS = ("Endpoint", "SharedAccessKeyName", "SharedAccessKey", "EntityPath")
_EVENTHUB_FORM = (
    "'Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;"
    "SharedAccessKey=...;EntityPath=<Event Hub-compatible name>' "
    "(Azure portal: IoT Hub > Built-in endpoints)"
)
_LOOKUP_HINT = ("; pass the built-in endpoint's connection string with "
                f"{EVENTHUB_OPTION}")


# --- the endpoint's connection string -------------------------------------------------


def parse_eventhub_connection_string(cs: str) -> dict[str, str]:
    """`Key=value;...` of an Event Hubs connection string; segments without `=` are
    skipped. Its keys (Endpoint, EntityPath) are not an IoT Hub connection string's,
    so iothub.auth's parser cannot take it: this is the backend's only other one."""
    out: dict[str, str] = {}
    for part in cs.strip().strip(";").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def check_eventhub_connection_string(cs: Any) -> None:
    """RealBackendError naming what is missing; the key is remembered for redaction."""
    if not isinstance(cs, str) or not cs.strip():
        raise RealBackendError(f"{EVENTHUB_OPTION} is empty")
    fields = parse_eventhub_connection_string(cs)
    missing = [k for k in _EVENTHUB_KEYS if not fields.get(k)]
    if missing:
        raise RealBackendError(f"{EVENTHUB_OPTION} lacks {', '.join(missing)}: "
                               f"expected the built-in endpoint's {_EVENTHUB_FORM}")
    remember(fields["SharedAccessKey"])


def derive_eventhub_connection_string(connection_string: str, *, timeout: float = 30.0,
                                      ca_bundle: str | None = None,
                                      consumer_group: str = "$Default") -> str:
    """The built-in endpoint's Event Hub connection string, asked of the hub itself.

    This is what the azure-eventhub and Azure IoT samples do: open an AMQP receiver
    on the hub's own
    `amqps://<HostName>/messages/events/ConsumerGroups/<group>/Partitions/0`,
    authenticated by SASL PLAIN as `<policy>@sas.root.<hub name>` with a service SAS
    token for the hub. IoT Hub answers the attach with an `amqp:link:redirect` detach
    whose info names the Event Hubs namespace (`hostname`) and the entity (first
    segment of `address`); the same policy name and key are valid there. A HostName
    with an explicit `:port` is connected to as given.

    Uses the AMQP client inside azure-eventhub (`azure.eventhub._pyamqp`), which is
    not a public API; when it is missing or the hub does not redirect,
    RealBackendError says to pass the endpoint's connection string with
    --iothub-eventhub-connection instead.
    """
    fields = parse_connection_string(connection_string)
    host = fields["HostName"]
    policy, key = fields.get("SharedAccessKeyName"), fields.get("SharedAccessKey")
    if not policy or not key:
        raise RealBackendError("the built-in endpoint can only be found with a "
                               "service connection string "
                               "(SharedAccessKeyName=...;SharedAccessKey=...); pass "
                               f"{EVENTHUB_OPTION}")
    remember(key)
    hub_name = host.split(":")[0].split(".")[0]
    namespace, entity = _redirect_of(host, hub_name, policy, key, timeout, ca_bundle,
                                     consumer_group)
    return (f"Endpoint=sb://{namespace}/;SharedAccessKeyName={policy};"
            f"SharedAccessKey={key};EntityPath={entity or hub_name}")


def _redirect_of(host: str, hub_name: str, policy: str, key: str, timeout: float,
                 ca_bundle: str | None, consumer_group: str) -> tuple[str, str]:
    """(namespace, entity) from the hub's redirect of a receiver on its own host."""
    try:
        from azure.eventhub._pyamqp import ReceiveClient
        from azure.eventhub._pyamqp.authentication import SASLPlainAuth
        from azure.eventhub._pyamqp.error import AMQPLinkRedirect
    except ImportError as exc:
        raise RealBackendError(f"cannot look up the hub's built-in endpoint ({exc}); "
                               "install azure-eventhub>=5.11 or pass "
                               f"{EVENTHUB_OPTION}") from None
    token = make_sas_token(host, key, ttl=max(300.0, timeout * 2), key_name=policy)
    options: dict[str, Any] = {}
    if ":" in host:
        options["custom_endpoint_address"] = f"amqps://{host}"
    if ca_bundle:
        options["connection_verify"] = ca_bundle
    source = f"amqps://{host}/messages/events/ConsumerGroups/{consumer_group}/Partitions/0"
    auth = SASLPlainAuth(authcid=f"{policy}@sas.root.{hub_name}", passwd=token)
    client = ReceiveClient(host, source=source, auth=auth, **options)
    result = _probe(client, timeout, host)
    if not isinstance(result, AMQPLinkRedirect):
        why = ("accepted the receiver without redirecting"
               if result is None
               else redact(f"{type(result).__name__}: {result}")[:300])
        raise RealBackendError(
            f"looking up the built-in endpoint of {host} failed: {why}{_LOOKUP_HINT}")
    if not result.hostname:
        raise RealBackendError(f"the hub {host} redirected without naming the Event "
                               f"Hubs namespace{_LOOKUP_HINT}")
    path = text_of(result.address).split("://", 1)[-1].partition("/")[2]
    return text_of(result.hostname), path.split("/")[0]


def _probe(client: Any, timeout: float, host: str) -> BaseException | None:
    """Receive once on a thread of its own (the AMQP client has no overall deadline):
    the exception the receive ended with, or None if it returned."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            client.receive_message_batch(max_batch_size=1, timeout=timeout)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        finally:
            try:
                client.close()
            except Exception:
                pass

    worker = threading.Thread(target=probe, name="iotfailover:eventhub-redirect",
                              daemon=True)
    worker.start()
    worker.join(timeout + 5.0)
    if worker.is_alive() or not outcome:
        raise RealBackendError(f"the hub {host} did not redirect to its built-in "
                               f"endpoint within {timeout:g} s (AMQP port 5671 "
                               f"blocked?){_LOOKUP_HINT}")
    return outcome[0]


def default_consumer_factory(ca_bundle: str | None,
                             consumer_group: str) -> Callable[[str], Any]:
    """`EventHubConsumerClient.from_connection_string`, with the backend's CA and
    group."""

    def open_consumer(eventhub_connection_string: str) -> Any:
        try:
            from azure.eventhub import EventHubConsumerClient
        except ImportError as exc:
            raise RealBackendError("the delivery ledger of a real hub needs "
                                   "azure-eventhub: pip install "
                                   f"azure-eventhub ({exc})") from None
        options: dict[str, Any] = {"connection_verify": ca_bundle} if ca_bundle else {}
        return EventHubConsumerClient.from_connection_string(
            eventhub_connection_string, consumer_group=consumer_group, **options)

    return open_consumer


# --- events as telemetry --------------------------------------------------------------

# names as the fake hub spells them (iothub/core.py), so assertions read the same on
# either hub
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
_TIME_PROPERTIES = {"absolute-expiry-time", "creation-time", "iothub-enqueuedtime",
                    "x-opt-enqueued-time"}


def _readable_name(raw: str) -> str:
    name = raw.lower()
    if name in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[name]
    for prefix in ("iothub-", "x-opt-"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace("-", "_")


def _utc_ms(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        return value.timestamp() * 1000.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _body_bytes(event: Any) -> bytes:
    body = event.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    try:
        parts = list(body)
    except TypeError:
        parts = None
    if parts is not None and all(isinstance(p, (bytes, bytearray, memoryview))
                                 for p in parts):
        return b"".join(bytes(p) for p in parts)
    # a value or sequence body: IoT Hub never produces one, but keep something readable
    value = parts if parts is not None else body
    return json.dumps(value, default=text_of).encode("utf-8")


def _system_properties(raw: dict[str, Any], partition_id: str | None) -> dict[str, str]:
    system: dict[str, str] = {}
    for key, value in raw.items():
        ms = _utc_ms(value) if key.lower() in _TIME_PROPERTIES else None
        if ms is not None:
            utc = datetime.UTC
            value = datetime.datetime.fromtimestamp(ms / 1000.0, utc).isoformat()
        system[_readable_name(key)] = text_of(value)
    if partition_id is not None:
        system["partition_id"] = str(partition_id)
    return system


def telemetry_from_event(event: Any, partition_id: str | None = None,
                         clock: Callable[[], float] = time.time) -> Telemetry | None:
    """One `EventData` from the built-in endpoint as the fake hub's `Telemetry`; None
    if no device sent it."""
    raw = {text_of(k): v for k, v in (event.system_properties or {}).items()}
    device_id = text_of(raw.get("iothub-connection-device-id")) or None
    if device_id is None:
        return None
    system = _system_properties(raw, partition_id)
    message_id = event.message_id
    if message_id is not None:
        message_id = text_of(message_id)
    else:
        message_id = system.get("message_id")
    props = {text_of(k): text_of(v) for k, v in (event.properties or {}).items()}
    enqueued = _utc_ms(raw.get("iothub-enqueuedtime"))
    if enqueued is not None:
        enqueued_at = enqueued / 1000.0
    elif event.enqueued_time is not None:
        enqueued_at = event.enqueued_time.timestamp()
    else:
        enqueued_at = clock()
    return Telemetry(device_id, message_id, _body_bytes(event), props, system,
                     enqueued_at, False, False, 1)


def _replay_key(t: Telemetry) -> tuple[Any, ...]:
    # The hub stamps iothub-enqueuedtime when it accepts a message: a re-read of the
    # same event (a restarted consumer, a failed-over endpoint) keeps it, a device's own
    # re-send does not.
    sp = t.system_properties
    stamp = sp.get("enqueued_time_utc") or sp.get("eventhub_enqueued_time")
    return (t.device_id, t.message_id, stamp, hashlib.sha1(t.body).hexdigest())


# --- the reader -----------------------------------------------------------------------


class EndpointLedger:
    """A `Ledger` fed by a consumer of the built-in endpoint, for the devices
    `is_ours` accepts; events read twice (a restarted reader) are recorded once.

    `consumer_factory(connection_string)` gives an EventHubConsumerClient-like
    object; `derive()` looks the endpoint up when no connection string is given.
    Reading starts at `since` (less the clock skew allowed for) and errors land in
    `errors`, redacted."""

    def __init__(self, consumer_factory: Callable[[str], Any],
                 is_ours: Callable[[str], bool], since: float,
                 clock: Callable[[], float] = time.time,
                 derive: Callable[[], str] | None = None):
        self.ledger = Ledger()
        self.errors: list[str] = []
        self._consumer_factory = consumer_factory
        self._is_ours = is_ours
        self._floor = since - LEDGER_CLOCK_SKEW
        self._clock = clock
        self._derive = derive
        self._derived = False
        self._connection_string: str | None = None
        self._lock = threading.Lock()
        self._replays: set[tuple[Any, ...]] = set()
        self._last_seen: dict[str, float] = {}
        self._partitions: set[str] = set()
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def open(self, connection_string: str | None = None) -> None:
        """Start reading from `since`; with no connection string, derive() one."""
        self._connection_string = self._endpoint(connection_string)
        self._start(self._floor)

    def reconnect(self, connection_string: str | None = None) -> None:
        """Restart the reader a little before the last event seen on any partition (or
        the start); a derived endpoint is looked up again."""
        if connection_string is not None:
            check_eventhub_connection_string(connection_string)
        self._stop()
        if connection_string is not None or self._derived:
            self._connection_string = self._endpoint(connection_string)
        with self._lock:
            seen = [self._last_seen.get(p, self._floor) for p in self._partitions]
        self._start(max(min(seen or [self._floor]) - RECONNECT_OVERLAP, self._floor))

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._stop(timeout)

    def _endpoint(self, connection_string: str | None) -> str:
        self._derived = connection_string is None
        if connection_string is None:
            if self._derive is None:
                raise RealBackendError(
                    f"no built-in endpoint to read: pass {EVENTHUB_OPTION}")
            connection_string = self._derive()
        check_eventhub_connection_string(connection_string)
        return connection_string

    def _start(self, start: float) -> None:
        assert self._connection_string is not None
        consumer = self._consumer_factory(self._connection_string)
        position = datetime.datetime.fromtimestamp(start, datetime.UTC)
        self._consumer = consumer
        self._thread = threading.Thread(target=self._consume, args=(consumer, position),
                                        name="iotfailover:eventhub-ledger", daemon=True)
        self._thread.start()

    def _stop(self, timeout: float = 10.0) -> None:
        consumer, thread = self._consumer, self._thread
        self._consumer = self._thread = None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:
                log.warning("%s",
                            redact(f"closing the built-in endpoint reader: {exc}"))
        if thread is not None:
            thread.join(timeout)

    def _consume(self, consumer: Any, position: datetime.datetime) -> None:
        try:
            consumer.receive(on_event=self._on_event, on_error=self._on_error,
                             on_partition_initialize=self._on_partition,
                             starting_position=position,
                             starting_position_inclusive=True)
        except Exception as exc:
            if consumer is self._consumer and not self._closed:
                self._on_error(None, exc)

    def _on_partition(self, context: Any) -> None:
        pid = getattr(context, "partition_id", None)
        if pid is not None:
            with self._lock:
                self._partitions.add(pid)

    def _on_error(self, context: Any, exc: BaseException) -> None:
        pid = getattr(context, "partition_id", None)
        where = f" (partition {pid})" if pid is not None else ""
        text = redact(
            f"reading the built-in endpoint{where}: {type(exc).__name__}: {exc}")
        self.errors.append(text[:500])
        log.warning("%s", text[:500])

    def _on_event(self, context: Any, event: Any) -> None:
        if event is None:
            return
        pid = getattr(context, "partition_id", None)
        enqueued = getattr(event, "enqueued_time", None)
        if pid is not None and enqueued is not None:
            with self._lock:
                self._partitions.add(pid)
                self._last_seen[pid] = max(self._last_seen.get(pid, 0.0),
                                           enqueued.timestamp())
        try:
            t = telemetry_from_event(event, pid, self._clock)
        except Exception as exc:
            self._on_error(context, exc)
            return
        if t is None or not self._is_ours(t.device_id):
            return
        key = _replay_key(t)
        with self._lock:
            if key in self._replays:
                return
            self._replays.add(key)
        self.ledger.record(t)
