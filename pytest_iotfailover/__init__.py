"""pytest-iotfailover: failover-resilience testing of Azure IoT Hub devices in pytest."""
from .hub import Device, FakeHub, HubEvent, HubOperationError, MethodResponse, Telemetry

__all__ = ["FakeHub", "Device", "Telemetry", "HubEvent", "MethodResponse", "HubOperationError"]
__version__ = "0.1.0"
