"""A fleet: many real, unmodified `IoTHubDeviceClient`s spread over worker processes.

paho-mqtt 1.6, under azure-iot-device 2.x, watches its sockets with `select()`, which cannot take
descriptor numbers of 1024 and up; each client holds about three descriptors (its socket and
paho's wake-up socket pair), more while a wedged one is being replaced. So one process carries at
most a few hundred clients (bench/README.md "Limits"), and a fleet of a thousand runs in several
worker processes of at most `per_process` clients each.

Every client sends telemetry at `rate` messages per second, each with a message id of its own, and
records what it saw: when it connected, lost and regained its connection (through the SDK's
`on_connection_state_change`), which message ids the hub acknowledged, the errors the SDK raised.
A client whose paho network thread died while the SDK still reports it connected (a "wedged"
client, /work/shared/failover-facts.md "SDK facts") is counted and replaced by a new client, which
sends the unacknowledged message again.

The runner takes plain data from its caller (the hub's host names, its CA certificate and the
devices' connection strings), so it runs against any hub those describe: the standalone
`iotfailover-hub`, the embedded one, or a real IoT Hub.
"""
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import checks
from ..errors import IoTFailoverError
from ..procstat import process_cpu_seconds
from ..redaction import redact, remember_keys_of

__all__ = [
    "DEFAULT_PER_PROCESS",
    "MAX_PER_PROCESS",
    "DeviceReport",
    "FleetError",
    "FleetReport",
    "FleetRunner",
    "WorkerReport",
    "fleet_device_ids",
    "percentile",
    "process_cpu_seconds",
]

log = logging.getLogger(__name__)

# Well under the descriptor limit below: every connected SDK client has four threads, five with
# the fleet's sender, and with 200 clients to a process their contention for the GIL made a
# 1,000-client reconnect storm about 2.5 times slower than with 100 (bench/README.md "Fleet
# benchmark"); 50 gained little more and costs twice the processes.
DEFAULT_PER_PROCESS = 100
# 300 clients at three descriptors each, plus the interpreter's own, stays under select()'s 1024
# with room for replacements in flight.
MAX_PER_PROCESS = 300
# A network thread can end cleanly an instant before the SDK marks its client disconnected (it
# stops paho's loop first); dead-while-connected counts as wedged only once it has lasted this long.
WEDGE_GRACE = 1.0
_MONITOR_INTERVAL = 0.25
_CONNECT_PARALLEL = 8       # connect() calls at once in one worker: more only queue on the SDK's threads
_SHUTDOWN_TIMEOUT = 5.0
_RETRY_PAUSE = 0.5          # after a failed connect, before the next attempt
# After a failed send the message goes again once the SDK has reconnected by itself (its
# connection_retry), or after this long: an immediate re-send would make the SDK's auto_connect
# dial on top of its own retries, adding the fleet's pacing to every reconnect storm.
_RESEND_WAIT = 5.0
_OWNED_KWARGS = ("server_verification_cert",)


def _remember_keys(*connection_strings: str) -> None:
    remember_keys_of(*connection_strings)


class FleetError(IoTFailoverError):
    """A fleet could not start, or a worker process ended unexpectedly."""


def fleet_device_ids(count: int, id_prefix: str = "fleet-") -> list[str]:
    """The device ids a fleet of `count` uses: `fleet-0000`, `fleet-0001`, ... (register these)."""
    checks.positive_int("count", count)
    width = max(4, len(str(count - 1)))
    return [f"{id_prefix}{n:0{width}d}" for n in range(count)]


# --- what comes back --------------------------------------------------------------------------

@dataclass
class DeviceReport:
    """One fleet device as its client saw it. Times are time.time() seconds."""
    device_id: str
    worker: int
    connected: bool = False                      # at the time of the report
    connected_at: float | None = None         # first connection
    disconnected_at: list[float] = field(default_factory=list)
    reconnected_at: list[float] = field(default_factory=list)
    sent: int = 0                                # send_message calls that went out (re-sends included)
    acknowledged_ids: list[str] = field(default_factory=list)
    pending_id: str | None = None             # sent, not acknowledged yet
    errors: list[str] = field(default_factory=list)
    wedged: int = 0                              # times found wedged and replaced

    @property
    def acknowledged(self) -> int:
        return len(self.acknowledged_ids)

    def back_at(self, since: float) -> float | None:
        """When the device was connected again after losing its connection at or after `since`."""
        lost = [t for t in self.disconnected_at if t >= since]
        if not lost:
            return None
        return next((t for t in self.reconnected_at if t >= lost[0]), None)


