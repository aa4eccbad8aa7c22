"""The `Hub` interface every fixture uses, whichever hub is behind it.

`FakeBackend` wraps the embedded FakeHub; a real-hub backend satisfies the same interface.
`HubView` is what a test sees as `iothub`: the session's hub narrowed to the test's own devices.
"""
import abc
import itertools
import re
from typing import Any, Callable, Collection, Dict, List, Optional

from ..fakehub.hub import Device, HubEvent, MethodResponse, Telemetry
from ..redaction import forget_device, remember_device
from ..errors import FaultNotSupported, RealHubUnavailable
from ..model import FaultSpec





class Hub(abc.ABC):
    kind: str = "?"          # "fake" or "real"
    hostname: str = ""
    ca_pem: Optional[str] = None

    @abc.abstractmethod
    def create_device(self, device_id: str) -> Device: ...

    @abc.abstractmethod
    def delete_device(self, device_id: str) -> None: ...

    @abc.abstractmethod
    def telemetry(self, device_ids: Optional[Collection[str]] = None) -> List[Telemetry]: ...

    @abc.abstractmethod
    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Re-check `predicate` as telemetry arrives; False if unmet by the deadline."""

    @abc.abstractmethod
    def events(self, device_ids: Optional[Collection[str]] = None) -> List[HubEvent]: ...

    @abc.abstractmethod
    def send_c2d(self, device_id: str, body, properties=None) -> str: ...

    @abc.abstractmethod
    def invoke_method(self, device_id: str, method_name: str, payload=None, timeout: float = 30.0) -> MethodResponse: ...

    @abc.abstractmethod
    def get_twin(self, device_id: str) -> Dict[str, Any]: ...

    @abc.abstractmethod
    def update_desired(self, device_id: str, patch: Dict[str, Any]) -> int: ...

    @abc.abstractmethod
    def start_fault(self, spec: FaultSpec):
        """Start the fault `spec` describes (model.py, the vocabulary both hubs share); returns its
        handle. FaultNotSupported naming the kind or the changed parameter this hub cannot honour."""

    def client_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments every SDK client for this hub needs (e.g. the CA to trust)."""
        return {"server_verification_cert": self.ca_pem} if self.ca_pem else {}

    def register_client(self, device_id: str, client) -> None:
        """A fixture made `client` for `device_id` (a real hub injects faults through it)."""

    def unregister_client(self, device_id: str, client=None) -> None:
        """The client is gone."""

    def fault_mark(self) -> Any:
        """Where the hub's fault history stands now, for `end_faults_since`."""
        return None

    def end_faults_since(self, mark: Any) -> List:
        """End every fault started since `mark` that is still pending or active, whichever API
        started it; the handles of all faults started since then."""
        return []

    def finish(self, failback: bool = False) -> None:
        """End of the session: undo what must not outlive it (a real hub fails back if asked)."""

    def close(self) -> None:
        pass


