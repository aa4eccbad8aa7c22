"""IoT Hub connection strings: `Key=value;Key=value`, as the SDKs split them.

A leaf module (standard library only): the hub, the device clients and the plugin's options all
read connection strings, and none of them may depend on another for it. The key names are those
of the Azure IoT SDKs' connection strings (azure-iot-device `connection_string.py`); anything else
is refused so that a typo does not silently drop a field.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["device_fields", "parse_connection_string"]

_CS_KEYS = {"HostName", "DeviceId", "ModuleId", "SharedAccessKey", "SharedAccessKeyName",
            "SharedAccessSignature", "GatewayHostName", "x509"}
_SECRET_KEYS = ("SharedAccessKey", "SharedAccessSignature")


def parse_connection_string(cs: str) -> dict[str, str]:
    """Split `Key=value;Key=value` the way the SDKs do; unknown or repeated keys are errors."""
    if not isinstance(cs, str) or not cs.strip():
        raise ValueError("connection string is empty")
    out: dict[str, str] = {}
    for index, part in enumerate(cs.strip().strip(";").split(";"), 1):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            # the segment itself is not quoted: a mistyped separator would print a key
            raise ValueError(f"connection string segment {index} is not Key=value")
        if key not in _CS_KEYS:
            # quote only what looks like a key name, never what may be a mangled secret
            shown = repr(key) if re.fullmatch(r"[A-Za-z]{1,40}", key) else f"in segment {index}"
            raise ValueError(f"connection string has unknown key {shown}")
        if key in out:
            raise ValueError(f"connection string repeats key {key!r}")
        out[key] = value
    if "HostName" not in out:
        raise ValueError("connection string has no HostName")
    return out




def device_fields(name: str, value: Any) -> dict[str, str]:
    """The fields of a device connection string given as argument `name`; ValueError naming the
    argument otherwise. The parser's messages never quote a value, so no key can leak here."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty connection string")
    try:
        return parse_connection_string(value)
    except ValueError as exc:
        raise ValueError(f"{name} is not a device connection string: {exc}") from None
