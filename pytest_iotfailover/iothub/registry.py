"""Device identities: ids, keys and enabled/disabled status.

No lock: every change is a single dict operation, atomic under the GIL, and the hub thread
only reads."""
import base64
import os
import re
from dataclasses import dataclass, replace

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

    def __repr__(self) -> str:  # keys stay out of reprs, logs and assertion output
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
    def __init__(self, hostname: str, gateway_host: str | None = None):
        self.hostname = hostname
        self.gateway_host = gateway_host
        self._devices: dict[str, Device] = {}

    def add(self, device_id: str, primary_key: str | None = None,
            secondary_key: str | None = None, enabled: bool = True) -> Device:
        self.check_new(device_id, primary_key, secondary_key)
        primary_key = primary_key or new_key()
        device = Device(device_id, primary_key,
                        device_connection_string(self.hostname, device_id, primary_key, self.gateway_host),
                        secondary_key or new_key(), enabled)
        # setdefault is one atomic step: two threads adding one id cannot both succeed
        if self._devices.setdefault(device_id, device) is not device:
            raise ValueError(f"device {device_id!r} already exists")
        return device

    def check_new(self, device_id: str, primary_key: str | None = None, secondary_key: str | None = None) -> None:
        """Raise ValueError if `add` would refuse these arguments (a bad id or key, an id in use)."""
        check_device_id(device_id)
        for name, key in (("primary_key", primary_key), ("secondary_key", secondary_key)):
            if key is not None:
                try:
                    base64.b64decode(key, validate=True)
                except (ValueError, TypeError):
                    raise ValueError(f"{name} for device {device_id!r} is not valid base64") from None
        if device_id in self._devices:
            raise ValueError(f"device {device_id!r} already exists")

    def check_known(self, device_id: str) -> None:
        """Raise KeyError, as `remove` and `set_enabled` would, if there is no such device."""
        if self._devices.get(device_id) is None:
            raise KeyError(f"no device {device_id!r}")

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def remove(self, device_id: str) -> Device:
        try:
            return self._devices.pop(device_id)
        except KeyError:
            raise KeyError(f"no device {device_id!r}") from None

    def set_enabled(self, device_id: str, enabled: bool) -> Device:
        current = self._devices.get(device_id)
        if current is None:
            raise KeyError(f"no device {device_id!r}")
        dev = self._devices[device_id] = replace(current, enabled=enabled)
        return dev

    def all(self) -> list[Device]:
        return list(self._devices.values())
