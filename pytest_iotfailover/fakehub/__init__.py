"""The I/O around `iothub`: the asyncio TLS server, the thread-safe `FakeHub` facade, the HTTP
control API and the `iotfailover-hub` command."""
from typing import TYPE_CHECKING

__all__ = ["FakeHub", "HubInternalError"]

if TYPE_CHECKING:
    from .hub import FakeHub, HubInternalError


def __getattr__(name: str):
    # The plugin checks its options with this package's light rules (nap.py, rules.py) in runs that
    # never make a hub; importing them must not load the server, TLS and certificate code.
    if name in __all__:
        from . import hub
        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
