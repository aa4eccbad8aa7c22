"""Device identities: ids, keys and enabled/disabled status."""
import base64
import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

from .auth import device_connection_string

# IoT Hub device ids: case-sensitive, up to 128 ASCII alphanumerics and - : . + % _ # * ? ! ( ) , = @ ; $ '
_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}$")


@dataclass(frozen=True)
class Device:
    device_id: str
    primary_key: str
    connection_string: str
    secondary_key: str = ""
    enabled: bool = True

    def __repr__(self):  # keys stay out of reprs, logs and assertion output
        return f"Device(device_id={self.device_id!r}, enabled={self.enabled})"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


def check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: IoT Hub allows 1-128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '")
    if "#" in device_id or "+" in device_id:
        # legal in IoT Hub, but MQTT forbids them in topic names and the SDKs do not encode ids
        raise ValueError(f"device id {device_id!r} contains '#' or '+', which MQTT devices cannot use in topics")


class Registry:
    def __init__(self, hostname: str, gateway_host: Optional[str] = None):
        self.hostname = hostname
        self.gateway_host = gateway_host
        self._devices: Dict[str, Device] = {}
        self._lock = threading.Lock()

    def add(self, device_id: str, primary_key: Optional[str] = None,
            secondary_key: Optional[str] = None, enabled: bool = True) -> Device:
        check_device_id(device_id)
        for name, key in (("primary_key", primary_key), ("secondary_key", secondary_key)):
            if key is not None:
                try:
                    base64.b64decode(key, validate=True)
                except Exception:
                    raise ValueError(f"{name} for device {device_id!r} is not valid base64") from None
        primary_key = primary_key or new_key()
        device = Device(device_id, primary_key,
                        device_connection_string(self.hostname, device_id, primary_key, self.gateway_host),
                        secondary_key or new_key(), enabled)
        with self._lock:
            if device_id in self._devices:
                raise ValueError(f"device {device_id!r} already exists")
            self._devices[device_id] = device
        return device

    def get(self, device_id: str) -> Optional[Device]:
        return self._devices.get(device_id)

    def remove(self, device_id: str) -> Device:
        with self._lock:
            try:
                return self._devices.pop(device_id)
            except KeyError:
                raise KeyError(f"no device {device_id!r}") from None

    def set_enabled(self, device_id: str, enabled: bool) -> Device:
        from dataclasses import replace
        with self._lock:
            if device_id not in self._devices:
                raise KeyError(f"no device {device_id!r}")
            dev = self._devices[device_id] = replace(self._devices[device_id], enabled=enabled)
        return dev

    def all(self) -> List[Device]:
        with self._lock:
            return list(self._devices.values())
