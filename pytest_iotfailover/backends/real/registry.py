"""Test devices on a real hub: created through the registry (azure-iot-hub) for the
run and deleted afterwards, or the one device of a device connection string.

Every device this backend creates is `iotfo-<run prefix>-<name>`; the run prefix
starts with the UTC creation time, so a later run can sweep the devices a crashed run
left behind.
"""

from __future__ import annotations

import datetime
import logging
import re
import secrets as _random
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from ...iothub.auth import device_connection_string
from ...iothub.core import HubOperationError
from ...iothub.ledger import Telemetry
from ...iothub.registry import Device, check_device_id, new_key
from ...redaction import redact, remember
from .errors import RealBackendError, call_service

__all__ = [
    "DEVICE_PREFIX",
    "HTTP_TIMEOUT",
    "SWEEP_AGE",
    "RunDevices",
    "close_registry_manager",
    "make_run_prefix",
    "open_registry_manager",
    "sweep_leftovers",
]

log = logging.getLogger(__name__)

DEVICE_PREFIX = "iotfo-"
SWEEP_AGE = 3600.0  # devices of runs older than this are leftovers of a crashed run
SWEEP_LIST_LIMIT = 1000  # what the registry's device listing returns at most
HTTP_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds for registry and twin calls
_LEFTOVER = re.compile(r"^iotfo-(\d{14})[0-9a-f]{4}-")
_RUN_PREFIX = re.compile(r"^[A-Za-z0-9]{1,40}$")
_ONE_DEVICE = ("a device connection string gives one device; "
               "device_client_factory(count>1), pools and a second iothub_device need "
               "a service connection string (SharedAccessKeyName=...)")
_NO_SERVICE = ("{what} needs a service connection string "
               "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...) in "
               "--iothub-connection; a device connection string cannot act as the "
               "service")


def make_run_prefix(created_at: float, run_prefix: str | None = None) -> str:
    """The given prefix, checked, or `<UTC yyyymmddHHMMSS><4 hex digits>`."""
    if run_prefix is None:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(created_at))
        return stamp + _random.token_hex(2)
    if not isinstance(run_prefix, str) or not _RUN_PREFIX.match(run_prefix):
        raise ValueError(
            f"run_prefix must be 1-40 ASCII letters and digits, got {run_prefix!r}")
    return run_prefix


def open_registry_manager(connection_string: str, ca_bundle: str | None = None) -> Any:
    try:
        from azure.iot.hub import IoTHubRegistryManager  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RealBackendError("a real hub with a service connection string needs "
                               "azure-iot-hub and six (which it uses without "
                               "declaring it): pip install azure-iot-hub "
                               f"six ({exc})") from None
    try:
        registry = IoTHubRegistryManager.from_connection_string(connection_string)
    except Exception as exc:
        raise RealBackendError(f"--iothub-connection: {redact(str(exc))}") from None
    config = getattr(getattr(registry, "protocol", None), "config", None)
    if config is not None:
        config.connection.timeout = HTTP_TIMEOUT
        if ca_bundle:
            config.connection.verify = ca_bundle
    return registry


def close_registry_manager(registry: Any) -> None:
    """Close its AMQP (C2D) and HTTP sessions; a failure is logged, not raised."""
    amqp = getattr(registry, "amqp_svc_client", None)
    for closer in (getattr(amqp, "disconnect_sync", None),
                   getattr(getattr(registry, "protocol", None), "close", None)):
        if closer is not None:
            try:
                closer()
            except Exception as exc:
                log.warning("%s", redact(f"closing the registry client: {exc}"))


