"""How a device client is built: one place that checks the arguments and calls the SDK."""
from __future__ import annotations

from typing import Any

from .. import checks
from ..connstr import device_fields

__all__ = ["check_server_cert", "create_client"]


def check_server_cert(value: Any) -> str | None:
    """PEM text of the CA the client trusts (the FakeHub's), or None for the system's trust store."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError("server_verification_cert must be PEM text (str) or None")
    return value


def create_client(connection_string: str, *, server_verification_cert: str | None = None,
                  aio: bool = False, **sdk_kwargs: Any) -> Any:
    """An `IoTHubDeviceClient` (or its `aio` twin) for `connection_string`, not connected yet.

    Everything in `sdk_kwargs` goes to `create_from_connection_string` unchanged, so recovery is
    the SDK's own unless you pass `connection_retry=False`.
    """
    device_fields("connection_string", connection_string)
    if check_server_cert(server_verification_cert) is not None:
        sdk_kwargs["server_verification_cert"] = server_verification_cert
    if checks.boolean("aio", aio):
        from azure.iot.device.aio import IoTHubDeviceClient as AioIoTHubDeviceClient
        return AioIoTHubDeviceClient.create_from_connection_string(connection_string, **sdk_kwargs)
    from azure.iot.device import IoTHubDeviceClient
    return IoTHubDeviceClient.create_from_connection_string(connection_string, **sdk_kwargs)
