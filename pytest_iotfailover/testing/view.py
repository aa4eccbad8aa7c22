"""`HubView`: what a test sees as `iothub`, the session's hub narrowed to the test's own devices.

The view also carries the test's `Recorder` when the plugin made it: the delivery assertions add
their figures to it and read the fault windows from it, so nothing per-test lives in a module
global (and two views in one process never share a record).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..iothub.core import MethodResponse
from ..iothub.events import HubEvent
from ..iothub.ledger import Telemetry
from ..iothub.registry import Device
from ..redaction import forget_device, remember_device

if TYPE_CHECKING:
    from ..backends.base import Hub
    from .assertions import DeliveryFigures


class Recorder(Protocol):
    """The per-test record the plugin attaches to a view (plugin/reporting.py's TestRecord)."""

    handles: list[Any]  # the faults the test started, live

    def fault_windows(self) -> list[tuple[str, float, float | None]]: ...

    def add_delivery(self, figures: DeliveryFigures) -> None: ...


class HubView:
    """A test's window on the session's hub: devices it creates are removed afterwards, and
    `telemetry()` and `events` show only those devices."""

    _counter = itertools.count(1)

    def __init__(self, hub: Hub, test_name: str = "test", client_defaults: dict[str, Any] | None = None,
                 recorder: Recorder | None = None):
        self.hub = hub
        self.recorder = recorder
        self._slug = re.sub(r"[^A-Za-z0-9-]+", "-", test_name).strip("-")[:60] or "test"
        self.client_defaults = dict(client_defaults or {})
        self._devices: dict[str, Device] = {}
        self._clients: list[tuple[str, Any]] = []
        self._fault_mark = hub.fault_mark() if hasattr(hub, "fault_mark") else None

    # --- identity ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.hub.kind

    @property
    def hostname(self) -> str:
        return self.hub.hostname

    @property
    def ca_pem(self) -> str | None:
        return self.hub.ca_pem

    @property
    def fake(self) -> Any:
        """The FakeHub behind this view, or None on a real hub."""
        return getattr(self.hub, "fakehub", None)

    @property
    def devices(self) -> list[Device]:
        return list(self._devices.values())

    @property
    def device_ids(self) -> list[str]:
        return list(self._devices)

    def add_device(self, device_id: str | None = None) -> Device:
        """A fresh device identity for this test (removed at teardown)."""
        if device_id is None:
            device_id = f"{self._slug}-{next(self._counter)}"
        dev = self.hub.create_device(device_id)
        remember_device(dev.device_id, dev.primary_key, getattr(dev, "secondary_key", None))
        self._devices[dev.device_id] = dev
        return dev

    def add_devices(self, device_ids: Iterable[str] | int) -> list[Device]:
        """Several fresh identities for this test (removed at teardown): the given ids, or that
        many new ones. The embedded hub makes them in bulk registry calls (backends/fake.py); a
        hub without bulk creation makes them one by one."""
        if isinstance(device_ids, int):
            if isinstance(device_ids, bool) or device_ids < 1:
                raise ValueError(f"add_devices needs a positive number of devices, got {device_ids!r}")
            device_ids = [f"{self._slug}-{next(self._counter)}" for _ in range(device_ids)]
        ids = list(device_ids)
        bulk = getattr(self.hub, "create_devices", None)
        if bulk is None:
            return [self.add_device(device_id) for device_id in ids]
        made = bulk(ids)
        for dev in made:
            remember_device(dev.device_id, dev.primary_key, getattr(dev, "secondary_key", None))
            self._devices[dev.device_id] = dev
        return made

    def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        try:
            self.hub.delete_device(device_id)
        finally:
            forget_device(device_id)

    def client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kwargs = dict(self.hub.client_kwargs(), **self.client_defaults)
        kwargs.update(overrides)
        return kwargs

    def register_client(self, device_id: str, client: Any) -> None:
        self.hub.register_client(device_id, client)
        self._clients.append((device_id, client))

    def end_faults(self) -> list[Any]:
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
            except Exception as exc:
                errors.append(f"{device_id}: {exc}")
        if errors:
            raise RuntimeError("could not remove test devices: " + "; ".join(errors))

    # --- what the hub saw ----------------------------------------------------------------------

    def _scope(self, device_id: str | None) -> list[str]:
        return [device_id] if device_id is not None else list(self._devices)

    def telemetry(self, device_id: str | None = None, *, include_lost: bool = False) -> list[Telemetry]:
        if include_lost:  # only a hub that records what a failover lost can answer (TypeError otherwise)
            everything: Any = self.hub.telemetry  # the fake hub's; Hub's contract does not name it
            return everything(self._scope(device_id), include_lost=True)
        return self.hub.telemetry(self._scope(device_id))

    def wait_for_telemetry(self, count: int, device_id: str | None = None, timeout: float = 10.0) -> list[Telemetry]:
        scope = self._scope(device_id)
        if not self.hub.wait_until(lambda: len(self.hub.telemetry(scope)) >= count, timeout):
            got = len(self.hub.telemetry(scope))
            raise TimeoutError(f"waited {timeout:g} s for {count} telemetry messages from this test's "
                               f"devices; {got} arrived")
        return self.hub.telemetry(scope)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self.hub.wait_until(predicate, timeout)

    @property
    def events(self) -> list[HubEvent]:
        return self.hub.events(self._scope(None))

    # --- service operations ------------------------------------------------------------------

    def send_c2d(self, device_id: str, body: Any, properties: Any = None, **terms: Any) -> str:
        """`terms`: ttl, expiry_time, ack (FakeHub.send_c2d)."""
        return self.hub.send_c2d(device_id, body, properties, **terms)

    def feedback(self, device_id: str | None = None) -> list[Any]:
        """C2D feedback (iothub-ack) of this test's devices, or of `device_id`."""
        return self.hub.feedback(self._scope(device_id))

    def invoke_method(self, device_id: str, method_name: str, payload: Any = None,
                      timeout: float = 30.0) -> MethodResponse:
        return self.hub.invoke_method(device_id, method_name, payload, timeout)

    def get_twin(self, device_id: str) -> dict[str, Any]:
        return self.hub.get_twin(device_id)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        return self.hub.update_desired(device_id, patch)

    def __repr__(self) -> str:
        return f"<HubView {self.hub.kind} {self.hostname}: {len(self._devices)} test devices>"