@dataclass
class WorkerReport:
    index: int
    pid: int | None
    devices: int
    exitcode: int | None = None
    cpu_seconds: float | None = None
    thread_deaths: list[str] = field(default_factory=list)   # uncaught exceptions ending SDK threads


@dataclass
class FleetReport:
    devices: dict[str, DeviceReport]
    workers: list[WorkerReport]

    @property
    def wedged(self) -> int:
        return sum(d.wedged for d in self.devices.values())

    def acknowledged_ids(self) -> set[tuple[str, str]]:
        return {(d.device_id, m) for d in self.devices.values() for m in d.acknowledged_ids}

    def recovery(self, started_at: float, ended_at: float) -> dict[str, float | None]:
        """Per device: seconds from `ended_at` (a fault's end) until its client was connected again
        after losing its connection at or after `started_at`; None if it is not back."""
        out: dict[str, float | None] = {}
        for device_id, d in self.devices.items():
            back = d.back_at(started_at)
            out[device_id] = None if back is None else back - ended_at
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- the worker process -----------------------------------------------------------------------

def _paho_thread(client: Any) -> threading.Thread | None:
    """The network thread of the paho client inside an azure-iot-device client, if found.

    SDK internals (azure-iot-device 2.14): the client's MQTT pipeline is a chain of stages; the
    transport stage holds an MQTTTransport whose `_mqtt_client` is paho's, with `_thread`."""
    stage = getattr(getattr(client, "_mqtt_pipeline", None), "_pipeline", None)
    for _ in range(64):  # about 15 stages; the bound guards against a cycle
        if stage is None:
            return None
        paho = getattr(getattr(stage, "transport", None), "_mqtt_client", None)
        if paho is not None and hasattr(paho, "_thread"):
            return paho._thread
        stage = getattr(stage, "next", None)
    return None


