"""The backend-neutral fault trigger behind the `failover` fixture: each call builds its fault's
`FaultSpec` (model.py), naming the call the user wrote in every error, and hands it to the
session's backend, which refuses what it cannot honour.

No pytest here: a fault the hub cannot produce raises FaultNotSupported, which the plugin turns
into a skip of the test; the failover marker is checked by the plugin too (plugin/markers.py)."""
from typing import Any

from ..errors import FaultNotSupported
from ..model import FaultKind, FaultSpec, spec_for
from .view import HubView


class Failover:
    """Start faults on the test's hub; each call returns at once with the fault's handle
    (`.wait()` blocks until the hub is back, `.report()` says how recovery went).

    `failover()` is a regional failover with the default outage. Keyword arguments shared by all:
    `device_id=` (one device instead of the whole hub), `at=` (seconds from now) and
    `after_messages=` (after the hub accepted N more messages).
    """

    def __init__(self, iothub: HubView, default_outage: float = 2.0, record=None):
        self.iothub = iothub
        self.default_outage = default_outage
        self.handles: list = record.handles if record is not None else []

    def _spec(self, kind: FaultKind, what: str, kwargs: dict[str, Any], seconds_is_outage: bool) -> FaultSpec:
        if not seconds_is_outage:
            return spec_for(kind, kwargs, what=what)
        # failover.outage(seconds) names the spec's `outage` after its own argument
        if "outage" in kwargs:
            raise TypeError(f"{what} got an unexpected keyword argument 'outage'; give the outage as seconds")
        kwargs = dict(kwargs)
        kwargs["outage"] = kwargs.pop("seconds")
        try:
            return spec_for(kind, kwargs, what=what)
        except (TypeError, ValueError) as exc:
            text = str(exc).replace("outage must", "seconds must").replace("outage=", "seconds=")
            raise type(exc)(text) from None

    def _start(self, kind: FaultKind, what: str, seconds_is_outage: bool = False, **kwargs):
        spec = self._spec(kind, what, kwargs, seconds_is_outage)
        device_id = spec.device_id
        if device_id is not None and self.iothub.fake is None and device_id not in self.iothub.device_ids:
            # a real hub injects a device's faults through the test's own client of it (the
            # embedded hub checks its registry itself)
            raise ValueError(f"{what}: device_id={device_id!r} is not one of this test's devices "
                             f"({', '.join(self.iothub.device_ids) or 'none yet'})")
        try:
            handle = self.iothub.hub.start_fault(spec)
        except FaultNotSupported as exc:
            # the plugin turns this into a skip of the test, with the reason
            raise FaultNotSupported(f"{what}: {exc}") from None
        except (TypeError, ValueError) as exc:
            # the hub's own refusals: an unknown device, an outage overlapping another
            raise type(exc)(f"{what}: {exc}") from None
        self.handles.append(handle)
        return handle

    def __call__(self, outage: float | None = None, **kwargs):
        return self._start(FaultKind.REGION_FAILOVER, "failover()",
                           outage=self.default_outage if outage is None else outage, **kwargs)

    def region_failover(self, outage: float | None = None, **kwargs):
        return self._start(FaultKind.REGION_FAILOVER, "failover.region_failover()",
                           outage=self.default_outage if outage is None else outage, **kwargs)

    def outage(self, seconds: float, **kwargs):
        return self._start(FaultKind.REGION_FAILOVER, "failover.outage()", True, seconds=seconds, **kwargs)

    def drop(self, **kwargs):
        return self._start(FaultKind.DROP, "failover.drop()", **kwargs)

    def blackhole(self, seconds: float | None = None, **kwargs):
        return self._start(FaultKind.BLACKHOLE, "failover.blackhole()", seconds=seconds, **kwargs)

    def refuse(self, code: int = 3, seconds: float | None = None, **kwargs):
        return self._start(FaultKind.REFUSE, "failover.refuse()", code=code, seconds=seconds, **kwargs)

    def drop_before_ack(self, count: int = 1, **kwargs):
        return self._start(FaultKind.DROP_BEFORE_ACK, "failover.drop_before_ack()", count=count, **kwargs)

    def delay_acks(self, seconds: float, duration: float | None = None, **kwargs):
        return self._start(FaultKind.DELAY_ACKS, "failover.delay_acks()", seconds=seconds, duration=duration,
                           **kwargs)

    def throttle(self, rate: float | None = None, seconds: float | None = None, **kwargs):
        """`rate=None`: every publish in the window closes its connection, the throttle a real hub
        can produce too (its InvokeThrottling); with a rate, traffic shaping (embedded hub only)."""
        return self._start(FaultKind.THROTTLE, "failover.throttle()", rate=rate, seconds=seconds, **kwargs)

    def expire_tokens(self, **kwargs):
        return self._start(FaultKind.EXPIRE_TOKENS, "failover.expire_tokens()", **kwargs)

    def reports(self):
        return self.reports_of(self.handles)

    @staticmethod
    def reports_of(handles):
        out = []
        for h in handles:
            try:
                out.append(h.report())
            except RuntimeError:
                pass  # the hub is already gone; nothing left to measure
        return out

    def end_all(self) -> None:
        """End faults the test left running, so the next test starts on a healthy hub."""
        for h in self.handles:
            if h.state in ("pending", "active"):
                try:
                    h.cancel()
                except RuntimeError:
                    pass  # a real regional failover cannot be cancelled; it runs to its end
