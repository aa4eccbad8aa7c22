"""Device clients for fixtures: created on the test's hub, always shut down afterwards."""
import threading
import warnings
import weakref
from typing import Any

import pytest

from .. import wedge
from ..deadline import call_with_deadline
from ..testing.view import HubView

SHUTDOWN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 30.0


def run_bounded(fn, timeout: float, what: str):
    """Run a blocking SDK call on a helper thread: the SDK's calls have no timeout of their own."""
    return call_with_deadline(fn, timeout, what)


# One wedge monitor per embedded hub (its liveness probe asks that hub), one for real hubs.
_monitors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_real_hub_monitor: wedge.WedgeMonitor | None = None
_monitor_of: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_monitors_lock = threading.Lock()


def _monitor_for(iothub: HubView) -> wedge.WedgeMonitor:
    global _real_hub_monitor
    fake = getattr(iothub, "fake", None)
    with _monitors_lock:
        if fake is None:
            if _real_hub_monitor is None:
                _real_hub_monitor = wedge.WedgeMonitor()
            return _real_hub_monitor
        monitor = _monitors.get(fake)
        if monitor is None:
            monitor = _monitors[fake] = wedge.WedgeMonitor(liveness_probe=_probe(fake))
        return monitor


def _probe(fake):
    ref = weakref.ref(fake)

    def connected_devices():
        hub = ref()
        return hub.connected_devices() if hub is not None and hub.running else None
    return connected_devices


def hub_liveness_probe(iothub: HubView):
    """What the embedded hub says is connected, for DevicePool's `liveness_probe`; None on a real hub."""
    fake = getattr(iothub, "fake", None)
    return None if fake is None else _probe(fake)


def shutdown_quietly(client, what: str = "device client") -> None:
    with _monitors_lock:
        monitor = _monitor_of.pop(client, None)
    wedges = monitor.remove(client) if monitor is not None else []
    try:
        run_bounded(client.shutdown, SHUTDOWN_TIMEOUT, f"{what} shutdown")
    except TimeoutError:
        warnings.warn(pytest.PytestWarning(f"{what} did not shut down within {SHUTDOWN_TIMEOUT:g} s; "
                                           "its threads are left to die with the process"))
    except Exception:
        pass  # a client the hub already dropped may complain; it is closed either way
    if wedges:
        wedge.release(client)
        for w in wedges:
            warnings.warn(pytest.PytestWarning(
                f"{what} {w.text}: the plugin revived it, but production code on this SDK has the "
                "same hazard (README: \"When the SDK client dies silently\")"))


def wedges_of(client) -> list[wedge.Wedge]:
    """The wedges the fixtures' monitor found on `client` so far."""
    with _monitors_lock:
        monitor = _monitor_of.get(client)
    return monitor.found(client) if monitor is not None else []


def make_client(iothub: HubView, device, aio: bool = False, **sdk_kwargs):
    """A client for `device` that the fixtures' wedge monitor watches: a client whose network
    thread died while it still reports connected is named in the test's report and warnings and
    revived through the SDK's own reconnect (see wedge.py)."""
    from ..devices.client import create_client

    client = create_client(device.connection_string, aio=aio, **iothub.client_kwargs(**sdk_kwargs))
    monitor = _monitor_for(iothub)
    monitor.add(client, device.device_id)
    with _monitors_lock:
        _monitor_of[client] = monitor
    return client


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
        devices = self.iothub.add_devices(count)  # in bulk where the hub can (testing/view.py)
        if pooled:
            from ..devices.pool import DevicePool
            kwargs: dict[str, Any] = self.iothub.client_kwargs(**sdk_kwargs)
            kwargs.pop("connection_retry_interval", None)  # the pool does its own retrying
            probe = hub_liveness_probe(self.iothub)
            if probe is not None:
                kwargs.setdefault("liveness_probe", probe)
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
            except Exception as exc:
                warnings.warn(pytest.PytestWarning(f"closing a DevicePool failed: {exc}"))
        threads = [threading.Thread(target=shutdown_quietly, args=(c,), daemon=True) for c in self._clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SHUTDOWN_TIMEOUT + 1)
