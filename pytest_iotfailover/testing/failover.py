"""The backend-neutral fault trigger behind the `failover` fixture."""
from typing import List, Optional

import pytest

from ..backends import FaultNotSupported, HubView


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
        self.handles: List = record.handles if record is not None else []

    def _start(self, kind: str, **kwargs):
        try:
            handle = self.iothub.hub.start_fault(kind, **kwargs)
        except FaultNotSupported as exc:
            pytest.skip(f"{kind} is not available on this hub: {exc}")
        self.handles.append(handle)
        return handle

    def __call__(self, outage: Optional[float] = None, **kwargs):
        return self.region_failover(outage=outage, **kwargs)

    def region_failover(self, outage: Optional[float] = None, **kwargs):
        return self._start("region_failover", outage=self.default_outage if outage is None else outage, **kwargs)

    def outage(self, seconds: float, **kwargs):
        return self.region_failover(outage=seconds, **kwargs)

    def drop(self, **kwargs):
        return self._start("drop", **kwargs)

    def blackhole(self, seconds: Optional[float] = None, **kwargs):
        return self._start("blackhole", seconds=seconds, **kwargs)

    def refuse(self, code: int = 3, seconds: Optional[float] = None, **kwargs):
        return self._start("refuse", code=code, seconds=seconds, **kwargs)

    def drop_before_ack(self, count: int = 1, **kwargs):
        return self._start("drop_before_ack", count=count, **kwargs)

    def delay_acks(self, seconds: float, duration: Optional[float] = None, **kwargs):
        return self._start("delay_acks", seconds=seconds, duration=duration, **kwargs)

    def throttle(self, rate: float, seconds: Optional[float] = None, **kwargs):
        return self._start("throttle", rate=rate, seconds=seconds, **kwargs)

    def expire_tokens(self, **kwargs):
        return self._start("expire_tokens", **kwargs)

    def reports(self):
        out = []
        for h in self.handles:
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
