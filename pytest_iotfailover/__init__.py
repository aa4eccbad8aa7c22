"""pytest-iotfailover: failover-resilience testing of Azure IoT Hub devices in pytest."""
from .fakehub.hub import (Device, FakeHub, FaultHandle, HubEvent, HubOperationError, MethodResponse,
                  RecoveryReport, Telemetry)

from .testing.assertions import assert_all_delivered, assert_in_order, assert_no_duplicates
from .devices.pool import DevicePool
from .devices.outbox import AsyncOutbox, Outbox, OutboxClosed, OutboxFull

__all__ = ["FakeHub", "Device", "Telemetry", "HubEvent", "MethodResponse", "HubOperationError",
           "FaultHandle", "RecoveryReport",
           "assert_all_delivered", "assert_no_duplicates", "assert_in_order",
           "Outbox", "AsyncOutbox", "OutboxFull", "OutboxClosed", "DevicePool"]
__version__ = "0.1.0"