class _Device:
    """One fleet device inside a worker: its current client and what it saw."""

    def __init__(self, worker: "_Worker", device_id: str, connection_string: str):
        self.worker = worker
        self.report = DeviceReport(device_id, worker.index)
        self.connection_string = connection_string
        self.lock = threading.Lock()
        self.client: Any = None
        self.generation = 0
        self.up = False
        self.up_event = threading.Event()   # set while up; set at stop too, to wake a waiting sender
        self.seq = 0
        self.acked: set[str] = set()
        self.dead_since: float | None = None   # monotonic time its thread was first seen dead

    def _transition(self, client: Any, connected: bool) -> None:
        now = time.time()
        with self.lock:
            if client is not self.client or connected == self.up:
                return
            self.up = connected
            if connected:
                self.up_event.set()
            else:
                self.up_event.clear()
            if not connected:
                self.report.disconnected_at.append(now)
            elif self.report.connected_at is None:
                self.report.connected_at = now
            else:
                self.report.reconnected_at.append(now)
        self.worker.changed()

    def _new_client(self) -> Any:
        from azure.iot.device import IoTHubDeviceClient
        client = IoTHubDeviceClient.create_from_connection_string(
            self.connection_string, server_verification_cert=self.worker.ca_pem, **self.worker.client_kwargs)
        # the SDK annotates the handler as taking an argument; it calls it with none
        client.on_connection_state_change = lambda: self._transition(client, bool(client.connected))  # type: ignore[assignment]
        return client

    def start(self) -> None:
        with self.lock:
            self.client = self._new_client()
            gen = self.generation
        threading.Thread(target=self.run, args=(gen,), name=f"fleet:{self.report.device_id}", daemon=True).start()

    def replace(self) -> None:
        """The client is wedged: count it, give the device a new client and a new sending thread.
        The old thread may stay blocked in the SDK for good; it is a daemon and notices it is stale."""
        now = time.time()
        with self.lock:
            old = self.client
            self.report.wedged += 1
            self.report.errors.append(f"wedged at {now:.3f}: the SDK's network thread died while connected")
            if self.up:
                self.up = False
                self.up_event.clear()
                self.report.disconnected_at.append(now)
            self.generation += 1
            self.dead_since = None
            self.client = self._new_client()
            gen = self.generation
        threading.Thread(target=_shutdown_quietly, args=(old,), daemon=True).start()
        threading.Thread(target=self.run, args=(gen,), name=f"fleet:{self.report.device_id}", daemon=True).start()

    def current(self, gen: int) -> Any:
        with self.lock:
            return self.client if gen == self.generation else None

    def run(self, gen: int) -> None:
        stop = self.worker.stop
        while not stop.is_set():
            client = self.current(gen)
            if client is None:
                return
            if not self._connect(client, gen):
                continue
            break
        rate = self.worker.rate
        if rate <= 0:
            return
        period = 1.0 / rate
        next_at = time.monotonic() + random.uniform(0, period)
        while not stop.wait(max(next_at - time.monotonic(), 0)):
            client = self.current(gen)
            if client is None:
                return
            if self._send_one(client):
                next_at = max(next_at + period, time.monotonic() - period)
            else:
                self.up_event.wait(_RESEND_WAIT)
                next_at = time.monotonic()

    def _connect(self, client: Any, gen: int) -> bool:
        with self.worker.connect_slots:
            if self.worker.stop.is_set() or self.current(gen) is not client:
                return False
            try:
                client.connect()
            except Exception as exc:
                self._error("connect", exc)
                self.worker.stop.wait(_RETRY_PAUSE)
                return False
        self._transition(client, bool(client.connected))
        return True

    def _send_one(self, client: Any) -> bool:
        from azure.iot.device import Message
        with self.lock:
            if self.report.pending_id is None:
                self.report.pending_id = f"{self.report.device_id}:{self.seq}"
                self.seq += 1
            message_id = self.report.pending_id
            self.report.sent += 1
        try:
            client.send_message(Message(f'{{"id":"{message_id}"}}', message_id=message_id))
        except Exception as exc:
            self._error("send_message", exc)
            return False
        with self.lock:
            # a stale thread whose send finally returned: acknowledged all the same
            if message_id not in self.acked:
                self.acked.add(message_id)
                self.report.acknowledged_ids.append(message_id)
            if self.report.pending_id == message_id:
                self.report.pending_id = None
        return True

    def _error(self, what: str, exc: BaseException) -> None:
        text = redact(f"{time.time():.3f} {what}: {type(exc).__name__}: {exc}")[:300]
        with self.lock:
            if len(self.report.errors) < 100:
                self.report.errors.append(text)

    def check_wedged(self) -> bool:
        with self.lock:
            client = self.client
        thread = _paho_thread(client)
        try:
            connected = bool(client.connected)
        except Exception:
            return False
        if thread is None or thread.is_alive() or not connected:
            self.dead_since = None
            return False
        now = time.monotonic()
        if self.dead_since is None:
            self.dead_since = now
        return now - self.dead_since >= WEDGE_GRACE

    def back_at(self, since: float) -> float | None:
        with self.lock:
            return self.report.back_at(since)

    def snapshot(self) -> DeviceReport:
        with self.lock:
            r = self.report
            return DeviceReport(r.device_id, r.worker, self.up, r.connected_at, list(r.disconnected_at),
                                list(r.reconnected_at), r.sent, list(r.acknowledged_ids), r.pending_id,
                                list(r.errors), r.wedged)


