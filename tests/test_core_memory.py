"""The hub core driven in memory on a fake clock: no sockets, no threads, no waiting.

`Harness` plays the driver's part (fakehub/server.py does it over TLS): it executes the core's
actions, keeps its timers and moves the clock. What the socket tests in test_hub_protocol.py
would have to wait seconds for (keep-alive, token expiry, method timeouts, fault durations)
takes a clock step here. The wire itself is proven by test_hub_sdk.py and test_faults_sdk.py.
"""
import json
from typing import Any

import pytest

from pytest_iotfailover.errors import ProtocolViolation
from pytest_iotfailover.iothub.actions import Close, Pause, Reply, Reset, Send, Timer
from pytest_iotfailover.iothub.core import MAX_SERVER_KEEPALIVE, IoTHubCore
from pytest_iotfailover.iothub.events import EventLog
from pytest_iotfailover.iothub.faults import Fault
from pytest_iotfailover.iothub.ledger import Ledger
from pytest_iotfailover.iothub.mqtt import Decoder
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.iothub.registry import Registry
from pytest_iotfailover.iothub.session import ConnEvent, ConnState, MethodResponse, transition
from pytest_iotfailover.sas import make_sas_token

HOST = "memhub.azure-devices.net"
T0 = 1_800_000_000.0


class Peer:
    """What one connection's device sees: decoded packets, and how the hub ended it."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.decoder = Decoder()
        self.inbox: list[Any] = []
        self.ended: str | None = None   # "close" or "reset"
        self.paused = False

    def take(self, kind: type | None = None) -> list[Any]:
        got = [x for x in self.inbox if kind is None or isinstance(x, kind)]
        self.inbox = [x for x in self.inbox if x not in got]
        return got

    def one(self, kind: type) -> Any:
        got = self.take(kind)
        assert len(got) == 1, (kind.__name__, got, self.inbox)
        return got[0]


class Harness:
    def __init__(self, **core_kwargs: Any):
        self.now = T0
        self.registry = Registry(HOST)
        self.ledger = Ledger()
        self.events = EventLog(clock=lambda: self.now)
        self.core = IoTHubCore(HOST, self.registry, self.ledger, self.events, **core_kwargs)
        self.timers: dict[Any, float] = {}
        self.peers: dict[Any, Peer] = {}
        self.replies: list[MethodResponse] = []

    # --- the driver's part ----------------------------------------------------------------------

    def run(self, actions: list[Any]) -> None:
        lost = []
        for a in actions:
            if isinstance(a, Timer):
                self.timers.pop(a.key, None)
                if a.deadline is not None:
                    self.timers[a.key] = a.deadline
            elif isinstance(a, Reply):
                a.notify(a.response)
            elif isinstance(a, Send):
                peer = self.peers[a.conn]
                assert peer.ended is None and not peer.paused, f"sent to a {peer.ended or 'paused'} connection"
                peer.inbox.extend(peer.decoder.feed(a.data))
            elif isinstance(a, (Close, Reset)):
                peer = self.peers[a.conn]
                if peer.ended is None:
                    peer.ended = "reset" if isinstance(a, Reset) else "close"
                    lost.append(a.conn)
            elif isinstance(a, Pause):
                self.peers[a.conn].paused = a.on
        for conn in lost:  # the socket goes away after the step, as it does over TLS
            self.run(self.core.connection_lost(conn, self.now))

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer that falls due on the way, in deadline order."""
        end = self.now + seconds
        while True:
            due = [(d, k) for k, d in self.timers.items() if d <= end]
            if not due:
                break
            deadline, key = min(due, key=lambda x: x[0])
            del self.timers[key]
            self.now = max(self.now, deadline)
            self.run(self.core.timer_fired(key, self.now))
        self.now = end

    # --- a device's part ------------------------------------------------------------------------

    def add(self, device_id: str = "d1", **kwargs: Any) -> Any:
        return self.registry.add(device_id, **kwargs)

    def open(self) -> Peer:
        conn, actions = self.core.open("10.0.0.1:5000", self.now)
        peer = self.peers[conn] = Peer(conn)
        self.run(actions)
        return peer

    def send(self, peer: Peer, packet: Any) -> None:
        self.run(self.core.receive(peer.conn, packet, self.now))

    def connect(self, device_id: str = "d1", *, clean: bool = True, keep_alive: int = 60,
                ttl: float = 3600, key: str | None = None, peer: Peer | None = None) -> tuple[Peer, Any]:
        peer = peer or self.open()
        dev = self.registry.get(device_id)
        token = make_sas_token(f"{HOST}/devices/{device_id}", key or (dev.primary_key if dev else "a2V5"),
                               expiry=self.now + ttl)
        self.send(peer, p.Connect(device_id, keep_alive, clean, f"{HOST}/{device_id}/?api-version=2021-04-12",
                                  token.encode()))
        return peer, peer.one(p.Connack)

    def connected(self, device_id: str = "d1", **kwargs: Any) -> Peer:
        peer, connack = self.connect(device_id, **kwargs)
        assert connack.return_code == 0, connack
        return peer

    def subscribe(self, peer: Peer, *filters: str, qos: int = 1) -> list[int]:
        self.send(peer, p.Subscribe(7, [(f, qos) for f in filters]))
        return peer.one(p.Suback).return_codes

    def publish(self, peer: Peer, body: bytes = b"x", *, mid: str | None = None, pid: int = 1,
                bag: str = "") -> None:
        device_id = peer.conn.device_id
        parts = ([f"$.mid={mid}"] if mid else []) + ([bag] if bag else [])
        self.send(peer, p.Publish(f"devices/{device_id}/messages/events/{'&'.join(parts)}", body, 1, pid))

    def schedule(self, kind: str, device_id: str | None = None, lasts: float | None = None, *,
                 at: float | None = None, after_messages: int | None = None, **params: Any) -> Fault:
        fault = Fault(kind, device_id, lasts, **params)
        self.run(self.core.schedule_fault(fault, at, after_messages, self.now))
        return fault

    def kinds(self, kind: str, device_id: str | None = None) -> list[Any]:
        return self.events.list(kind, device_id)


