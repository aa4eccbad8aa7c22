"""The fault engine: regional failover, drops, silence, refusals, lost acks, throttling, expiry.

Policy only. The hub core asks it for verdicts (`on_open` for a new socket, `connect_verdict`,
`publish_verdict`, `on_accepted`) and the engine answers, or acts through the core's narrow
interface (`in_scope`, `close_conn`, `pause`, `arm`, `region`, `sessions`, `events`, `now`). It
holds no sockets and reads no clock: every time comes from the core's `now`, every delay is a
`Timer` action. The thread-safe face users call (`hub.faults`) is `fakehub.faults.Faults`.
"""
import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .mqtt import packets as p
from .rpo import data_loss, requeue_inflight

FAULT_PROPERTY = "AzIoTHub_FaultOperationType"
_DELAY_PROPERTY = "AzIoTHub_FaultOperationDelayInSecs"
_DURATION_PROPERTY = "AzIoTHub_FaultOperationDurationInSecs"

# what a device-side disconnect or attempt looks like in the event log: the client noticed
_CLIENT_SIDE_REASONS = {"connection_lost", "client"}
_ATTEMPT_KINDS = {"connect", "connect_refused", "auth_failure"}
_CLOSE_DELAY = 0.05
# fault-injection requests remembered to recognise their re-sends; a client re-sends within
# seconds, so the newest few per hub are enough, and the memory stays bounded
_MAX_INJECTED = 1024


