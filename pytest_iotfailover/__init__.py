"""pytest-iotfailover: failover-resilience testing of Azure IoT Hub devices in pytest."""
from .hub import (Device, FakeHub, FaultHandle, HubEvent, HubOperationError, MethodResponse,
                  RecoveryReport, Telemetry)

from .assertions import assert_all_delivered, assert_in_order, assert_no_duplicates
from .clients import DevicePool
from .outbox import AsyncOutbox, Outbox, OutboxClosed, OutboxFull

__all__ = ["FakeHub", "Device", "Telemetry", "HubEvent", "MethodResponse", "HubOperationError",
           "FaultHandle", "RecoveryReport",
           "assert_all_delivered", "assert_no_duplicates", "assert_in_order",
           "Outbox", "AsyncOutbox", "OutboxFull", "OutboxClosed", "DevicePool"]
__version__ = "0.1.0"