@pytest.fixture
def h() -> Harness:
    hub = Harness()
    hub.add("d1")
    return hub


def c2d_filter(device_id: str = "d1") -> str:
    return f"devices/{device_id}/messages/devicebound/#"


# --- the connection state table ------------------------------------------------------------------

def test_state_table_refuses_what_it_does_not_name():
    assert transition(ConnState.AWAITING_CONNECT, ConnEvent.ACCEPT) is ConnState.CONNECTED
    assert transition(ConnState.CLOSING, ConnEvent.LOST) is ConnState.CLOSED
    with pytest.raises(ProtocolViolation, match="first packet was PUBLISH, not CONNECT"):
        transition(ConnState.AWAITING_CONNECT, ConnEvent.PACKET, "PUBLISH")
    with pytest.raises(ProtocolViolation, match="CONNECT is not accepted in state connected"):
        transition(ConnState.CONNECTED, ConnEvent.CONNECT, "CONNECT")
    with pytest.raises(ProtocolViolation):
        transition(ConnState.CLOSED, ConnEvent.ACCEPT)


def test_publish_before_connect_is_a_violation(h):
    peer = h.open()
    h.send(peer, p.Publish("devices/d1/messages/events/", b"x", 0))
    assert peer.ended == "close"
    assert "not CONNECT" in h.kinds("protocol_violation")[0].detail["message"]


def test_second_connect_is_a_violation(h):
    peer = h.connected()
    h.send(peer, p.Connect("d1"))
    assert peer.ended == "close"
    assert h.kinds("disconnect", "d1")[0].reason == "protocol_violation"


# --- CONNECT and authentication --------------------------------------------------------------------

def test_connect_accepted_and_logged(h):
    peer = h.connected(keep_alive=40)
    assert h.core.connections["d1"] is peer.conn
    ev = h.kinds("connect", "d1")[0]
    assert (ev.at, ev.detail["keep_alive"], ev.detail["session_present"]) == (T0, 40, False)


@pytest.mark.parametrize("case", ["unknown", "wrong_key", "disabled", "expired"])
def test_connect_refused_not_authorized(h, case):
    device_id, kwargs = "d1", {}
    if case == "unknown":
        device_id = "ghost"
    elif case == "wrong_key":
        kwargs = {"key": "d3Jvbmcga2V5IHdyb25nIGtleQ=="}
    elif case == "disabled":
        h.registry.set_enabled("d1", False)
    elif case == "expired":
        kwargs = {"ttl": -301.0}   # past the 300 s grace
    peer, connack = h.connect(device_id, **kwargs)
    assert connack.return_code == p.CONNACK_NOT_AUTHORIZED
    assert peer.ended == "close"
    assert h.kinds("auth_failure")
    assert not h.core.connections


