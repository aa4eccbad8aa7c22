"""The fault engine: regional failover, drops, silence, refusals, lost acks, throttling, expiry.

The hub core and the server consult one `FaultEngine` through a handful of hooks
(`on_socket`, `on_connect_attempt`, `on_d2c`, `on_accepted`); all of its state lives on the hub
thread, so a fault applies to existing and new connections in a single loop step. The
thread-safe face users call (`hub.faults`) is `fakehub.faults.Faults`.
"""
import itertools
import threading
import time
from typing import Dict, List, Optional

from .mqtt import packets as p

FAULT_PROPERTY = "AzIoTHub_FaultOperationType"
_DELAY_PROPERTY = "AzIoTHub_FaultOperationDelayInSecs"
_DURATION_PROPERTY = "AzIoTHub_FaultOperationDurationInSecs"

# what a device-side disconnect or attempt looks like in the event log: the client noticed
_CLIENT_SIDE_REASONS = {"connection_lost", "client"}
_ATTEMPT_KINDS = {"connect", "connect_refused", "auth_failure"}
_CLOSE_DELAY = 0.05


class D2CAction:
    """What the fault engine wants done with one device-to-cloud publish."""
    __slots__ = ("consume", "close_after_accept", "ack_delay", "reason")

    def __init__(self, consume=False, close_after_accept=False, ack_delay=0.0, reason=""):
        self.consume = consume                  # neither record nor acknowledge it
        self.close_after_accept = close_after_accept  # record it, then close before the PUBACK
        self.ack_delay = ack_delay
        self.reason = reason


class Fault:
    """Engine-side state of one fault. Users hold a FaultHandle, not this."""

    def __init__(self, kind: str, device_id: Optional[str], lasts: Optional[float], **params):
        self.id = 0  # the engine numbers faults per hub
        self.kind = kind
        self.device_id = device_id
        self.duration = lasts
        self.params = params
        self.state = "pending"
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.affected: List[str] = []
        self.done = threading.Event()
        self.started = threading.Event()
        self.silenced: set = set()
        self.countdown: Optional[int] = None
        self.remaining = params.pop("remaining", 0)
        self._timer = None
        self.due_at: Optional[float] = None   # time.time() it is to start, if known

    def targets(self, device_id: Optional[str]) -> bool:
        return self.device_id is None or self.device_id == device_id


