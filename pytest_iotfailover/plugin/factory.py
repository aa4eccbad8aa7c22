"""Device clients for fixtures: created on the test's hub, always shut down afterwards."""
from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..testing.view import HubView

SHUTDOWN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 30.0


def run_bounded(fn, timeout: float, what: str):
    """Run a blocking SDK call on a helper thread: the SDK's calls have no timeout of their own."""
    result, error = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            error.append(exc)
    t = threading.Thread(target=target, name=f"iotfailover:{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:g} s")
    if error:
        raise error[0]
    return result[0] if result else None


def shutdown_quietly(client, what: str = "device client") -> None:
    try:
        run_bounded(client.shutdown, SHUTDOWN_TIMEOUT, f"{what} shutdown")
    except TimeoutError:
        warnings.warn(pytest.PytestWarning(f"{what} did not shut down within {SHUTDOWN_TIMEOUT:g} s; "
                                           "its threads are left to die with the process"))
    except Exception:  # noqa: BLE001, S110 - a client the hub already dropped may complain; it is closed either way
        pass


def make_client(iothub: HubView, device: Any, aio: bool = False, **sdk_kwargs: Any) -> Any:
    if aio:
        from azure.iot.device.aio import IoTHubDeviceClient as AsyncClient
        return AsyncClient.create_from_connection_string(device.connection_string,
                                                         **iothub.client_kwargs(**sdk_kwargs))
    from azure.iot.device import IoTHubDeviceClient
    return IoTHubDeviceClient.create_from_connection_string(device.connection_string,
                                                            **iothub.client_kwargs(**sdk_kwargs))


class DeviceClientFactory:
    """`device_client_factory(count=1, pooled=False, **sdk_kwargs)`: N connected clients on N fresh
    devices (a list), or with `pooled=True` one connected DevicePool."""

    def __init__(self, iothub: HubView):
        self.iothub = iothub
        self._clients: list[Any] = []
        self._pools: list[Any] = []

    def __call__(self, count: int = 1, pooled: bool = False, connect: bool = True, **sdk_kwargs):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        devices = [self.iothub.add_device() for _ in range(count)]
        if pooled:
            from ..devices.pool import DevicePool
            kwargs: dict[str, Any] = self.iothub.client_kwargs(**sdk_kwargs)
            kwargs.pop("connection_retry_interval", None)  # the pool does its own retrying
            pool = DevicePool(devices, **kwargs)
            self._pools.append(pool)
            for dev in devices:
                self.iothub.register_client(dev.device_id, pool)
            if connect:
                pool.connect()
            return pool
        clients = []
        for dev in devices:
            client = make_client(self.iothub, dev, **sdk_kwargs)
            self.iothub.register_client(dev.device_id, client)
            self._clients.append(client)
            clients.append(client)
        if connect:
            for client in clients:
                run_bounded(client.connect, CONNECT_TIMEOUT, "device client connect")
        return clients

    def close(self) -> None:
        for pool in self._pools:
            try:
                pool.close()
            except Exception as exc:  # noqa: BLE001 - close the other pools and clients too
                warnings.warn(pytest.PytestWarning(f"closing a DevicePool failed: {exc}"))
        threads = [threading.Thread(target=shutdown_quietly, args=(c,), daemon=True) for c in self._clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SHUTDOWN_TIMEOUT + 1)