def test_connect_timeout_closes_a_silent_socket(h):
    peer = h.open()
    h.advance(29.9)
    assert peer.ended is None
    h.advance(0.2)
    assert peer.ended == "close"
    assert h.kinds("connect_timeout")[0].detail["seconds"] == 30.0


def test_unauthenticated_limit_resets_the_next_socket():
    h = Harness(max_unauthenticated=2)
    first, second, third = h.open(), h.open(), h.open()
    assert (first.ended, second.ended, third.ended) == (None, None, "reset")
    assert h.kinds("connect_refused")[0].detail["limit"] == 2


# --- sessions ------------------------------------------------------------------------------------

def test_clean_session_0_keeps_subscriptions_and_says_so(h):
    peer = h.connected(clean=False)
    h.subscribe(peer, c2d_filter())
    h.send(peer, p.Disconnect())
    again, connack = h.connect(clean=False)
    assert connack.session_present is True
    h.run(h.core.send_c2d("d1", b"hi", None, None, h.now)[1])
    assert again.one(p.Publish).payload == b"hi"  # the subscription survived


def test_clean_session_1_starts_empty(h):
    peer = h.connected(clean=False)
    h.subscribe(peer, c2d_filter())
    h.send(peer, p.Disconnect())
    again, connack = h.connect(clean=True)
    assert connack.session_present is False
    h.run(h.core.send_c2d("d1", b"hi", None, None, h.now)[1])
    assert again.take(p.Publish) == []


def test_new_connection_displaces_the_old_one(h):
    old = h.connected(clean=False)
    h.subscribe(old, c2d_filter())
    new, connack = h.connect(clean=False)
    assert connack.return_code == 0 and connack.session_present
    assert old.ended == "close"
    assert h.kinds("disconnect", "d1")[0].reason == "replaced"
    assert h.core.connections["d1"] is new.conn


# --- keep-alive and token expiry -----------------------------------------------------------------

def test_keep_alive_closes_after_one_and_a_half_periods_of_silence(h):
    peer = h.connected(keep_alive=10)
    h.advance(14)
    h.send(peer, p.Pingreq())
    assert peer.one(p.Pingresp)
    h.advance(14.9)            # 15 s since the PINGREQ have not passed
    assert peer.ended is None
    h.advance(0.2)
    assert peer.ended == "close"
    assert h.kinds("disconnect", "d1")[0].reason == "keepalive"


def test_keep_alive_expiry_sends_the_will(h):
    peer = h.open()
    token = make_sas_token(f"{HOST}/devices/d1", h.registry.get("d1").primary_key, expiry=h.now + 3600)
    will = p.Will("devices/d1/messages/events/", b"silent", 1)
    h.send(peer, p.Connect("d1", 1, True, f"{HOST}/d1/?api-version=x", token.encode(), will))
    assert peer.one(p.Connack).return_code == 0
    h.advance(1.6)
    ev = h.kinds("disconnect", "d1")[0]
    assert ev.reason == "keepalive" and ev.detail["idle"] >= 1.5
    # a keep-alive timeout is a close without DISCONNECT, so the will goes out
    (t,) = h.ledger.items()
    assert t.body == b"silent" and t.properties["iothub-MessageType"] == "Will"


def test_keep_alive_zero_uses_the_hub_maximum(h):
    peer = h.connected(keep_alive=0)
    h.advance(MAX_SERVER_KEEPALIVE - 1)
    assert peer.ended is None
    h.advance(2)
    assert peer.ended == "close"


def test_token_expiry_disconnects_after_the_grace(h):
    peer = h.connected(ttl=60, keep_alive=0)
    h.advance(60 + 299)
    assert peer.ended is None
    h.advance(2)
    assert peer.ended == "close"
    ev = h.kinds("disconnect", "d1")[0]
    assert ev.reason == "token_expired" and ev.detail["expiry"] == int(T0 + 60)
    assert ev.at >= T0 + 60 + 300, "closed before the token and its grace expired"


def test_token_grace_is_configurable():
    h = Harness(token_grace=0)
    h.add("d1")
    peer = h.connected(ttl=5, keep_alive=0)
    h.advance(5.1)
    assert peer.ended == "close"
    # the device reconnecting with the same token is refused
    dev = h.registry.get("d1")
    again = h.open()
    token = make_sas_token(f"{HOST}/devices/d1", dev.primary_key, expiry=T0 + 5)
    h.send(again, p.Connect("d1", 0, True, f"{HOST}/d1/?api-version=x", token.encode()))
    assert again.one(p.Connack).return_code == p.CONNACK_NOT_AUTHORIZED


