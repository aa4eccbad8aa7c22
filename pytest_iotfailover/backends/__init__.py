"""The hubs a test can run against, behind one interface (`base.Hub`).

`fake.FakeBackend` wraps the embedded FakeHub; `real.backend.RealBackend` drives a real IoT Hub.
`open_backend` picks one from the settings, importing only the one it needs. What a test sees as
`iothub` (`HubView`) lives in testing/view.py; the name stays importable from here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import FaultNotSupported, RealHubUnavailable
from .base import FaultHandle, Hub

if TYPE_CHECKING:
    from ..testing.view import HubView

__all__ = ["FaultHandle", "FaultNotSupported", "Hub", "HubView", "RealHubUnavailable", "open_backend"]


def __getattr__(name: str) -> Any:
    if name == "HubView":
        from ..testing.view import HubView
        return HubView
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_backend(settings: Any, state_store: Any = None, progress: Any = None) -> Hub:
    """The session's hub: the embedded one, or the real hub of `--iothub-connection`.

    `state_store` (pytest's cache) keeps the failover quota across runs; `progress` gets a line
    now and then while a real failover runs (it takes minutes)."""
    if settings.backend == "fake":
        from .fake import FakeBackend
        return FakeBackend(settings.hub_name, tier=getattr(settings, "tier", "S1"),
                           units=getattr(settings, "tier_units", 1), dns=getattr(settings, "dns", False),
                           throttle_setup=getattr(settings, "throttle_setup", False),
                           nap=getattr(settings, "nap", None))
    try:
        from .real.arm import ArmFailover
        from .real.backend import RealBackend
    except ImportError as exc:
        raise RealHubUnavailable(
            f"running against a real IoT Hub needs the 'real' extra: pip install 'pytest-iotfailover[real]' "
            f"({exc})") from None
    hostname = _hostname_of(settings.connection_string)
    arm = ArmFailover(subscription_id=settings.subscription, resource_group=settings.resource_group,
                      hub_name=hostname.split(".")[0], allowed_hub=settings.allow_failover,
                      state_store=state_store, progress=progress)
    return RealBackend(settings.connection_string, eventhub_connection_string=settings.eventhub_connection_string,
                       arm=arm)


def _hostname_of(connection_string: str) -> str:
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip() == "HostName":
            return value.strip()
    raise RealHubUnavailable("--iothub-connection has no HostName")
