"""The embedded fake IoT Hub: `FakeHub`, a thread-safe façade over an asyncio hub thread."""
import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Self

from .. import checks
from ..errors import HubInternalError
from ..iothub.core import HubOperationError, IoTHubCore, MethodResponse, c2d_body
from ..iothub.events import DEFAULT_MAX_EVENTS, HubEvent
from ..iothub.faults import Fault
from ..iothub.ledger import Telemetry
from ..iothub.registry import Device, Registry
from ..iothub.tiers import Operation, Shaping, Tier
from ..waiting import Pulse, WaitingEventLog, WaitingLedger
from .certs import HubCertificates
from .descriptors import ACCEPT_ERRNOS, AcceptGuard, raise_fd_limit
from .dns import HubName, new_name
from .faults import FaultHandle, Faults, RecoveryReport
from .hub_limits import LimitsFace
from .nap import resolve_nap
from .rules import HUB_NAME
from .server import MAX_CONNECT_SIZE, MAX_UNAUTHENTICATED, SEND_BUFFER_LIMIT, SEND_BUFFER_PAUSE, HubServer, is_loopback
from .shaping import ServiceShaping

__all__ = [
    "Device",
    "FakeHub",
    "FaultHandle",
    "HubEvent",
    "HubInternalError",
    "HubOperationError",
    "MethodResponse",
    "RecoveryReport",
    "Telemetry",
]

LOOP_ENV = "IOTFAILOVER_LOOP"
LOOP_CHOICES = ("auto", "asyncio", "uvloop")