def _born_at(device_id: str) -> float | None:
    """When the run that made `device_id` started, if it is a device of this plugin."""
    m = _LEFTOVER.match(device_id)
    if not m:
        return None
    try:
        born = datetime.datetime.strptime(m.group(1), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return born.replace(tzinfo=datetime.UTC).timestamp()


def _warn(text: str) -> None:
    # points at whoever called RealBackend.sweep_leftovers()
    warnings.warn(redact(f"pytest-iotfailover: {text}")[:500], RuntimeWarning,
                  stacklevel=4)


def sweep_leftovers(registry: Any, now: float, max_age: float = SWEEP_AGE) -> list[str]:
    """Delete `iotfo-` devices of runs that started more than `max_age` s before `now`;
    warn, never fail."""
    try:
        listed = registry.get_devices(SWEEP_LIST_LIMIT) or []
    except Exception as exc:
        _warn(f"could not list devices to sweep leftovers: {type(exc).__name__}: {exc}")
        return []
    removed: list[str] = []
    for item in listed:
        device_id = getattr(item, "device_id", None)
        if device_id is None and isinstance(item, dict):
            device_id = item.get("deviceId")
        if not isinstance(device_id, str):
            continue
        born = _born_at(device_id)
        if born is None or now - born <= max_age:
            continue
        try:
            registry.delete_device(device_id)
            removed.append(device_id)
        except Exception as exc:
            _warn(f"could not delete leftover device {device_id!r}: "
                  f"{type(exc).__name__}: {exc}")
    if removed:
        log.info("deleted %d leftover devices of earlier runs", len(removed))
    return removed


class RunDevices:
    """The devices of one run, by the names tests gave them and by their full ids.

    `manager` is the registry manager (None with a device connection string, and after
    close). `single` is the device of a device connection string: every test gets it,
    each seeing only what arrives from its own `create()` on (`position()` is the
    ledger's length then)."""

    def __init__(self, hostname: str, run_prefix: str, manager: Any = None,
                 single: Device | None = None, position: Callable[[], int] = lambda: 0):
        self.hostname = hostname
        self.run_prefix = run_prefix
        self.manager = manager
        self.single = single
        self._position = position
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        self._aliases: dict[str, str] = {}
        self._ours: set[str] = set()
        self._epochs: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def need_service(self, what: str) -> Any:
        if self.manager is None:
            raise RealBackendError(_NO_SERVICE.format(what=what))
        return self.manager

    def resolve(self, device_id: str) -> str:
        with self._lock:
            if device_id in self._devices:
                return device_id
            return self._aliases.get(device_id, device_id)

    def is_ours(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._ours

    def visible(self, items: list[Telemetry]) -> list[Telemetry]:
        """The ledger's `items` without what the single device sent before the current
        test took it."""
        with self._lock:
            epochs = dict(self._epochs)
        if not epochs:
            return items
        return [t for i, t in enumerate(items) if i >= epochs.get(t.device_id, 0)]

    def create(self, device_id: str) -> Device:
        if self.single is not None:
            return self._take_single(self.single, device_id)
        check_device_id(device_id)
        own = f"{DEVICE_PREFIX}{self.run_prefix}-"
        full_id = device_id if device_id.startswith(own) else own + device_id
        check_device_id(full_id)
        manager = self.need_service("creating a device")
        primary, secondary = new_key(), new_key()
        remember(primary, secondary)
        with self._lock:
            # telemetry may reach the ledger before the registry call has returned
            self._ours.add(full_id)
        call_service(f"creating device {full_id!r}", manager.create_device_with_sas,
                     full_id, primary, secondary, "enabled")
        cs = device_connection_string(self.hostname, full_id, primary)
        device = Device(full_id, primary, cs, secondary)
        with self._lock:
            self._devices[full_id] = device
            if device_id != full_id:
                self._aliases[device_id] = full_id
        return device

    def _take_single(self, single: Device, device_id: str) -> Device:
        with self._lock:
            if single.device_id in self._devices:
                raise RealBackendError(_ONE_DEVICE)
            self._devices[single.device_id] = single
            self._ours.add(single.device_id)
            self._epochs[single.device_id] = self._position()
            if device_id != single.device_id:
                self._aliases[device_id] = single.device_id
        return single

    def forget(self, device_id: str) -> str:
        """Drop `device_id` from the run; its full id. Deleting it is delete()'s job."""
        full_id = self.resolve(device_id)
        with self._lock:
            self._devices.pop(full_id, None)
        return full_id

    def delete(self, full_id: str) -> None:
        if self.single is not None:
            return  # not ours to delete
        manager = self.need_service("deleting a device")
        try:
            call_service(f"deleting device {full_id!r}", manager.delete_device, full_id)
        except HubOperationError as exc:
            if exc.error_code // 1000 != 404:  # already gone is what we wanted
                raise