class Flag:
    """Set once. The driver may give faults waitable flags instead (FaultEngine.new_flag)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class D2CAction:
    """What the fault engine wants done with one device-to-cloud publish."""
    __slots__ = ("ack_delay", "close_after_accept", "consume", "reason")

    def __init__(self, consume: bool = False, close_after_accept: bool = False, ack_delay: float = 0.0,
                 reason: str = ""):
        self.consume = consume                  # neither record nor acknowledge it
        self.close_after_accept = close_after_accept  # record it, then close before the PUBACK
        self.ack_delay = ack_delay
        self.reason = reason


PROCEED = D2CAction()  # shared: nobody changes a verdict


class Fault:
    """Engine-side state of one fault. Users hold a FaultHandle, not this."""

    def __init__(self, kind: str, device_id: str | None, lasts: float | None, **params: Any):
        self.id = 0  # the engine numbers faults per hub
        self.kind = kind
        self.device_id = device_id
        self.duration = lasts
        self.params = params
        self.state = "pending"
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.affected: list[str] = []
        self.done: Any = Flag()
        self.started: Any = Flag()
        self.silenced: set[Any] = set()
        self.countdown: int | None = None
        self.remaining = params.pop("remaining", 0)
        self.due_at: float | None = None   # wall-clock time it is to start, if known

    def targets(self, device_id: str | None) -> bool:
        return self.device_id is None or self.device_id == device_id


def _seconds_property(value: str | None) -> float | None:
    """A finite, non-negative number of seconds, or None for anything else."""
    try:
        seconds = float(value or 0)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class FaultEngine:
    TIMER_KINDS = frozenset({"fault_start", "fault_end", "close_soon"})

    def __init__(self, hub: Any):
        self.hub = hub
        self.events = hub.events
        self.active: list[Fault] = []
        self.waiting_for_messages: list[Fault] = []
        self.history: list[Fault] = []
        self.new_flag: Callable[[], Any] = Flag
        self._injected: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._gcra: dict[int, float] = {}
        # connections a failover left open and unanswered ("zombie" existing connections, "silent"
        # connects): the old region's front end never answers them again, so they stay paused
        # after the fault ends, until the client gives up on them
        self.zombies: set[Any] = set()
        self._ids = itertools.count(1)

    # --- scheduling (entered through the core's step, so `hub.now` is current) -------------------

    def schedule(self, fault: Fault, at: float | None, after_messages: int | None) -> Fault:
        now = self.hub.now
        if fault.kind == "region_failover":
            _refuse_overlap(self.history, fault, at, after_messages, now)
        fault.id = next(self._ids)
        fault.started, fault.done = self.new_flag(), self.new_flag()
        fault.due_at = None if after_messages else now + (at or 0)
        self.history.append(fault)
        if after_messages:
            fault.countdown = after_messages
            self.waiting_for_messages.append(fault)
        elif at:
            self.hub.arm(("fault_start", fault), now + at)
        else:
            self.start(fault)
        return fault

    def start(self, fault: Fault) -> None:
        if fault.state != "pending":
            return
        fault.started_at = self.hub.now
        fault.state = "active"
        fault.affected = sorted(d for d in self.hub.connections if fault.targets(d))
        self.events.add("fault_start", fault.device_id, fault=fault.kind, fault_id=fault.id,
                        affected=list(fault.affected), **fault.params)
        self.active.append(fault)
        fault.started.set()
        starter = getattr(self, "_start_" + fault.kind, None)
        if starter is not None:
            starter(fault)
        if fault.state == "active" and fault.duration is not None:
            self.hub.arm(("fault_end", fault), self.hub.now + fault.duration)

    def end(self, fault: Fault, cancelled: bool = False) -> None:
        if fault.state == "pending":
            self.hub.arm(("fault_start", fault), None)
            if fault in self.waiting_for_messages:
                self.waiting_for_messages.remove(fault)
            fault.state = "cancelled"
            self.events.add("fault_cancelled", fault.device_id, fault=fault.kind, fault_id=fault.id)
            fault.done.set()
            return
        if fault.state != "active":
            return
        self.hub.arm(("fault_end", fault), None)
        fault.ended_at = self.hub.now
        fault.state = "ended"
        self.active.remove(fault)
        for conn in fault.silenced:
            if not any(conn in f.silenced for f in self.active):
                self.hub.pause(conn, False)
        fault.silenced.clear()
        self._gcra.pop(fault.id, None)
        self.events.add("fault_end", fault.device_id, fault=fault.kind, fault_id=fault.id, cancelled=cancelled)
        fault.done.set()

    def timer_fired(self, key: tuple[Any, ...]) -> None:
        kind, subject = key[0], key[1]
        if kind == "fault_start":
            self.start(subject)
        elif kind == "fault_end":
            self.end(subject)
        elif kind == "close_soon":
            self.hub.close_conn(subject, key[2])

    def _close_in_scope(self, fault: Fault, reason: str, abort: bool) -> None:
        for conn in self.hub.in_scope(fault.device_id):
            self.hub.close_conn(conn, reason, abort, fault_id=fault.id)

    def _silence(self, fault: Fault, conn: Any) -> None:
        self.hub.pause(conn, True)
        fault.silenced.add(conn)

    # --- what each fault does when it starts -----------------------------------------------------

    def _start_region_failover(self, fault: Fault) -> None:
        hub = self.hub
        if fault.device_id is None:
            hub.region = "secondary" if hub.region == "primary" else "primary"
        if fault.params.get("existing") == "zombie":
            self._zombify_in_scope(fault)
        else:
            self._close_in_scope(fault, "region_failover", abort=True)
        self._failover_data_loss(fault)
        if not fault.params.get("keep_sessions"):
            # the secondary region has no MQTT sessions (an assumption: no document says what a
            # failover does to them): subscriptions and un-acked C2D are gone
            for device_id in [d for d in hub.sessions if fault.targets(d)]:
                if fault.params.get("keep_c2d"):
                    requeue_inflight(hub, device_id)
                del hub.sessions[device_id]

    def _failover_data_loss(self, fault: Fault) -> None:
        loss = data_loss(self.hub, fault)
        self.events.add("failover_data_loss", fault.device_id, fault_id=fault.id, **loss)

    def service_outage(self, device_id: str | None) -> bool:
        """Whether a regional failover covering `device_id` (None: the whole hub) is under way."""
        return any(f.kind == "region_failover" and (f.device_id is None or f.device_id == device_id)
                   for f in self.active)
    def _zombify(self, fault: Fault, conn: Any, how: str) -> None:
        self.hub.pause(conn, True)
        self.zombies.add(conn)
        self.events.add("connection_zombie", conn.device_id, fault=fault.kind, fault_id=fault.id, how=how)

    def _zombify_in_scope(self, fault: Fault) -> None:
        for conn in self.hub.in_scope(fault.device_id):
            self._zombify(fault, conn, "existing")

    def _failover_connect_verdict(self, fault: Fault, conn: Any) -> tuple[Fault, int | None]:
        if fault.params.get("connect") == "silent":
            self._zombify(fault, conn, "connect")
            return fault, None
        return fault, p.CONNACK_SERVER_UNAVAILABLE

    def _start_drop(self, fault: Fault) -> None:
        self._close_in_scope(fault, fault.params.get("reason", "drop"), abort=not fault.params.get("graceful"))
        self.end(fault)

    def _start_expire_tokens(self, fault: Fault) -> None:
        self._close_in_scope(fault, "token_expired", abort=False)
        self.end(fault)

    def _start_blackhole(self, fault: Fault) -> None:
        for conn in self.hub.in_scope(fault.device_id):
            self._silence(fault, conn)

    def _start_reject_publishes(self, fault: Fault) -> None:
        self._close_in_scope(fault, fault.params["reason"], abort=False)

    # --- verdicts ----------------------------------------------------------------------------------

    def on_open(self, conn: Any) -> None:
        """A new socket: a whole-hub outage resets it, a whole-hub blackhole silences it."""
        for fault in self.active:
            if fault.device_id is not None:
                continue
            if fault.kind == "region_failover" and fault.params.get("refuse") == "tcp":
                # accepted and reset at once: to the client, the same as a refused connection,
                # without giving up the address another hub could take meanwhile
                self.events.add("connect_refused", None, reason="region_failover", how="tcp",
                                peer=conn.peer, fault_id=fault.id)
                self.hub.close_conn(conn, "refused", abort=True)
                return
            if fault.kind == "blackhole":
                self._silence(fault, conn)
                return

    def on_lost(self, conn: Any) -> None:
        self.zombies.discard(conn)
        for fault in self.active:
            fault.silenced.discard(conn)

    def connect_verdict(self, conn: Any, client_id: str) -> tuple[Fault, int | None] | None:
        """None to proceed; (fault, CONNACK code) to refuse; (fault, None) to never answer."""
        for fault in self.active:
            if not fault.targets(client_id):
                continue
            if fault.kind == "region_failover":
                return self._failover_connect_verdict(fault, conn)
            if fault.kind == "refuse":
                return fault, fault.params["code"]
            if fault.kind == "blackhole":
                self._silence(fault, conn)
                return fault, None
        return None

    def close_soon(self, conn: Any, reason: str) -> None:
        # Not at once: paho 1.6 writes its re-sent publishes straight after CONNACK and its network
        # thread dies if the socket fails during that burst, leaving the SDK hung for good. The
        # real hub's reaction is not that quick either. Until the close, nothing more is accepted.
        if not conn.doomed:
            conn.doomed = True
            self.hub.arm(("close_soon", conn, reason), self.hub.now + _CLOSE_DELAY)

    def publish_verdict(self, conn: Any, pkt: Any, props: dict[str, str]) -> D2CAction:
        if conn.doomed:
            return D2CAction(consume=True)
        if FAULT_PROPERTY in props:
            injected = self._service_fault_injection(conn, pkt, props)
            if injected is not None:
                return injected
        action = PROCEED
        for fault in self.active:
            if not fault.targets(conn.device_id):
                continue
            kind = fault.kind
            if kind == "drop_before_ack":
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.hub.arm(("fault_end", fault), self.hub.now)
                return D2CAction(close_after_accept=True, reason="drop_before_ack")
            if kind == "reject_publishes":
                self.close_soon(conn, fault.params["reason"])
                return D2CAction(consume=True)
            delay = 0.0
            if kind == "throttle":
                throttled = self._throttle_delay(fault)
                if throttled is None:
                    self.close_soon(conn, "throttled")
                    return D2CAction(consume=True)
                delay = throttled
            elif kind == "delay_acks":
                delay = fault.params["seconds"]
            if delay > action.ack_delay:
                action = D2CAction(ack_delay=delay)
        return action

    def _throttle_delay(self, fault: Fault) -> float | None:
        """Generic cell rate algorithm: the delay this message's PUBACK gets, None when over the cap."""
        rate = fault.params["rate"]
        burst = fault.params["burst"]
        now = self.hub.now
        tat = max(self._gcra.get(fault.id, now), now)
        delay = max(tat - now - (burst - 1) / rate, 0.0)
        if delay > fault.params["max_delay"]:
            return None
        self._gcra[fault.id] = tat + 1.0 / rate
        return delay

    def on_accepted(self, conn: Any) -> None:
        if not self.waiting_for_messages:
            return  # nothing counts messages (the core skips the call then; other callers may not)
        for fault in list(self.waiting_for_messages):
            if fault.targets(conn.device_id) and fault.countdown is not None:
                fault.countdown -= 1
                if fault.countdown <= 0:
                    self.waiting_for_messages.remove(fault)
                    # a timer due now runs after this message's PUBACK has been written
                    self.hub.arm(("fault_start", fault), self.hub.now)

    # --- the real hub's fault-injection message properties ---------------------------------------

    def _service_fault_injection(self, conn: Any, pkt: Any, props: dict[str, str]) -> D2CAction | None:
        key = _injection_key(conn, pkt, props)
        if key in self._injected:
            return None  # a re-send of a request already honoured: a normal message now
        kind = props[FAULT_PROPERTY]
        delay = _seconds_property(props.get(_DELAY_PROPERTY))
        duration = _seconds_property(props.get(_DURATION_PROPERTY))
        if delay is None or duration is None:
            self.events.add("fault_injection_ignored", conn.device_id, type=kind,
                            message="delay/duration is not a finite, non-negative number")
            return None
        device = conn.device_id
        if kind == "KillTcp":
            fault = Fault("drop", device, None, reason="drop", source="KillTcp")
        elif kind == "ShutDownMqtt":
            fault = Fault("drop", device, None, graceful=True, reason="shutdown_mqtt", source="ShutDownMqtt")
        elif kind in ("InvokeThrottling", "InvokeMaxMessageQuota", "InvokeAuthError"):
            reason = {"InvokeThrottling": "throttled", "InvokeMaxMessageQuota": "quota_exceeded",
                      "InvokeAuthError": "auth_error"}[kind]
            fault = Fault("reject_publishes", device, duration, reason=reason, source=kind)
        else:
            self.events.add("fault_injection_ignored", device, type=kind,
                            message="not a fault IoT Hub injects over MQTT")
            return None
        self._injected[key] = None
        while len(self._injected) > _MAX_INJECTED:
            self._injected.popitem(last=False)
        self.events.add("fault_injection_requested", device, type=kind, delay=delay, duration=duration)
        self.schedule(fault, delay, None)
        # the real hub terminates the connection before acknowledging the request
        return D2CAction(consume=True)