def select_loop(loop: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name, factory) of the event loop a hub should run on.

    `loop` is "asyncio", "uvloop" or "auto" (uvloop when it is importable, else asyncio); None
    means the IOTFAILOVER_LOOP environment variable, or "auto" when it is unset or empty. The
    choice is resolved at once, so a bad value or a missing uvloop fails where it was given,
    not later on the hub thread.
    """
    source = "loop"
    if loop is None:
        loop = os.environ.get(LOOP_ENV, "").strip() or "auto"
        source = f"environment variable {LOOP_ENV}"
    if not isinstance(loop, str) or loop.lower() not in LOOP_CHOICES:
        raise ValueError(f"invalid {source} {loop!r}: expected one of {', '.join(LOOP_CHOICES)}")
    loop = loop.lower()
    if loop == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ValueError(f"{source} is 'uvloop' but uvloop is not installed "
                             "(pip install 'pytest-iotfailover[fast]'; it has no Windows build)") from None
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def _set_result_once(fut: concurrent.futures.Future, result) -> None:
    try:
        fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass



def _check_settings(hub_name: Any, port: Any, host: Any, allow_remote: bool, token_grace: Any, connect_timeout: Any,
                    max_events: Any, max_connect_size: Any, max_unauthenticated: Any, send_buffer_pause: Any,
                    send_buffer_limit: Any) -> None:
    if not isinstance(hub_name, str) or not HUB_NAME.match(hub_name):
        raise ValueError(f"invalid hub_name {hub_name!r}: IoT Hub names are 3-50 lower-case letters, "
                         "digits and hyphens, starting and ending with a letter or digit")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}: expected 0-65535")
    if host is not None and not is_loopback(host) and not allow_remote:
        raise ValueError(f"host {host!r} is not a loopback address; pass allow_remote=True to listen on it")
    for name, value in (("token_grace", token_grace), ("connect_timeout", connect_timeout)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    for name, value, least in (("max_events", max_events, 1), ("max_connect_size", max_connect_size, 64),
                               ("max_unauthenticated", max_unauthenticated, 1),
                               ("send_buffer_pause", send_buffer_pause, 1024)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    # one packet's output (a C2D message, a twin document) must fit between the two marks
    if not isinstance(send_buffer_limit, int) or isinstance(send_buffer_limit, bool) or \
            send_buffer_limit < send_buffer_pause + 256 * 1024:
        raise ValueError(f"send_buffer_limit must be an integer at least 256 KiB over send_buffer_pause "
                         f"({send_buffer_pause}), got {send_buffer_limit!r}")


class _EngineFace:
    """`hub._faults_engine` for the Faults face: runs the engine's calls as steps of the core,
    on the hub thread, and executes what they return."""

    def __init__(self, hub: "FakeHub"):
        self._hub = hub

    @property
    def active(self) -> list[Fault]:
        return self._hub._running_core().faults.active

    @property
    def history(self) -> list[Fault]:
        return self._hub._running_core().faults.history

    def schedule(self, fault: Fault, at: float | None, after_messages: int | None) -> Fault:
        self._hub._act(self._hub._running_core().schedule_fault, fault, at, after_messages)
        return fault

    def end(self, fault: Fault, cancelled: bool = False) -> None:
        self._hub._act(self._hub._running_core().end_fault, fault, cancelled)


class FakeHub(LimitsFace, ServiceShaping):
    """An IoT Hub impersonation on `<loopback address>:8883` for unmodified device SDKs.

    Runs its own event loop in a background thread. Every public method may be called from any
    thread (including from inside an `async` test) and errors inside the hub surface here.
    `loop` picks that event loop: "asyncio", "uvloop", or "auto" (uvloop when installed); None
    reads IOTFAILOVER_LOOP, then means "auto". `loop_name` says which one runs. `dns`: fakehub/dns.py.
    `nap`: the hub thread's sleep after a busy wake-up (fakehub/nap.py: 0 off, None IOTFAILOVER_NAP).
    """

    def __init__(self, hub_name: str = "testhub", *, host: str | None = None, port: int = 8883,
                 token_grace: float = 300.0, connect_timeout: float = 30.0,
                 allow_remote: bool = False, raise_errors: bool = True,
                 max_events: int = DEFAULT_MAX_EVENTS, max_connect_size: int = MAX_CONNECT_SIZE,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 send_buffer_pause: int = SEND_BUFFER_PAUSE, send_buffer_limit: int = SEND_BUFFER_LIMIT,
                 loop: str | None = None, tier: str | None = "S1", units: int = 1, dns: bool = False,
                 shaping: Shaping | Mapping[Operation, Shaping] | None = None, nap: float | None = None):
        # uvloop's faster wake-ups matter at IoT-like rates (bench/README.md); asyncio is the fallback
        self.loop_name, self._new_loop = select_loop(loop)
        _check_settings(hub_name, port, host, allow_remote, token_grace, connect_timeout, max_events,
                        max_connect_size, max_unauthenticated, send_buffer_pause, send_buffer_limit)
        self.nap = resolve_nap(nap)
        self._limits: dict[str, Any] = {"max_connect_size": max_connect_size, "send_buffer_pause": send_buffer_pause,
                                        "send_buffer_limit": send_buffer_limit, "nap": self.nap}
        self._max_unauthenticated = max_unauthenticated
        # IoT Hub's per-tier throttles (iothub/tiers.py); None: unthrottled (benchmarks)
        self.tier: Tier | None = None if tier is None else Tier.lookup(tier, units)
        self._init_shaping(shaping)  # None: iothub/tiers.py's defaults; one Shaping for all, or per operation
        self.hub_name = hub_name
        self.hostname = f"{hub_name}.azure-devices.net"
        self._host = host
        self._port = port
        self._token_grace = float(token_grace)
        self._connect_timeout = float(connect_timeout)
        self._raise_errors = raise_errors
        self.gateway_host: str | None = None
        self.port: int | None = None
        self.ca_pem: str | None = None
        # one pulse: a wait on telemetry also wakes on any event, and the other way round
        pulse = Pulse()
        self.ledger = WaitingLedger(pulse)
        self.event_log = WaitingEventLog(max_events, pulse=pulse)
        self._accept_failed = AcceptGuard(self.event_log)
        self.registry = Registry(self.hostname)
        self._core: IoTHubCore | None = None
        self._server: HubServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping = False
        self._faults_engine = _EngineFace(self)
        self._method_futures: set = set()  # invoke_method calls waiting for an answer
        self.faults = Faults(self)
        self.dns: HubName | None = HubName(new_name(hub_name)) if checks.boolean("dns", dns) else None

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("this FakeHub was already started")
        # the usual soft limit of 1,024 descriptors stops a hub at about a thousand connections
        raise_fd_limit()
        self._thread = threading.Thread(target=self._run, name=f"FakeHub[{self.hub_name}]", daemon=True)
        self._thread.start()
        if not self._started.wait(60):
            raise HubInternalError("the hub thread did not start listening within 60 s")
        if self._startup_error is not None:
            self._thread.join(5)
            raise self._startup_error
        return self

    def _run(self) -> None:
        loop = self._loop = self._new_loop()
        loop.set_exception_handler(self._on_loop_error)
        try:
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                self._startup_error = exc
                self._started.set()
                return
            # set from inside the running loop: start() must not return before `running` holds,
            # or a call right after it (add_device, say) finds the hub "not running"
            loop.call_soon(self._started.set)
            loop.run_forever()
            assert self._server is not None
            loop.run_until_complete(self._server.close())
        finally:
            self._started.set()  # start() waits no longer if the loop could not run at all
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._accept_failed.close()
            if self.dns is not None:
                self.dns.stop()  # socket.getaddrinfo is the original again once no such hub runs

    async def _startup(self) -> None:
        sock = HubServer.bind(self._host, self._port)
        try:
            host, port = sock.getsockname()[:2]
            self.gateway_host, self.port = host, port
            self.registry.gateway_host = host if self.dns is None else self.dns.name
            names = [self.hostname, "localhost", host] + ([self.dns.name] if self.dns else [])
            self.certificates = HubCertificates(names)
            self.ca_pem = self.certificates.ca_pem
            core = IoTHubCore(self.hostname, self.registry, self.ledger, self.event_log,
                              token_grace=self._token_grace, connect_timeout=self._connect_timeout,
                              max_unauthenticated=self._max_unauthenticated, tier=self.tier)
            core.policies, core.feedback = self._limits_face_state.policies, self._limits_face_state.feedback  # hub_limits.py
            core.faults.new_flag = threading.Event  # FaultHandle.wait() blocks on these
            self._install_shaping(core)
            assert self._loop is not None
            self._server = HubServer(core, self.certificates.server_context(), self._loop, **self._limits)
            self._core = core
            if self.dns is not None:
                self.dns.attach(self._server, host, self.event_log)
            await self._server.serve(sock)
            self._accept_failed.arm(sock, self._loop)
        except BaseException:
            sock.close()
            raise
        self.event_log.add("hub_started", None, host=host, port=port)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS and "accept" in str(context.get("message")):
            self._accept_failed(exc)
        elif exc is not None and self._core is not None and self._server is not None:
            self._server.execute(self._core.internal_error(None, exc, time.time()))
        else:
            self.event_log.add("error", None, message=str(context.get("message")))

    def stop(self) -> None:
        """Close every connection (logged as reason `hub_stopped`) and end the hub thread."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        self._shaping_stop.set()
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        # calls the stopped hub will never answer fail now, not after their timeout + 30 s
        for fut in list(self._method_futures):
            try:
                fut.set_exception(RuntimeError("the FakeHub was stopped while this method call was pending"))
            except concurrent.futures.InvalidStateError:
                pass  # answered after all
        if self._thread.is_alive():
            raise HubInternalError("the hub thread did not stop within 30 s")
        if self._raise_errors and self.errors:
            raise HubInternalError("the fake hub hit internal errors:\n" +
                                   "\n".join(e.detail.get("traceback") or e.detail.get("message", "")
                                             for e in self.errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stop()
        else:
            try:
                self.stop()
            except HubInternalError:
                pass  # the test's own exception is the one to show

    async def __aenter__(self) -> Self:
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.__exit__, exc_type, exc, tb)

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running() and not self._stopping

    def _call(self, fn, *args, timeout: float | None = 30.0):
        """Run `fn(*args)` on the hub thread and return its result (or raise its exception)."""
        if not self.running:
            raise RuntimeError("the FakeHub is not running (use `with FakeHub() as hub:` or hub.start())")
        assert self._thread is not None and self._loop is not None
        if threading.get_ident() == self._thread.ident:
            return fn(*args)
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def _running_core(self) -> IoTHubCore:
        if self._core is None:
            raise RuntimeError("the FakeHub is not running (use `with FakeHub() as hub:` or hub.start())")
        return self._core

    def _act(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One step of the core on the hub thread (HubServer.run); its value, if it has one."""
        return self._call(self._carry_booking(lambda: self._server.run(fn, *args) if self._server else None))

    # --- devices -----------------------------------------------------------------------------

    def add_device(self, device_id: str, primary_key: str | None = None, *,
                   secondary_key: str | None = None, enabled: bool = True, throttle: bool = True) -> Device:
        if self.gateway_host is None:
            raise RuntimeError("start the FakeHub before adding devices (their connection strings need its address)")
        self._shape_registry(device_id, "add_device", throttle, new=True, keys=(primary_key, secondary_key))
        # through the core: refused during a failover, and remembered for its rollback (rpo=)
        return self._act(self._running_core().add_device, device_id, primary_key, secondary_key, enabled)

    def device(self, device_id: str) -> Device:
        dev = self.registry.get(device_id)
        if dev is None:
            raise KeyError(f"no device {device_id!r} on hub {self.hub_name!r}")
        return dev

    @property
    def devices(self) -> list[Device]:
        return self.registry.all()

    def remove_device(self, device_id: str, *, throttle: bool = True) -> None:
        """Delete the identity; a connected device is disconnected (reason `device_removed`)."""
        self._shape_registry(device_id, "remove_device", throttle and self.running)
        self.registry.remove(device_id)
        if self.running:
            self._act(self._running_core().device_disabled, device_id, True)

    def connected_devices(self) -> list[str]:
        return self._call(lambda: sorted(self._running_core().connections))

    def is_connected(self, device_id: str) -> bool:
        return self._call(lambda: device_id in self._running_core().connections)

    # --- telemetry ---------------------------------------------------------------------------

    def telemetry(self, device_id: str | None = None, *, include_lost: bool = False,
                  device_ids: Collection[str] | None = None) -> list[Telemetry]:
        """What a backend reading the built-in endpoint has: without the records a region failover
        lost (`include_lost=True`, or `ledger.items()`, to see them). `device_ids` narrows to several
        devices at a cost of O(their messages)."""
        return self.ledger.items(device_id, include_lost=include_lost, device_ids=device_ids)

    def wait_for_telemetry(self, count: int, device_id: str | None = None,
                           timeout: float = 10.0) -> list[Telemetry]:
        return self.ledger.wait_for(count, device_id, timeout, include_lost=False)

    # --- service-side operations -------------------------------------------------------------

    def send_c2d(self, device_id: str, body: str | bytes, properties: dict[str, Any] | None = None, *,
                 message_id: str | None = None, ttl: float | None = None, expiry_time: Any = None, ack: str | None = None) -> str:
        """Queue a cloud-to-device message; returns its id. `ttl`, `expiry_time`, `ack`: iothub/c2d_lifecycle.py."""
        body = c2d_body(body)  # checked before the call waits its turn (shaping.py)
        self._shape_c2d(device_id, properties, ttl, expiry_time, ack)  # the tier: shaping.py
        return self._act(self._c2d_sender(ttl, expiry_time, ack), device_id, body, properties, message_id)

    def invoke_method(self, device_id: str, method_name: str, payload: Any = None,
                      timeout: float = 30.0) -> MethodResponse:
        """Call a direct method: the device's response, 404 if it is offline/unsubscribed, 504 on timeout."""
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            raise RuntimeError("invoke_method blocks; it cannot be called from the hub thread")
        return _await_method(self, device_id, method_name, payload, float(timeout))

    async def invoke_method_async(self, device_id: str, method_name: str, payload: Any = None,
                                  timeout: float = 30.0) -> MethodResponse:
        return await asyncio.get_running_loop().run_in_executor(
            None, self.invoke_method, device_id, method_name, payload, timeout)

    def get_twin(self, device_id: str) -> dict[str, Any]:
        return self._act(self._running_core().get_twin, device_id)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        return self._act(self._running_core().update_desired, device_id, patch)

    # --- observation -------------------------------------------------------------------------

    @property
    def events(self) -> list[HubEvent]:
        return self.event_log.list()

    @property
    def errors(self) -> list[HubEvent]:
        """Internal errors of the hub thread; kept even when the event ring has let them go."""
        return self.event_log.errors()

    def wait_for_event(self, kind: str, device_id: str | None = None, timeout: float = 10.0,
                       where=None, after: float = 0.0) -> HubEvent:
        """Wait for the first event of `kind` (for `device_id`, matching `where`, logged at/after `after`)."""
        return self.event_log.wait_for(
            lambda e: e.kind == kind and (device_id is None or e.device_id == device_id)
            and e.at >= after and (where is None or where(e)),
            timeout, what=f"{kind!r} event" + (f" for device {device_id!r}" if device_id else ""))

    @property
    def region(self) -> str:
        return self._core.region if self._core else "primary"

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<FakeHub {self.hostname} at {self.gateway_host}:{self.port} {state}>"


def _await_method(hub: FakeHub, device_id: str, method_name: str, payload: Any, timeout: float) -> MethodResponse:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    hub._method_futures.add(fut)
    try:
        # set_result races stop()'s set_exception: whichever comes first wins
        hub._act(hub._running_core().invoke_method, device_id, method_name, payload, timeout,
                 lambda r: _set_result_once(fut, r))
        return fut.result(timeout + 30)
    except concurrent.futures.TimeoutError:
        # the hub answers every call by `timeout` (504 at the latest); only a stopped or
        # stuck hub thread gets here
        state = "was stopped" if not hub.running else "did not answer"
        raise TimeoutError(f"method {method_name!r} on device {device_id!r}: the hub {state} "
                           f"within {timeout + 30:g} s of the call") from None
    finally:
        hub._method_futures.discard(fut)
