"""What DevicePool raises, and its record of replaced clients."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["DeviceConnectionError", "DeviceTimeoutError", "Recreation"]


class Recreation(NamedTuple):
    """One replaced client: which device, when the new one was connected (time.time()), and why."""
    device_id: str
    at: float
    reason: str


class DeviceConnectionError(ConnectionError):
    """Devices the pool cannot reach: `reasons` maps each device id to why (secrets redacted)."""

    def __init__(self, message: str, reasons: dict[str, str]):
        super().__init__(message)
        self.reasons = dict(reasons)
        self.device_ids = list(reasons)


class DeviceTimeoutError(TimeoutError):
    """An operation on `device_id` did not finish within its deadline."""

    def __init__(self, message: str, device_id: str):
        super().__init__(message)
        self.device_id = device_id