def _shutdown_quietly(client: Any, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
    done = threading.Event()

    def run():
        try:
            client.shutdown()
        except Exception:
            pass
        finally:
            done.set()
    threading.Thread(target=run, daemon=True).start()
    done.wait(timeout)


class _Worker:
    """The main object of one worker process: its devices, a monitor thread, the command pipe."""

    def __init__(self, conn: Any, spec: dict[str, Any]):
        self.conn = conn
        self.index = spec["index"]
        self.rate = spec["rate"]
        self.ca_pem = spec["ca_pem"]
        self.client_kwargs = spec["client_kwargs"]
        self.stop = threading.Event()
        self.connect_slots = threading.BoundedSemaphore(_CONNECT_PARALLEL)
        self.send_lock = threading.Lock()
        self.thread_deaths: list[str] = []
        self._changed = threading.Event()
        _remember_keys(*(cs for _, cs in spec["devices"]))
        self.devices = [_Device(self, d, cs) for d, cs in spec["devices"]]

    def changed(self) -> None:
        self._changed.set()

    def send(self, *message: Any) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                self.stop.set()  # the parent is gone

    def _excepthook(self, args: Any) -> None:
        # an SDK thread dying is a finding for the report, not a traceback on the user's terminal
        if len(self.thread_deaths) < 1000:
            name = args.thread.name if args.thread is not None else "?"
            self.thread_deaths.append(redact(f"{time.time():.3f} {name}: {args.exc_type.__name__}: "
                                             f"{args.exc_value}")[:300])

    def run(self) -> None:
        threading.excepthook = self._excepthook
        for device in self.devices:
            device.start()
        threading.Thread(target=self._monitor, name="fleet-monitor", daemon=True).start()
        while not self.stop.is_set():
            try:
                command = self.conn.recv()
            except (EOFError, OSError):
                break
            if command[0] == "report":
                self.send("report", command[1], self.report())
            elif command[0] == "back":
                # a count only: asked several times a second during a storm, and cheap to answer
                self.send("report", command[1], {"back": sum(1 for d in self.devices if d.back_at(command[2]))})
            elif command[0] == "stop":
                self._shutdown(command[1])
                self.send("final", self.report())
                break

    def _monitor(self) -> None:
        last = -1
        while not self.stop.wait(_MONITOR_INTERVAL):
            for device in self.devices:
                if device.check_wedged():
                    device.replace()
            if self._changed.is_set() or last < 0:
                self._changed.clear()
                now = sum(1 for d in self.devices if d.up)
                if now != last:
                    last = now
                    self.send("connected", now)

    def _shutdown(self, timeout: float) -> None:
        self.stop.set()
        for device in self.devices:
            device.up_event.set()
        closers = [threading.Thread(target=_shutdown_quietly, args=(d.client, timeout), daemon=True)
                   for d in self.devices if d.client is not None]
        for t in closers:
            t.start()
        deadline = time.monotonic() + timeout
        for t in closers:
            t.join(max(deadline - time.monotonic(), 0))

    def report(self) -> dict[str, Any]:
        return {"devices": [d.snapshot() for d in self.devices], "thread_deaths": list(self.thread_deaths)}


def _worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a worker process (spawned: nothing of the parent's state is inherited)."""
    # the SDK logs a warning per refused retry; what matters goes into the report instead
    logging.getLogger("azure.iot.device").setLevel(spec.get("sdk_log_level", logging.CRITICAL))
    logging.getLogger("paho").setLevel(logging.CRITICAL)
    code = 1
    try:
        _Worker(conn, spec).run()
        code = 0
    except Exception as exc:
        try:
            conn.send(("error", redact(f"{type(exc).__name__}: {exc}")[:500]))
        except (OSError, EOFError):
            pass  # the parent is gone: nobody to tell
    finally:
        conn.close()
        # SDK threads stuck in a wedged client must not keep the process alive
        os._exit(code)


# --- the parent side --------------------------------------------------------------------------

class _WorkerHandle:
    def __init__(self, index: int, process: Any, conn: Any, devices: int):
        self.index = index
        self.process = process
        self.conn = conn
        self.devices = devices
        self.connected = 0
        self.alive = True
        self.replies: dict[int, dict[str, Any]] = {}
        self.final: dict[str, Any] | None = None
        self.error: str | None = None
        self.cpu_seconds: float | None = None


def _devices_of(hub_info: Mapping[str, Any]) -> dict[str, str]:
    devices = hub_info.get("devices")
    if isinstance(devices, Mapping):
        pairs = list(devices.items())
    elif isinstance(devices, (list, tuple)):
        pairs = [tuple(p) for p in devices]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("hub_info['devices'] must hold (device_id, connection_string) pairs")
    else:
        raise TypeError("hub_info['devices'] must map device ids to connection strings "
                         "(or be a list of (device_id, connection_string) pairs)")
    out: dict[str, str] = {}
    for device_id, cs in pairs:
        if not isinstance(device_id, str) or not isinstance(cs, str) or f"DeviceId={device_id};" not in cs + ";":
            raise ValueError(f"hub_info['devices']: {device_id!r} has no connection string for that device")
        out[device_id] = cs
    return out


class FleetRunner:
    """`count` real SDK clients in worker processes of at most `per_process` each.

    `hub_info` is plain data: `ca_pem` (the CA certificate the clients trust, PEM text) and
    `devices` (device id -> connection string, or a list of pairs) holding at least the ids
    `fleet_device_ids(count, id_prefix)`; `hostname` and `gateway_host`, when given, must be what
    those connection strings name. `client_kwargs` go to `create_from_connection_string` unchanged
    (the SDK's defaults otherwise) and must pickle. `rate` is messages per second per client
    (0: connect only).

    `start()` returns once every worker runs; `wait_connected(timeout)` waits for every client.
    `stop(timeout)` shuts the clients down and always ends the workers: a worker that does not
    finish within `timeout` is terminated, then killed.
    """

    def __init__(self, hub_info: Mapping[str, Any], count: int, *, rate: float = 1.0,
                 per_process: int = DEFAULT_PER_PROCESS, client_kwargs: Mapping[str, Any] | None = None,
                 id_prefix: str = "fleet-"):
        self.count = checks.positive_int("count", count)
        self.rate = checks.number("rate", rate)
        if self.rate < 0:
            raise ValueError(f"rate must be a non-negative number of messages per second, got {rate!r}")
        self.per_process: int = checks.integer("per_process", per_process, minimum=1,  # type: ignore[assignment]
                                               maximum=MAX_PER_PROCESS)
        if not isinstance(hub_info, Mapping):
            raise TypeError(f"hub_info must be a mapping, got {type(hub_info).__name__}")
        self.ca_pem = hub_info.get("ca_pem")
        if not isinstance(self.ca_pem, str) or "BEGIN CERTIFICATE" not in self.ca_pem:
            raise ValueError("hub_info['ca_pem'] must be the hub's CA certificate as PEM text")
        self.client_kwargs = dict(client_kwargs or {})
        for name in _OWNED_KWARGS:
            if name in self.client_kwargs:
                raise ValueError(f"client_kwargs: {name} comes from hub_info['ca_pem']; do not pass it")
        available = _devices_of(hub_info)
        _remember_keys(*available.values())
        self.device_ids = fleet_device_ids(self.count, id_prefix)
        missing = [d for d in self.device_ids if d not in available]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"hub_info['devices'] has no connection string for {missing[0]!r}{more}: register "
                             f"fleet_device_ids({count}, {id_prefix!r}) on the hub first")
        self._check_hosts(hub_info, [available[d] for d in self.device_ids])
        self._devices = [(d, available[d]) for d in self.device_ids]
        self._cond = threading.Condition()
        self._workers: list[_WorkerHandle] = []
        self._receiver: threading.Thread | None = None
        self._request = 0
        self._started = False
        self._stopped = False
        self._final: FleetReport | None = None

    @staticmethod
    def _check_hosts(hub_info: Mapping[str, Any], strings: Iterable[str]) -> None:
        for key, part in (("hostname", "HostName"), ("gateway_host", "GatewayHostName")):
            want = hub_info.get(key)
            if want is None:
                continue
            for cs in strings:
                fields = dict(p.split("=", 1) for p in cs.split(";") if "=" in p)
                if fields.get(part) not in (None, want):
                    raise ValueError(f"hub_info[{key!r}] is {want!r} but a connection string names "
                                     f"{part}={fields.get(part)!r}")

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> "FleetRunner":
        if self._started:
            raise RuntimeError("this FleetRunner was already started")
        self._started = True
        ctx = multiprocessing.get_context("spawn")
        try:
            for index in range(0, self.count, self.per_process):
                chunk = self._devices[index:index + self.per_process]
                parent, child = ctx.Pipe(duplex=True)
                spec = {"index": len(self._workers), "rate": self.rate, "ca_pem": self.ca_pem,
                        "client_kwargs": self.client_kwargs, "devices": chunk}
                process = ctx.Process(target=_worker_main, args=(child, spec), daemon=True,
                                      name=f"iotfailover-fleet-{len(self._workers)}")
                process.start()
                child.close()
                self._workers.append(_WorkerHandle(len(self._workers), process, parent, len(chunk)))
            self._receiver = threading.Thread(target=self._receive, name="iotfailover-fleet-receiver", daemon=True)
            self._receiver.start()
        except BaseException:
            self.stop(timeout=_SHUTDOWN_TIMEOUT)
            raise
        return self

    def __enter__(self) -> "FleetRunner":  # noqa: PYI034 - Self needs 3.11 typing; the class is final
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def cpu_seconds(self) -> dict[int, float | None]:
        """CPU seconds so far of each worker process, by pid (None once it is gone)."""
        return {pid: process_cpu_seconds(pid) for pid in self.pids}

    def _receive(self) -> None:
        while True:
            with self._cond:
                conns: dict[Any, _WorkerHandle] = {w.conn: w for w in self._workers if w.alive}
            if not conns:
                return
            for conn in multiprocessing.connection.wait(list(conns), timeout=0.5):
                worker = conns[conn]
                try:
                    message: Any = worker.conn.recv()
                except (EOFError, OSError):
                    with self._cond:
                        worker.alive = False
                        self._cond.notify_all()
                    continue
                with self._cond:
                    if message[0] == "connected":
                        worker.connected = message[1]
                    elif message[0] == "report":
                        worker.replies[message[1]] = message[2]
                    elif message[0] == "final":
                        worker.final = message[1]
                    elif message[0] == "error":
                        worker.error = message[1]
                    self._cond.notify_all()

    def _dead_worker(self) -> _WorkerHandle | None:
        return next((w for w in self._workers if not w.alive and w.final is None), None)

    def _dead_error(self, worker: _WorkerHandle) -> FleetError:
        worker.process.join(1)
        return FleetError(f"fleet worker {worker.index} (pid {worker.process.pid}, {worker.devices} clients) "
                          f"ended unexpectedly with exit code {worker.process.exitcode}"
                          + (f": {worker.error}" if worker.error else ""))

    def connected(self) -> int:
        """Clients connected now, as their workers last said."""
        with self._cond:
            return sum(w.connected for w in self._workers)

    def wait_connected(self, timeout: float = 120.0) -> None:
        """Block until every client is connected; TimeoutError saying how many are, or FleetError
        naming a worker that ended."""
        limit = checks.required_seconds("timeout", timeout)
        if not self._started:
            raise RuntimeError("call start() first")
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                dead = self._dead_worker()
                if dead is not None:
                    raise self._dead_error(dead)
                now = sum(w.connected for w in self._workers)
                if now >= self.count:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{now} of {self.count} fleet clients connected within {limit:g} s")
                self._cond.wait(left)

    # --- results -------------------------------------------------------------------------------

    def report(self, timeout: float = 30.0) -> FleetReport:
        """Every device as its client saw it, now (after `stop()`: as it ended)."""
        limit = checks.required_seconds("timeout", timeout, positive=True)
        if self._final is not None:
            return self._final
        replies = self._ask(("report",), limit)
        with self._cond:
            # a worker that ended before answering may have left its final report
            return self._build({i: r or self._workers[i].final for i, r in replies.items()})

    def _ask(self, command: tuple, limit: float) -> dict[int, dict[str, Any] | None]:
        """Send `command` to every live worker; each one's answer (None from one that ended)."""
        if not self._started:
            raise RuntimeError("call start() first")
        with self._cond:
            self._request += 1
            request = self._request
            asked = [w for w in self._workers if w.alive]
        for worker in asked:
            try:
                worker.conn.send((command[0], request, *command[1:]))
            except (OSError, EOFError):
                pass  # it is gone; the receiver notices
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                waiting = [w for w in asked if request not in w.replies and w.alive]
                if not waiting:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fleet workers {[w.index for w in waiting]} did not answer within {limit:g} s")
                self._cond.wait(left)
            return {w.index: w.replies.pop(request, None) for w in self._workers}

    def _build(self, replies: Mapping[int, dict[str, Any] | None]) -> FleetReport:
        devices: dict[str, DeviceReport] = {}
        workers = []
        for w in self._workers:
            reply = replies.get(w.index)
            cpu = w.cpu_seconds if w.cpu_seconds is not None else process_cpu_seconds(w.process.pid)
            workers.append(WorkerReport(w.index, w.process.pid, w.devices, w.process.exitcode, cpu,
                                        list(reply["thread_deaths"]) if reply else []))
            for d in (reply["devices"] if reply else []):
                devices[d.device_id] = d
        for device_id, _ in self._devices:
            if device_id not in devices:
                # its worker ended without a word: nothing it acknowledged can be vouched for
                index = self.device_ids.index(device_id) // self.per_process
                devices[device_id] = DeviceReport(device_id, index, errors=["its worker process ended unexpectedly"])
        return FleetReport({d: devices[d] for d in self.device_ids}, workers)

    def acknowledged_ids(self, timeout: float = 30.0) -> set[tuple[str, str]]:
        """(device_id, message_id) of every message the hub acknowledged to a fleet client."""
        return self.report(timeout).acknowledged_ids()

    def wait_recovered(self, since: float, timeout: float = 60.0, poll: float = 0.25) -> FleetReport:
        """Wait until every client lost its connection at or after `since` (time.time()) and got it
        back; the report then. TimeoutError naming how many are back otherwise."""
        limit = checks.required_seconds("timeout", timeout)
        deadline = time.monotonic() + limit
        while True:
            replies = self._ask(("back", since), max(deadline - time.monotonic(), 1.0))
            back = sum(r["back"] for r in replies.values() if r)
            if back >= self.count:
                return self.report(max(deadline - time.monotonic(), 30.0))
            with self._cond:
                dead = self._dead_worker()
                if dead is not None:
                    raise self._dead_error(dead)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{back} of {self.count} fleet clients back within {limit:g} s")
                # the workers answer on request only; this paces the requests
                self._cond.wait(min(poll, left))

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> FleetReport | None:
        """Shut every client down and end every worker within about `timeout` (+ a few seconds to
        kill a stuck one). Idempotent; the final report, or None if it never started."""
        limit = checks.required_seconds("timeout", timeout)
        if self._stopped or not self._started:
            return self._final
        self._stopped = True
        deadline = time.monotonic() + limit
        for w in self._workers:
            w.cpu_seconds = process_cpu_seconds(w.process.pid)
            try:
                w.conn.send(("stop", max(limit - 2.0, 0.5)))
            except (OSError, EOFError):
                pass
        with self._cond:
            while any(w.alive and w.final is None for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            for w in self._workers:
                if w.final is not None:
                    w.cpu_seconds = process_cpu_seconds(w.process.pid) or w.cpu_seconds
        self._end_processes(deadline)
        if self._receiver is not None:
            self._receiver.join(5)
        for w in self._workers:
            w.conn.close()
        self._final = self._build({w.index: w.final for w in self._workers})
        return self._final

    def _end_processes(self, deadline: float) -> None:
        for w in self._workers:
            w.process.join(max(deadline - time.monotonic(), 0.1))
        for step in ("terminate", "kill"):
            stuck = [w.process for w in self._workers if w.process.is_alive()]
            if not stuck:
                break
            log.warning("fleet: %d worker process(es) did not end in time; %s", len(stuck), step)
            for p in stuck:
                getattr(p, step)()
            for p in stuck:
                p.join(5)
        with self._cond:
            for w in self._workers:
                w.alive = w.alive and w.process.is_alive()
            self._cond.notify_all()
