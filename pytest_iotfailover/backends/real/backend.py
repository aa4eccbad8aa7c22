"""A real Azure IoT Hub behind the `Hub` interface.

* Identities (registry.py): with a service connection string (one with
  `SharedAccessKeyName=`) every test device is created through the registry
  (azure-iot-hub) as `iotfo-<run prefix>-<name>` and deleted at teardown; the run
  prefix starts with the UTC creation time, so a later run can sweep devices a
  crashed run left behind. A device connection string gives exactly that one device.
* The delivery ledger (ledger.py) is read from the hub's built-in Event
  Hub-compatible endpoint with azure-eventhub, from the moment the backend was
  created, so it already covers a test's first send.
* Service calls (service.py): C2D, direct methods and twins through azure-iot-hub.
* Faults (faults.py): the hub's own fault-injection messages, sent through the test's
  device client, and a regional manual failover through the ARM helper (arm.py).
  Faults that need control of the hub's network stack (blackhole, refusals, lost or
  late PUBACKs) exist only on the embedded fake hub.

Nothing this package raises, logs or returns as a repr carries a key, a SAS signature
or a token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from ...iothub.auth import parse_connection_string
from ...iothub.core import MethodResponse
from ...iothub.events import HubEvent
from ...iothub.ledger import Telemetry
from ...iothub.registry import Device
from ...model import FaultSpec
from ...redaction import redact, remember
from ...waiting import WaitingLedger as Ledger
from ..base import Hub
from .errors import RealBackendError
from .faults import FaultInjector, RealFaultHandle
from .ledger import (
    EVENTHUB_OPTION,
    EndpointLedger,
    check_eventhub_connection_string,
    default_consumer_factory,
    derive_eventhub_connection_string,
    telemetry_from_event,
)
from .registry import (
    DEVICE_PREFIX,
    SWEEP_AGE,
    RunDevices,
    close_registry_manager,
    make_run_prefix,
    open_registry_manager,
    sweep_leftovers,
)
from .service import ServiceCalls

__all__ = [
    "DEVICE_PREFIX",
    "RealBackend",
    "RealBackendError",
    "RealFaultHandle",
    "derive_eventhub_connection_string",
    "telemetry_from_event",
]

_OPTION = "--iothub-connection"


# the fields, "service" or "device", and a device connection string's device
_Credentials = tuple[dict[str, str], str, "Device | None"]


def _hub_credentials(connection_string: Any) -> _Credentials:
    """What --iothub-connection gives; errors name what is wrong, never the key."""
    if not isinstance(connection_string, str):
        raise RealBackendError(f"{_OPTION} must be a connection string")
    try:
        fields = parse_connection_string(connection_string)
    except ValueError as exc:
        raise RealBackendError(f"{_OPTION}: {redact(str(exc))}") from None
    remember(fields.get("SharedAccessKey"), fields.get("SharedAccessSignature"))
    if "SharedAccessKeyName" in fields:
        if "SharedAccessKey" not in fields:
            raise RealBackendError(
                f"{_OPTION}: a service connection string needs SharedAccessKey=")
        return fields, "service", None
    if "DeviceId" not in fields:
        raise RealBackendError(
            f"{_OPTION}: expected a service connection string "
            "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...) or a device "
            "one (HostName=...;DeviceId=...;SharedAccessKey=...)")
    if "ModuleId" in fields:
        raise RealBackendError(f"{_OPTION}: a module connection string is not "
                               "supported; give a device or service connection string")
    if "SharedAccessKey" not in fields:
        raise RealBackendError(f"{_OPTION}: a device connection string needs "
                               "SharedAccessKey= (X.509 and SAS-token connection "
                               "strings are not supported)")
    # verbatim: a GatewayHostName in it (an IoT Edge gateway) is part of how it connects
    single = Device(fields["DeviceId"], fields["SharedAccessKey"],
                    connection_string.strip())
    return fields, "device", single


class RealBackend(Hub):
    """A real IoT Hub: ephemeral devices, a ledger from the built-in endpoint, injected
    faults. The parts live in this package's modules; this class joins them."""

    kind = "real"
    ca_pem = None

    def __init__(self, connection_string: str, *,
                 eventhub_connection_string: str | None = None,
                 run_prefix: str | None = None, registry: Any = None,
                 eventhub_consumer_factory: Callable[[str], Any] | None = None,
                 sweep: bool = True, clock: Callable[[], float] = time.time,
                 arm: Any = None, ca_bundle: str | None = None,
                 consumer_group: str = "$Default", fault_watch: float = 60.0):
        """`registry`: an IoTHubRegistryManager (default: one for
        `connection_string`). `eventhub_consumer_factory(connection_string)`: an
        EventHubConsumerClient-like object (default:
        EventHubConsumerClient.from_connection_string). `arm`: the ARM failover
        helper, without which `region_failover` is unavailable. `ca_bundle`: a PEM
        file to trust for the hub's HTTPS and AMQP endpoints (a TLS-inspecting proxy,
        a test stub)."""
        self._closed = False
        fields, self.mode, single = _hub_credentials(connection_string)
        self._connection_string = connection_string
        self._ca_bundle, self._consumer_group = ca_bundle, consumer_group
        self._clock = clock
        self.hostname = fields["HostName"]
        self.created_at = clock()
        self.run_prefix = make_run_prefix(self.created_at, run_prefix)
        self._devices = RunDevices(self.hostname, self.run_prefix, single=single,
                                   position=lambda: len(self.ledger))
        factory = eventhub_consumer_factory
        if factory is None:  # not `or`: a list-like factory may be empty, hence falsy
            factory = default_consumer_factory(ca_bundle, consumer_group)
        self._ledger = EndpointLedger(factory, self._devices.is_ours, self.created_at,
                                      clock, derive=self._derive_eventhub)
        self._service = ServiceCalls(self._devices)
        self._faults = FaultInjector(self._devices.resolve, self.telemetry, clock, arm,
                                     fault_watch, after_failover=self.reconnect_ledger)
        if eventhub_connection_string is None and self.mode == "device":
            raise RealBackendError("with a device connection string the delivery "
                                   "ledger needs the built-in endpoint's own "
                                   f"connection string: pass {EVENTHUB_OPTION} (a "
                                   "device key cannot read it)")
        if eventhub_connection_string is not None:
            check_eventhub_connection_string(eventhub_connection_string)
        try:
            if self.mode == "service":
                if registry is None:
                    registry = open_registry_manager(connection_string, ca_bundle)
                self._devices.manager = registry
                if sweep:
                    self.sweep_leftovers()
            self._ledger.open(eventhub_connection_string)
        except BaseException:
            self.close()
            raise

    def _derive_eventhub(self) -> str:
        return derive_eventhub_connection_string(self._connection_string,
                                                 ca_bundle=self._ca_bundle,
                                                 consumer_group=self._consumer_group)

    # --- identities ------------------------------------------------------------------

    def create_device(self, device_id: str) -> Device:
        return self._devices.create(device_id)

    def delete_device(self, device_id: str) -> None:
        full_id = self._devices.forget(device_id)
        self._faults.unregister_client(full_id)
        self._devices.delete(full_id)

    def sweep_leftovers(self, max_age: float = SWEEP_AGE) -> list[str]:
        """Delete `iotfo-` devices of runs that started more than `max_age` s ago; warn,
        never fail."""
        registry = self._devices.need_service("sweeping leftover devices")
        return sweep_leftovers(registry, self._clock(), max_age)

    def register_client(self, device_id: str, client: Any) -> None:
        """The device client faults are injected through (the hub's fault requests
        are D2C messages)."""
        self._faults.register_client(device_id, client)

    def unregister_client(self, device_id: str, client: Any = None) -> None:
        self._faults.unregister_client(device_id, client)

    # --- the ledger ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """What the built-in endpoint delivered for this run's devices."""
        return self._ledger.ledger

    @property
    def ledger_errors(self) -> list[str]:
        """What went wrong reading the built-in endpoint, redacted."""
        return self._ledger.errors

    def reconnect_ledger(self, eventhub_connection_string: str | None = None) -> None:
        """Restart the ledger's reader, e.g. after a failover moved the built-in
        endpoint.

        It starts again a little before the last event seen on any partition (or the
        backend's start); events read twice are recorded once. A derived endpoint is
        looked up again."""
        self._ledger.reconnect(eventhub_connection_string)

    def telemetry(self, device_ids: Collection[str] | None = None) -> list[Telemetry]:
        items = self._devices.visible(self.ledger.items())
        if device_ids is None:
            return items
        wanted = {self._devices.resolve(d) for d in device_ids}
        return [t for t in items if t.device_id in wanted]

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return bool(self.ledger.wait_until(predicate, timeout))

    def events(self, device_ids: Collection[str] | None = None) -> list[HubEvent]:
        """Always empty: a real hub keeps no connection log this backend could read
        (Azure Monitor's connection logs arrive minutes late), so recovery is
        measured from the clients' side."""
        return []

    # --- service operations and faults -----------------------------------------------

    def send_c2d(self, device_id: str, body: Any, properties: Any = None, **terms: Any) -> str:
        return self._service.send_c2d(device_id, body, properties, **terms)

    def feedback(self, device_ids: Collection[str] | None = None) -> list[Any]:
        return self._service.feedback(device_ids)

    def invoke_method(self, device_id: str, method_name: str, payload: Any = None,
                      timeout: float = 30.0) -> MethodResponse:
        return self._service.invoke_method(device_id, method_name, payload, timeout)

    def get_twin(self, device_id: str) -> dict[str, Any]:
        return self._service.get_twin(device_id)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        return self._service.update_desired(device_id, patch)

    def start_fault(self, spec: FaultSpec) -> Any:
        """Start `spec` through the service's fault injection or ARM (faults.SUPPORT says which
        parameters a real hub honours); FaultNotSupported naming any other."""
        return self._faults.start(spec)

    def finish(self, failback: bool = False) -> None:
        """End of the session: with `failback`, return a hub this run failed over to its
        first region."""
        self._faults.finish(failback)

    # --- life cycle ------------------------------------------------------------------

    def client_kwargs(self) -> dict[str, Any]:
        return {}  # the hub's certificate chains to a public CA the SDK already trusts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ledger.close()
        manager, self._devices.manager = self._devices.manager, None
        if manager is not None:
            close_registry_manager(manager)

    def __repr__(self) -> str:
        # also for an instance whose __init__ failed half-way (a traceback's locals)
        devices = getattr(self, "_devices", None)
        reader = getattr(self, "_ledger", None)
        return (f"<RealBackend {getattr(self, 'mode', '?')} {self.hostname} "
                f"run={getattr(self, 'run_prefix', '?')} "
                f"devices={len(devices) if devices is not None else 0} "
                f"ledger={len(reader.ledger) if reader is not None else 0}>")
