"""What every backend offers the fixtures: the `Hub` interface and the `FaultHandle` protocol.

Value types come from iothub/ and model.py, so that a backend (the real one above all) can be
written against this module without importing the embedded hub.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Collection
from typing import Any, Protocol, runtime_checkable

from ..iothub.core import MethodResponse
from ..iothub.events import HubEvent
from ..iothub.ledger import Telemetry
from ..iothub.registry import Device
from ..model import FaultSpec, RecoveryReport


@runtime_checkable
class FaultHandle(Protocol):
    """A started fault, whichever hub runs it: the embedded hub's handle and the real hub's one
    both have this shape."""

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> str:
        """"pending", "active", "ended" or "cancelled"."""

    @property
    def started_at(self) -> float | None: ...

    @property
    def ended_at(self) -> float | None: ...

    def wait(self, timeout: float | None = ...) -> Any:
        """Block until the fault is over; TimeoutError if it is not by then."""

    def cancel(self) -> Any:
        """Never start it, or end it now (RuntimeError where that is impossible)."""

    def report(self) -> RecoveryReport: ...


class Hub(abc.ABC):
    kind: str = "?"          # "fake" or "real"
    hostname: str = ""
    ca_pem: str | None = None

    @abc.abstractmethod
    def create_device(self, device_id: str) -> Device: ...

    @abc.abstractmethod
    def delete_device(self, device_id: str) -> None: ...

    @abc.abstractmethod
    def telemetry(self, device_ids: Collection[str] | None = None) -> list[Telemetry]: ...

    @abc.abstractmethod
    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Re-check `predicate` as telemetry arrives; False if unmet by the deadline."""

    @abc.abstractmethod
    def events(self, device_ids: Collection[str] | None = None) -> list[HubEvent]: ...

    @abc.abstractmethod
    def send_c2d(self, device_id: str, body: Any, properties: Any = None, *, ttl: float | None = None,
                 expiry_time: Any = None, ack: str | None = None) -> str:
        """Queue a C2D message. `ttl` (seconds) or `expiry_time` (epoch seconds or an aware
        datetime; default one hour, at most two days: 403009 beyond), `ack` for feedback."""

    @abc.abstractmethod
    def feedback(self, device_ids: Collection[str] | None = None) -> list[Any]:
        """C2D feedback records (iothub/c2d_lifecycle.FeedbackRecord) of `device_ids` (None: all);
        a backend that cannot read them raises its own error saying why."""

    @abc.abstractmethod
    def invoke_method(self, device_id: str, method_name: str, payload: Any = None,
                      timeout: float = 30.0) -> MethodResponse: ...

    @abc.abstractmethod
    def get_twin(self, device_id: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int: ...

    @abc.abstractmethod
    def start_fault(self, spec: FaultSpec) -> Any:
        """Start the fault `spec` describes; returns its handle. FaultNotSupported naming the
        parameter when this hub cannot honour it."""

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every SDK client for this hub needs (e.g. the CA to trust)."""
        return {"server_verification_cert": self.ca_pem} if self.ca_pem else {}

    def register_client(self, device_id: str, client: Any) -> None:
        """A fixture made `client` for `device_id` (a real hub injects faults through it)."""

    def unregister_client(self, device_id: str, client: Any = None) -> None:
        """The client is gone."""

    def fault_mark(self) -> Any:
        """Where the hub's fault history stands now, for `end_faults_since`."""
        return None

    def end_faults_since(self, mark: Any) -> list[Any]:
        """End every fault started since `mark` that is still pending or active, whichever API
        started it; the handles of all faults started since then."""
        return []

    def finish(self, failback: bool = False) -> None:
        """End of the session: undo what must not outlive it (a real hub fails back if asked)."""

    def close(self) -> None:
        """Release the hub (stop the embedded one, close service connections)."""
