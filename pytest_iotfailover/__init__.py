"""pytest-iotfailover: failover-resilience testing of Azure IoT Hub devices in pytest.

Public names are imported on first use (PEP 562): pytest loads this package for every run where the
plugin is installed, and most of those runs never touch a hub, so the SDK, trustme and cryptography
must not be imported here.
"""
from typing import TYPE_CHECKING, Any

from ._version import __version__

_PUBLIC = {
    "FakeHub": ".fakehub.hub",
    "Device": ".fakehub.hub",
    "Telemetry": ".fakehub.hub",
    "HubEvent": ".fakehub.hub",
    "MethodResponse": ".fakehub.hub",
    "HubOperationError": ".fakehub.hub",
    "FaultHandle": ".fakehub.hub",
    "RecoveryReport": ".fakehub.hub",
    "assert_all_delivered": ".testing.assertions",
    "assert_no_duplicates": ".testing.assertions",
    "assert_in_order": ".testing.assertions",
    "Outbox": ".devices.outbox",
    "AsyncOutbox": ".devices.outbox",
    "OutboxFull": ".devices.outbox",
    "OutboxClosed": ".devices.outbox",
    "DevicePool": ".devices.pool",
}

__all__ = ["AsyncOutbox", "Device", "DevicePool", "FakeHub", "FaultHandle", "HubEvent", "HubOperationError",
           "MethodResponse", "Outbox", "OutboxClosed", "OutboxFull", "RecoveryReport", "Telemetry",
           "__version__", "assert_all_delivered", "assert_in_order", "assert_no_duplicates"]
assert sorted(__all__) == sorted([*_PUBLIC, "__version__"])  # one list for ruff and mypy, one for the look-up

if TYPE_CHECKING:
    from .devices.outbox import AsyncOutbox, Outbox, OutboxClosed, OutboxFull
    from .devices.pool import DevicePool
    from .fakehub.hub import (
        Device,
        FakeHub,
        FaultHandle,
        HubEvent,
        HubOperationError,
        MethodResponse,
        RecoveryReport,
        Telemetry,
    )
    from .testing.assertions import assert_all_delivered, assert_in_order, assert_no_duplicates


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(__all__)