class FaultEngine:
    def __init__(self, core, server):
        self.core = core
        self.server = server
        self.scheduler = core.scheduler
        self.events = core.events
        self.active: List[Fault] = []
        self.waiting_for_messages: List[Fault] = []
        self.history: List[Fault] = []
        self._injected: set = set()
        self._gcra: Dict[int, float] = {}
        self._ids = itertools.count(1)

    # --- scheduling ----------------------------------------------------------------------------

    def schedule(self, fault: Fault, at: Optional[float], after_messages: Optional[int]) -> Fault:
        if fault.kind == "region_failover":
            self._refuse_overlap(fault, at, after_messages)
        fault.id = next(self._ids)
        fault.due_at = None if after_messages else time.time() + (at or 0)
        self.history.append(fault)
        if after_messages:
            fault.countdown = after_messages
            self.waiting_for_messages.append(fault)
        elif at:
            fault._timer = self.scheduler.call_later(at, self.start, fault)
        else:
            self.start(fault)
        return fault

    def _refuse_overlap(self, fault: Fault, at: Optional[float], after_messages: Optional[int]) -> None:
        """A second outage inside the first would find no connected device to fail over (its report
        would read 0/0 devices back) and end before or after the first one at random."""
        now = time.time()
        start = None if after_messages else now + (at or 0)
        for other in self.history:
            if other.kind != "region_failover" or other.state not in ("pending", "active"):
                continue
            if not (other.device_id is None or fault.device_id is None or other.device_id == fault.device_id):
                continue
            scope = "the whole hub" if other.device_id is None else f"device {other.device_id!r}"
            advice = ("outages must not overlap: wait for the first one (handle.wait()) or cancel it "
                      "before starting another")
            if other.state == "pending" and other.due_at is None:
                # it waits for messages, so when it will start cannot be known: any other may overlap
                raise ValueError(f"a region failover of {scope} is already waiting for messages "
                                 f"(after_messages=); {advice}")
            if other.state == "active":
                other_start, other_end = other.started_at, other.started_at + (other.duration or 0)
            else:
                other_start, other_end = other.due_at, other.due_at + (other.duration or 0)
            # a new one that waits for messages may start at any moment from now
            clash = (other_end > now if start is None
                     else start < other_end and other_start < start + (fault.duration or 0))
            if clash:
                when = ("running" if other.state == "active" else f"due in {max(other_start - now, 0):.1f} s")
                raise ValueError(
                    f"a region failover of {scope} is already {when} (outage {other.duration:g} s, over in "
                    f"{max(other_end - now, 0):.1f} s); {advice}")

    def start(self, fault: Fault) -> None:
        if fault.state != "pending":
            return
        fault.started_at = time.time()
        fault.state = "active"
        core = self.core
        fault.affected = sorted(d for d in core.connections if fault.targets(d))
        self.events.add("fault_start", fault.device_id, fault=fault.kind, fault_id=fault.id,
                        affected=list(fault.affected), **fault.params)
        self.active.append(fault)
        fault.started.set()
        getattr(self, "_start_" + fault.kind, lambda f: None)(fault)
        if fault.state == "active" and fault.duration is not None:
            fault._timer = self.scheduler.call_later(fault.duration, self.end, fault)

    def end(self, fault: Fault, cancelled: bool = False) -> None:
        if fault.state == "pending":
            if fault._timer is not None:
                fault._timer.cancel()
            if fault in self.waiting_for_messages:
                self.waiting_for_messages.remove(fault)
            fault.state = "cancelled"
            self.events.add("fault_cancelled", fault.device_id, fault=fault.kind, fault_id=fault.id)
            fault.done.set()
            return
        if fault.state != "active":
            return
        if fault._timer is not None:
            fault._timer.cancel()
        fault.ended_at = time.time()
        fault.state = "ended"
        self.active.remove(fault)
        for proto in fault.silenced:
            if not any(proto in f.silenced for f in self.active):
                proto.set_blackhole(False)
        fault.silenced.clear()
        self._gcra.pop(fault.id, None)
        self.events.add("fault_end", fault.device_id, fault=fault.kind, fault_id=fault.id,
                        cancelled=cancelled)
        fault.done.set()

    def _close_in_scope(self, fault: Fault, reason: str, abort: bool) -> None:
        for conn in list(self.core.open_connections):
            if fault.device_id is None or conn.device_id == fault.device_id:
                conn.close(reason, abort=abort, fault_id=fault.id)

    # --- what each fault does when it starts -----------------------------------------------------

    def _start_region_failover(self, fault: Fault) -> None:
        core = self.core
        if fault.device_id is None:
            core.region = "secondary" if core.region == "primary" else "primary"
        self._close_in_scope(fault, "region_failover", abort=True)
        if not fault.params.get("keep_sessions"):
            # the secondary region has no MQTT sessions: subscriptions and un-acked C2D are gone
            for device_id in list(core.sessions):
                if fault.targets(device_id):
                    del core.sessions[device_id]

    def _start_drop(self, fault: Fault) -> None:
        self._close_in_scope(fault, fault.params.get("reason", "drop"),
                             abort=not fault.params.get("graceful"))
        self.end(fault)

    def _start_expire_tokens(self, fault: Fault) -> None:
        self._close_in_scope(fault, "token_expired", abort=False)
        self.end(fault)

    def _start_blackhole(self, fault: Fault) -> None:
        for proto in list(self.server.protocols):
            conn = proto.conn
            if fault.device_id is None or conn.device_id == fault.device_id:
                proto.set_blackhole(True)
                fault.silenced.add(proto)

    def _start_reject_publishes(self, fault: Fault) -> None:
        self._close_in_scope(fault, fault.params["reason"], abort=False)

    # --- hooks -----------------------------------------------------------------------------------

    def on_socket(self, proto) -> None:
        for fault in self.active:
            if fault.device_id is not None:
                continue
            if fault.kind == "region_failover" and fault.params.get("refuse") == "tcp":
                # accepted and reset at once: to the client, the same as a refused connection,
                # without giving up the address another hub could take meanwhile
                self.events.add("connect_refused", None, reason="region_failover", how="tcp",
                                peer=proto.conn.peer, fault_id=fault.id)
                proto.close(abort=True)
                return
            if fault.kind == "blackhole":
                proto.set_blackhole(True)
                fault.silenced.add(proto)
                return

    def on_connect_attempt(self, conn, client_id: str):
        """None to proceed; a CONNACK code to refuse with; or "silence" to never answer."""
        for fault in self.active:
            if not fault.targets(client_id):
                continue
            if fault.kind == "region_failover":
                return fault, p.CONNACK_SERVER_UNAVAILABLE
            if fault.kind == "refuse":
                return fault, fault.params["code"]
            if fault.kind == "blackhole":
                conn.link.set_blackhole(True)
                fault.silenced.add(conn.link)
                return fault, "silence"
        return None

    def _close_soon(self, conn, reason: str, fault: Fault) -> None:
        # Not at once: paho 1.6 writes its re-sent publishes straight after CONNACK and its network
        # thread dies if the socket fails during that burst, leaving the SDK hung for good. The
        # real hub's reaction is not that quick either. Until the close, nothing more is accepted.
        if not conn.doomed:
            conn.doomed = True
            self.scheduler.call_later(_CLOSE_DELAY, conn.close, reason, False)

    def on_d2c(self, conn, pkt, props: Dict[str, str]) -> Optional[D2CAction]:
        if conn.doomed:
            return D2CAction(consume=True)
        if FAULT_PROPERTY in props:
            action = self._service_fault_injection(conn, pkt, props)
            if action is not None:
                return action
        action = None
        for fault in self.active:
            if not fault.targets(conn.device_id):
                continue
            kind = fault.kind
            if kind == "drop_before_ack":
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.scheduler.call_later(0, self.end, fault)
                return D2CAction(close_after_accept=True, reason="drop_before_ack")
            if kind == "reject_publishes":
                self._close_soon(conn, fault.params["reason"], fault)
                return D2CAction(consume=True)
            if kind == "throttle":
                delay = self._throttle_delay(fault)
                if delay is None:
                    self._close_soon(conn, "throttled", fault)
                    return D2CAction(consume=True)
                if delay > 0:
                    action = action or D2CAction()
                    action.ack_delay = max(action.ack_delay, delay)
            elif kind == "delay_acks":
                action = action or D2CAction()
                action.ack_delay = max(action.ack_delay, fault.params["seconds"])
        return action

    def _throttle_delay(self, fault: Fault) -> Optional[float]:
        """Generic cell rate algorithm: the delay this message's PUBACK gets, None when over the cap."""
        rate = fault.params["rate"]
        burst = fault.params["burst"]
        now = self.scheduler.time()
        tat = max(self._gcra.get(fault.id, now), now)
        delay = max(tat - now - (burst - 1) / rate, 0.0)
        if delay > fault.params["max_delay"]:
            return None
        self._gcra[fault.id] = tat + 1.0 / rate
        return delay

    def on_accepted(self, conn, telemetry) -> None:
        if not self.waiting_for_messages:
            return
        for fault in list(self.waiting_for_messages):
            if fault.targets(conn.device_id):
                fault.countdown -= 1
                if fault.countdown <= 0:
                    self.waiting_for_messages.remove(fault)
                    # after this message's PUBACK has been written
                    self.scheduler.call_later(0, self.start, fault)

    # --- the real hub's fault-injection message properties ---------------------------------------

    def _service_fault_injection(self, conn, pkt, props) -> Optional[D2CAction]:
        key = (conn.device_id, props.get("$.mid") or (pkt.topic, bytes(pkt.payload)))
        if key in self._injected:
            return None  # a re-send of a request already honoured: a normal message now
        kind = props[FAULT_PROPERTY]
        try:
            delay = float(props.get(_DELAY_PROPERTY) or 0)
            duration = float(props.get(_DURATION_PROPERTY) or 0)
        except ValueError:
            self.events.add("fault_injection_ignored", conn.device_id, type=kind,
                            message="delay/duration is not a number")
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
        self._injected.add(key)
        self.events.add("fault_injection_requested", device, type=kind, delay=delay, duration=duration)
        self.schedule(fault, delay, None)
        # the real hub terminates the connection before acknowledging the request
        return D2CAction(consume=True)
