"""The I/O around `iothub`: the asyncio TLS server, the thread-safe `FakeHub` facade, the HTTP
control API and the `iotfailover-hub` command."""
from .hub import FakeHub, HubInternalError

__all__ = ["FakeHub", "HubInternalError"]
