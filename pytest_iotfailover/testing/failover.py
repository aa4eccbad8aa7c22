"""The backend-neutral fault trigger behind the `failover` fixture.

No pytest here: a fault the hub cannot produce raises FaultNotSupported, which the plugin turns
into a skip of the test; the failover marker is checked by the plugin too (plugin/markers.py).
"""
from typing import List, Optional

from .view import HubView


_TARGETING = ("device_id", "at", "after_messages")
# what each call takes besides _TARGETING: checked here so a mistake names the user's call, not
# the hub method it lands on
_CALLS = {
    "failover": ("outage", "keep_sessions", "refuse"),
    "region_failover": ("outage", "keep_sessions", "refuse"),
    "outage": ("seconds", "keep_sessions", "refuse"),
    "drop": ("graceful",),
    "blackhole": ("seconds",),
    "refuse": ("code", "seconds"),
    "drop_before_ack": ("count",),
    "delay_acks": ("seconds", "duration"),
    "throttle": ("rate", "seconds", "burst", "max_delay"),
    "expire_tokens": (),
}


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

    def _start(self, kind: str, call: Optional[str] = None, **kwargs):
        call = call or kind
        name = "failover()" if call == "failover" else f"failover.{call}()"
        allowed = _CALLS[call] + _TARGETING
        for key in kwargs:
            if key not in allowed:
                raise TypeError(f"{name} got an unexpected keyword argument {key!r}; it takes "
                                + ", ".join(f"{k}=" for k in allowed))
        if call == "outage":
            kwargs["outage"] = kwargs.pop("seconds")
        device_id = kwargs.get("device_id")
        if isinstance(device_id, str) and self.iothub.fake is None and device_id not in self.iothub.device_ids:
            # a real hub injects a device's faults through the test's own client of it (the
            # embedded hub checks its registry itself)
            raise ValueError(f"{name}: device_id={device_id!r} is not one of this test's devices "
                             f"({', '.join(self.iothub.device_ids) or 'none yet'})")
        try:
            handle = self.iothub.hub.start_fault(kind, **kwargs)
        except (TypeError, ValueError) as exc:
            text = str(exc)
            if call == "outage":
                text = text.replace("outage must", "seconds must")
            raise type(exc)(f"{name}: {text}") from None
        self.handles.append(handle)
        return handle

    def __call__(self, outage: Optional[float] = None, **kwargs):
        return self._start("region_failover", "failover",
                           outage=self.default_outage if outage is None else outage, **kwargs)

    def region_failover(self, outage: Optional[float] = None, **kwargs):
        return self._start("region_failover", outage=self.default_outage if outage is None else outage, **kwargs)

    def outage(self, seconds: float, **kwargs):
        return self._start("region_failover", "outage", seconds=seconds, **kwargs)

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
