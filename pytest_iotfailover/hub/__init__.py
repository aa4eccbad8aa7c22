"""Former home of the embedded hub, kept so `from pytest_iotfailover.hub import FakeHub` and
`python -m pytest_iotfailover.hub` still work; the hub now lives in `pytest_iotfailover.fakehub`."""
from ..errors import HubInternalError, HubOperationError
from ..fakehub.hub import Device, FakeHub, FaultHandle, HubEvent, MethodResponse, RecoveryReport, Telemetry

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