class HubView:
    """A test's window on the session's hub: devices it creates are removed afterwards, and
    `telemetry()` and `events` show only those devices."""

    _counter = itertools.count(1)

    def __init__(self, hub: Hub, test_name: str = "test", client_defaults: Optional[Dict[str, Any]] = None):
        self.hub = hub
        self._slug = re.sub(r"[^A-Za-z0-9-]+", "-", test_name).strip("-")[:60] or "test"
        self.client_defaults = dict(client_defaults or {})
        self._devices: Dict[str, Device] = {}
        self._clients: List = []
        self._fault_mark = hub.fault_mark() if hasattr(hub, "fault_mark") else None

    # --- identity ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.hub.kind

    @property
    def hostname(self) -> str:
        return self.hub.hostname

    @property
    def ca_pem(self) -> Optional[str]:
        return self.hub.ca_pem

    @property
    def fake(self):
        """The FakeHub behind this view, or None on a real hub."""
        return getattr(self.hub, "fakehub", None)

    @property
    def devices(self) -> List[Device]:
        return list(self._devices.values())

    @property
    def device_ids(self) -> List[str]:
        return list(self._devices)

    def add_device(self, device_id: Optional[str] = None) -> Device:
        """A fresh device identity for this test (removed at teardown)."""
        if device_id is None:
            device_id = f"{self._slug}-{next(self._counter)}"
        dev = self.hub.create_device(device_id)
        remember_device(dev.device_id, dev.primary_key, getattr(dev, "secondary_key", None))
        self._devices[dev.device_id] = dev
        return dev

    def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        try:
            self.hub.delete_device(device_id)
        finally:
            forget_device(device_id)

    def client_kwargs(self, **overrides) -> Dict[str, Any]:
        kwargs = dict(self.hub.client_kwargs(), **self.client_defaults)
        kwargs.update(overrides)
        return kwargs

    def register_client(self, device_id: str, client) -> None:
        self.hub.register_client(device_id, client)
        self._clients.append((device_id, client))

    def end_faults(self) -> List:
        """End the faults started on the hub since this view was made (through `failover`,
        `fake.faults` or anything else); their handles."""
        return self.hub.end_faults_since(self._fault_mark) if hasattr(self.hub, "end_faults_since") else []

    def close(self) -> None:
        for device_id, client in self._clients:
            self.hub.unregister_client(device_id, client)
        self._clients.clear()
        errors = []
        for device_id in list(self._devices):
            try:
                self.remove_device(device_id)
            except Exception as exc:  # keep removing the others
                errors.append(f"{device_id}: {exc}")
        if errors:
            raise RuntimeError("could not remove test devices: " + "; ".join(errors))

    # --- what the hub saw ----------------------------------------------------------------------

    def _scope(self, device_id: Optional[str]) -> List[str]:
        return [device_id] if device_id is not None else list(self._devices)

    def telemetry(self, device_id: Optional[str] = None) -> List[Telemetry]:
        return self.hub.telemetry(self._scope(device_id))

    def wait_for_telemetry(self, count: int, device_id: Optional[str] = None, timeout: float = 10.0) -> List[Telemetry]:
        scope = self._scope(device_id)
        if not self.hub.wait_until(lambda: len(self.hub.telemetry(scope)) >= count, timeout):
            got = len(self.hub.telemetry(scope))
            raise TimeoutError(f"waited {timeout:g} s for {count} telemetry messages from this test's "
                               f"devices; {got} arrived")
        return self.hub.telemetry(scope)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self.hub.wait_until(predicate, timeout)

    @property
    def events(self) -> List[HubEvent]:
        return self.hub.events(self._scope(None))

    # --- service operations ------------------------------------------------------------------

    def send_c2d(self, device_id: str, body, properties=None) -> str:
        return self.hub.send_c2d(device_id, body, properties)

    def invoke_method(self, device_id: str, method_name: str, payload=None, timeout: float = 30.0) -> MethodResponse:
        return self.hub.invoke_method(device_id, method_name, payload, timeout)

    def get_twin(self, device_id: str) -> Dict[str, Any]:
        return self.hub.get_twin(device_id)

    def update_desired(self, device_id: str, patch: Dict[str, Any]) -> int:
        return self.hub.update_desired(device_id, patch)

    def __repr__(self):
        return f"<HubView {self.hub.kind} {self.hostname}: {len(self._devices)} test devices>"


def open_backend(settings, state_store=None, progress=None) -> Hub:
    """The session's hub: the embedded one, or the real hub of `--iothub-connection`.

    `state_store` (pytest's cache) keeps the failover quota across runs; `progress` gets a line
    now and then while a real failover runs (it takes minutes)."""
    if settings.backend == "fake":
        from .fake import FakeBackend
        return FakeBackend(settings.hub_name)
    try:
        from .real.arm import ArmFailover
        from .real.backend import RealBackend
    except ImportError as exc:
        raise RealHubUnavailable(
            f"running against a real IoT Hub needs the 'real' extra: pip install 'pytest-iotfailover[real]' "
            f"({exc})") from None
    hostname = _hostname_of(settings.connection_string)
    arm = ArmFailover(subscription_id=settings.subscription, resource_group=settings.resource_group,
                      hub_name=hostname.split(".")[0], allowed_hub=settings.allow_failover,
                      state_store=state_store, progress=progress)
    return RealBackend(settings.connection_string, eventhub_connection_string=settings.eventhub_connection_string,
                       arm=arm)




def _hostname_of(connection_string: str) -> str:
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip() == "HostName":
            return value.strip()
    raise RealHubUnavailable("--iothub-connection has no HostName")