def _refuse_overlap(history: list[Fault], fault: Fault, at: float | None, after_messages: int | None,
                now: float) -> None:
    """A second outage inside the first would find no connected device to fail over (its report
    would read 0/0 devices back) and end before or after the first one at random."""
    start = None if after_messages else now + (at or 0)
    for other in history:
        if other.kind != "region_failover" or other.state not in ("pending", "active"):
            continue
        if not (other.device_id is None or fault.device_id is None or other.device_id == fault.device_id):
            continue
        scope = "the whole hub" if other.device_id is None else f"device {other.device_id!r}"
        advice = ("outages must not overlap: wait for the first one (handle.wait()) or cancel it "
                  "before starting another")
        other_start = other.started_at if other.state == "active" else other.due_at
        if other_start is None:
            # it waits for messages, so when it will start cannot be known: any other may overlap
            raise ValueError(f"a region failover of {scope} is already waiting for messages "
                             f"(after_messages=); {advice}")
        other_end = other_start + (other.duration or 0)
        # a new one that waits for messages may start at any moment from now
        clash = (other_end > now if start is None
                 else start < other_end and other_start < start + (fault.duration or 0))
        if clash:
            when = ("running" if other.state == "active" else f"due in {max(other_start - now, 0):.1f} s")
            raise ValueError(
                f"a region failover of {scope} is already {when} (outage {other.duration or 0:g} s, over in "
                f"{max(other_end - now, 0):.1f} s); {advice}")


def _injection_key(conn: Any, pkt: Any, props: dict[str, str]) -> tuple[Any, ...]:
    mid = props.get("$.mid")
    if mid is not None:
        return (conn.device_id, mid)
    return (conn.device_id, hashlib.sha256(pkt.topic.encode() + b"\0" + bytes(pkt.payload)).digest())