# --- telemetry and cloud-to-device ---------------------------------------------------------------

def test_telemetry_recorded_and_acknowledged(h):
    peer = h.connected()
    h.publish(peer, b"t1", mid="m1", pid=3, bag="a=1")
    assert peer.one(p.Puback).packet_id == 3
    (t,) = h.ledger.items()
    assert (t.message_id, t.body, t.properties, t.enqueued_at) == ("m1", b"t1", {"a": "1"}, T0)


def test_c2d_unacknowledged_is_redelivered_on_reconnect(h):
    peer = h.connected(clean=False)
    h.subscribe(peer, c2d_filter())
    mid, actions = h.core.send_c2d("d1", b"cmd", {"k": "v"}, None, h.now)
    h.run(actions)
    first = peer.one(p.Publish)
    assert (first.qos, first.dup) == (1, False) and "k=v" in first.topic
    h.send(peer, p.Disconnect())          # never acknowledged
    again = h.connected(clean=False)
    redelivered = again.one(p.Publish)
    assert (redelivered.packet_id, redelivered.dup, redelivered.payload) == (first.packet_id, True, b"cmd")
    h.send(again, p.Puback(redelivered.packet_id))
    done = h.kinds("c2d_completed", "d1")[0]
    assert (done.detail["message_id"], done.detail["delivery_count"]) == (mid, 2)


# --- twin ----------------------------------------------------------------------------------------

def test_twin_get_and_reported_patch(h):
    peer = h.connected()
    h.subscribe(peer, "$iothub/twin/res/#")
    h.send(peer, p.Publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"fw": "1.0"}', 0))
    res = peer.one(p.Publish)
    assert res.topic == "$iothub/twin/res/204/?$rid=1&$version=2"
    h.send(peer, p.Publish("$iothub/twin/GET/?$rid=2", b"", 0))
    doc = json.loads(peer.one(p.Publish).payload)
    assert doc["reported"] == {"fw": "1.0", "$version": 2}


def test_twin_bad_patch_gets_400(h):
    peer = h.connected()
    h.subscribe(peer, "$iothub/twin/res/#")
    h.send(peer, p.Publish("$iothub/twin/PATCH/properties/reported/?$rid=9", b"[1]", 0))
    res = peer.one(p.Publish)
    assert res.topic.startswith("$iothub/twin/res/400/") and b"JSON object" in res.payload


def test_desired_patch_reaches_a_subscribed_device(h):
    peer = h.connected()
    h.subscribe(peer, "$iothub/twin/PATCH/properties/desired/#")
    version, actions = h.core.update_desired("d1", {"rate": 5}, h.now)
    h.run(actions)
    msg = peer.one(p.Publish)
    assert version == 2 and json.loads(msg.payload) == {"rate": 5, "$version": 2}


# --- direct methods ------------------------------------------------------------------------------

def invoke(h: Harness, name: str = "reboot", timeout: float = 30.0) -> None:
    h.run(h.core.invoke_method("d1", name, {"a": 1}, timeout, h.replies.append, h.now))


def test_method_answered_200(h):
    peer = h.connected()
    h.subscribe(peer, "$iothub/methods/POST/#")
    invoke(h)
    req = peer.one(p.Publish)
    rid = req.topic.rsplit("=", 1)[1]
    h.send(peer, p.Publish(f"$iothub/methods/res/200/?$rid={rid}", b'{"ok": true}', 0))
    assert h.replies == [MethodResponse(200, {"ok": True})]
    assert not h.timers.get(("method", rid))


@pytest.mark.parametrize("state", ["connected-unsubscribed", "subscribed-elsewhere", "offline"])
def test_method_404_at_once_when_not_subscribed(h, state):
    if state != "offline":
        peer = h.connected()
        if state == "subscribed-elsewhere":
            h.subscribe(peer, c2d_filter(), "$iothub/twin/res/#")
    invoke(h)
    (reply,) = h.replies  # in the same step, not after the timeout
    assert reply.status == 404 and reply.payload["errorCode"] == 404103
    assert ("not connected" if state == "offline" else "not subscribed") in reply.payload["message"]
    assert not [k for k in h.timers if k[0] == "method"]
    if state != "offline":
        assert peer.take(p.Publish) == []  # no request went to the device


