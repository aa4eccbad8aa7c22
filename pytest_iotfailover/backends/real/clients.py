"""The device clients faults are injected through: an SDK client (sync or aio) or a
DevicePool, and taps on their connection-state callbacks."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["StateTap", "connected", "is_device_client", "sdk_client", "send_through"]


def is_device_client(client: Any) -> bool:
    pool_clients = getattr(client, "clients", None)
    return hasattr(client, "send_message") or isinstance(pool_clients, dict)


def sdk_client(client: Any, device_id: str) -> Any:
    if hasattr(client, "send_message"):
        return client
    # A DevicePool: its current client for the device. Not pool.send(), which retries
    # on a new client after the drop and so would ask the hub for the fault again.
    clients = getattr(client, "clients", None)
    return clients.get(device_id) if isinstance(clients, dict) else None


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def send_through(client: Any, device_id: str, message: Any) -> None:
    target = sdk_client(client, device_id)
    if target is None:
        raise RuntimeError(
            f"no client for {device_id!r} to send the fault request through")
    result = target.send_message(message)
    if inspect.isawaitable(result):
        # an aio client: its pipeline runs on the SDK's own threads, so any event
        # loop can wait on it
        asyncio.run(_await(result))


def connected(client: Any, device_id: str) -> bool | None:
    """The client's `connected` flag; None when it has none, False for a pool without a
    client for the device."""
    target = sdk_client(client, device_id)
    if target is None:
        return False if hasattr(client, "clients") else None
    return bool(target.connected) if hasattr(target, "connected") else None


class StateTap:
    """Times a client's connection-state changes, still calling the handler it already
    had."""

    def __init__(self, client: Any, clock: Callable[[], float]):
        self.client = client
        # (when, `connected` as the callback saw it)
        self.changes: list[tuple[float, bool | None]] = []
        self.previous: Any = getattr(client, "on_connection_state_change", None)
        self._clock = clock
        self.tap: Callable[[], Any] = (self._async_tap
                                       if inspect.iscoroutinefunction(self.previous)
                                       else self._sync_tap)
        self.installed = False
        if hasattr(client, "on_connection_state_change"):
            try:
                client.on_connection_state_change = self.tap
                self.installed = True
            except Exception:
                pass  # polling only

    def _note(self) -> None:
        self.changes.append((self._clock(), getattr(self.client, "connected", None)))

    def _sync_tap(self) -> None:
        self._note()
        if self.previous is not None:
            self.previous()

    async def _async_tap(self) -> None:
        self._note()
        await self.previous()

    def remove(self) -> None:
        # only if nobody replaced it meanwhile
        current = getattr(self.client, "on_connection_state_change", None)
        if self.installed and current == self.tap:
            try:
                self.client.on_connection_state_change = self.previous
            except Exception:
                pass
        self.installed = False
