"""pytest-iotfailover: failover-resilience testing of Azure IoT Hub devices in pytest."""
from .hub import (Device, FakeHub, FaultHandle, HubEvent, HubOperationError, MethodResponse,
                  RecoveryReport, Telemetry)

__all__ = ["FakeHub", "Device", "Telemetry", "HubEvent", "MethodResponse", "HubOperationError",
           "FaultHandle", "RecoveryReport"]
__version__ = "0.1.0"