def test_method_504_when_the_device_does_not_answer(h):
    peer = h.connected(keep_alive=0)
    h.subscribe(peer, "$iothub/methods/POST/#")
    invoke(h, timeout=5)
    h.advance(4.9)
    assert h.replies == []
    h.advance(0.2)
    assert h.replies[0].status == 504
    assert h.replies[0].payload["errorCode"] == 504101
    request = peer.one(p.Publish)
    assert request.topic.startswith("$iothub/methods/POST/reboot/?$rid=") and json.loads(request.payload) == {"a": 1}
    rid = request.topic.rsplit("=", 1)[1]
    h.send(peer, p.Publish(f"$iothub/methods/res/200/?$rid={rid}", b"{}", 1, 9))
    assert len(h.replies) == 1  # a late answer is discarded
    assert peer.one(p.Puback).packet_id == 9 and peer.ended is None  # without hurting the connection


# --- faults: every kind's verdicts ----------------------------------------------------------------

def test_region_failover_resets_refuses_then_answers_as_the_other_region(h):
    peer = h.connected(clean=False)
    h.subscribe(peer, c2d_filter())
    fault = h.schedule("region_failover", None, 10.0, outage=10.0, keep_sessions=False, refuse="tcp")
    assert peer.ended == "reset" and fault.affected == ["d1"]
    assert h.open().ended == "reset"            # TCP refused during the outage
    assert h.kinds("connect_refused")[0].detail["how"] == "tcp"
    h.advance(10)
    assert fault.state == "ended" and h.core.region == "secondary"
    _, connack = h.connect(clean=False)
    assert connack.return_code == 0 and connack.session_present is False  # sessions are gone


def test_region_failover_for_one_device_answers_connack_3(h):
    h.add("d2")
    other = h.connected("d2")
    h.schedule("region_failover", "d1", 5.0, outage=5.0, keep_sessions=True, refuse="connack")
    _, connack = h.connect("d1")
    assert connack.return_code == p.CONNACK_SERVER_UNAVAILABLE and other.ended is None
    h.advance(5)
    assert h.connect("d1")[1].return_code == 0


def test_overlapping_region_failovers_are_refused(h):
    h.schedule("region_failover", None, 10.0, outage=10.0, keep_sessions=False, refuse="tcp")
    with pytest.raises(ValueError, match="already running"):
        h.schedule("region_failover", None, 5.0, outage=5.0, keep_sessions=False, refuse="tcp")


@pytest.mark.parametrize("graceful", [False, True])
def test_drop_resets_or_closes_and_ends_at_once(h, graceful):
    peer = h.connected()
    fault = h.schedule("drop", None, None, graceful=graceful, reason="drop")
    assert peer.ended == ("close" if graceful else "reset") and fault.state == "ended"
    assert h.kinds("disconnect", "d1")[0].reason == "drop"


def test_blackhole_pauses_open_and_new_connections_until_it_ends(h):
    peer = h.connected(keep_alive=10)
    fault = h.schedule("blackhole", None, 60.0, seconds=60.0)
    assert peer.paused
    fresh = h.open()
    assert fresh.paused                          # a new socket is silenced from the start
    h.advance(59)
    assert peer.ended is None                    # no keep-alive verdict while silenced
    assert fresh.ended == "close"                # the connect timeout holds even in silence
    h.advance(1)
    assert fault.state == "ended" and not peer.paused
    h.advance(14)
    assert peer.ended is None                    # the keep-alive clock restarted at the heal
    h.advance(2)
    assert peer.ended == "close"


def test_blackhole_for_one_device_ignores_its_connect(h):
    h.schedule("blackhole", "d1", None, seconds=None)
    peer = h.open()
    assert not peer.paused                       # which device knocks is known only at CONNECT
    h.send(peer, p.Connect("d1", 60, True, f"{HOST}/d1/?api-version=x", b"t"))
    assert peer.paused and peer.take() == []
    assert h.kinds("connect_ignored", "d1")


@pytest.mark.parametrize("code", [3, 5])
def test_refuse_answers_the_connack_code(h, code):
    h.schedule("refuse", None, 5.0, code=code, seconds=5.0)
    _, connack = h.connect()
    assert connack.return_code == code
    h.advance(5)
    assert h.connect()[1].return_code == 0


def test_drop_before_ack_records_then_resets_without_puback(h):
    peer = h.connected()
    fault = h.schedule("drop_before_ack", None, None, count=1, remaining=1)
    h.publish(peer, mid="m1")
    assert peer.ended == "reset" and peer.take(p.Puback) == []
    assert [t.message_id for t in h.ledger.items()] == ["m1"]
    h.advance(0)
    assert fault.state == "ended"
    again = h.connected()
    h.publish(again, mid="m1")                   # the client's re-send: now acknowledged
    assert again.one(p.Puback) and h.ledger.items()[1].duplicate


def test_delay_acks_holds_the_puback(h):
    peer = h.connected(keep_alive=0)
    h.schedule("delay_acks", None, None, seconds=2.0, duration=None)
    h.publish(peer, pid=4)
    assert peer.take(p.Puback) == [] and len(h.ledger.items()) == 1
    h.advance(2)
    assert peer.one(p.Puback).packet_id == 4


def test_throttle_delays_then_closes_past_max_delay(h):
    peer = h.connected(keep_alive=0)
    h.schedule("throttle", None, None, rate=1.0, burst=1, max_delay=1.5, seconds=None)
    for pid in (1, 2, 3):
        h.publish(peer, pid=pid)
    assert [a.packet_id for a in peer.take(p.Puback)] == [1]   # no wait for the first
    assert len(h.ledger.items()) == 2                          # the third would wait 2 s: refused
    h.advance(0.05)
    assert peer.ended == "close"
    assert h.kinds("disconnect", "d1")[0].reason == "throttled"


def test_expire_tokens_disconnects_as_token_expired(h):
    peer = h.connected()
    fault = h.schedule("expire_tokens")
    assert peer.ended == "close" and fault.state == "ended"
    assert h.kinds("disconnect", "d1")[0].reason == "token_expired"


def test_fault_at_and_after_messages_start_on_time(h):
    peer = h.connected(keep_alive=0)
    later = h.schedule("drop", None, None, at=3.0, graceful=False, reason="drop")
    counted = h.schedule("expire_tokens", None, None, after_messages=2)
    h.publish(peer, pid=1)
    assert counted.state == "pending"
    h.publish(peer, pid=2)
    assert peer.take(p.Puback) and counted.state == "pending"  # starts after the PUBACK is out
    h.advance(0)
    assert counted.state == "ended" and peer.ended == "close"
    h.advance(3)
    assert later.state == "ended" and later.started_at == T0 + 3


def test_cancelled_fault_never_starts(h):
    fault = h.schedule("refuse", None, 5.0, at=1.0, code=3, seconds=5.0)
    h.run(h.core.end_fault(fault, True, h.now))
    h.advance(2)
    assert fault.state == "cancelled" and h.connect()[1].return_code == 0


@pytest.mark.parametrize("delay", ["nan", "inf", "-1", "soon"])
def test_service_fault_injection_ignores_bad_delays(h, delay):
    peer = h.connected()
    h.publish(peer, mid="f1", bag=f"AzIoTHub_FaultOperationType=KillTcp&AzIoTHub_FaultOperationDelayInSecs={delay}")
    assert peer.ended is None and peer.one(p.Puback)
    assert h.kinds("fault_injection_ignored", "d1")


def test_service_fault_injection_kill_tcp_once_per_request(h):
    peer = h.connected()
    bag = "AzIoTHub_FaultOperationType=KillTcp&AzIoTHub_FaultOperationDelayInSecs=1"
    h.publish(peer, mid="f1", bag=bag)
    assert peer.take(p.Puback) == [] and h.ledger.items() == []   # consumed, not acknowledged
    h.advance(1)
    assert peer.ended == "reset"
    again = h.connected()
    h.publish(again, mid="f1", bag=bag)          # the SDK's re-send is an ordinary message now
    assert again.one(p.Puback) and len(h.ledger.items()) == 1


def test_service_fault_injection_memory_is_bounded(h):
    from pytest_iotfailover.iothub import faults
    peer = h.connected()
    for i in range(faults._MAX_INJECTED + 50):
        h.publish(peer, f"body{i}".encode(), bag="AzIoTHub_FaultOperationType=InvokeAuthError")
        h.advance(0.1)  # lets each request's zero-length fault end
        peer = h.connected() if peer.ended else peer
    assert len(h.core.faults._injected) == faults._MAX_INJECTED
