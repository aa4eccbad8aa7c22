"""IoT Hub's device-facing MQTT semantics, sans-IO: decoded packets in, actions out.

The driver (fakehub/server.py, or a test with a fake clock) opens a `Connection` per socket with
`IoTHubCore.open(peer, now)`, feeds it the packets it decodes with `receive(conn, packet, now)`,
reports `connection_lost(conn, now)` and `timer_fired(key, now)`, and executes the actions
(actions.py) every call returns. `now` is the wall clock (time.time() seconds) the driver reads;
nothing here reads a clock, a socket or a thread.

Behaviour follows the project's notes on the real hub (iothub-mqtt.md); section numbers in
comments refer to it.
"""
import itertools
import json
import re
import time
import traceback
from collections.abc import Callable, Hashable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ..errors import HubOperationError, ProtocolViolation
from . import limits
from . import topics as t
from .actions import Action, Close, Pause, Reply, Reset, Send, Timer
from .auth import AuthError, verify_sas_token
from .c2d_lifecycle import C2D_TIMER_KINDS, C2DLifecycle, c2d_expiry_text, c2d_properties
from .events import EventLog
from .faults import FAULT_PROPERTY, PROCEED, FaultEngine
from .ledger import Ledger
from .mqtt import codec
from .mqtt import packets as p
from .registry import Device, Registry
from .rpo import ChangeHistory
from .session import (
    C2DMessage,
    C2DQueue,
    Connection,
    ConnEvent,
    ConnState,
    MethodResponse,
    Session,
    Twin,
    c2d_body,
    clip_text,
    load_json,
    merged_section,
    new_c2d_queue,
    twin_problem,
)
from .tier_gate import TIER_TIMER_KINDS, TierGate
from .tiers import Delay, HubThrottles, Operation, Reject, Tier

__all__ = ["MAX_D2C_SIZE", "Connection", "HubOperationError", "IoTHubCore", "MethodResponse", "c2d_body"]

MAX_D2C_SIZE = 256 * 1024
MAX_SUBSCRIPTIONS = 5
C2D_QUEUE_LIMIT = 50
MAX_SERVER_KEEPALIVE = 1767.0  # §1.4: 1.5 x keep-alive, capped by the load balancer's idle timeout
MAX_METHOD_PAYLOAD = 128 * 1024  # direct method request and response (failover-facts.md "Limits")
AUTH_METHOD = '{"scope":"device","type":"sas","issuer":"iothub"}'
_RECHECK = 0.05  # a keep-alive check that fires a hair early looks again this much later

_CONNECTED = ConnState.CONNECTED  # a module constant: an enum member's class lookup costs ~90 ns
_PUBLISH = p.Publish

_METHOD_STATUS = re.compile(r"-?[0-9]{1,9}")


def _error_body(code: int, message: str, now: float) -> bytes:
    return json.dumps({"errorCode": code, "message": message,
                       "timestampUtc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}).encode()


def _invalid_method_response(device_id: str, why: str) -> MethodResponse:
    # IoT Hub fails such a call with InvalidResponseWhileProxying (azure-iot-sdk-c PR #6);
    # the status and body shape used here are an assumption
    return MethodResponse(502, {"errorCode": "InvalidResponseWhileProxying",
                                "message": f"device {device_id!r} answered with an invalid response: {why}"})


def _check_method_call(name: str, body: bytes, timeout: float) -> None:
    """IoT Hub's limits on a direct method call (limits.py), as HubOperationError.

    The timeout may be below the real hub's 5 s minimum (limits.METHOD_RESPONSE_TIMEOUT_MIN): a
    test's short timeout is a deliberate choice, not a mistake a test should be stopped for;
    anything over 300 s, zero or negative is refused as the real hub refuses it."""
    if isinstance(name, str) and any(c in name for c in "#+&"):
        # not in IoT Hub's forbidden set, but a topic name cannot carry the wildcards (MQTT 3.1.1
        # 4.7.1) and '&' would split the request topic's query
        raise HubOperationError(f"invalid method name {clip_text(name, 40)!r}: '#', '+' and '&' cannot "
                                "be sent in an MQTT topic", 400004)
    error = limits.validate_method_name(name) or limits.validate_method_payload(body)
    if error is None and not 0 < timeout <= limits.METHOD_RESPONSE_TIMEOUT_MAX:
        error = limits.iothub_error(400004, f"method timeout {timeout!r} s is outside 0..{limits.METHOD_RESPONSE_TIMEOUT_MAX}")
    if error is not None:
        what = "invalid method name" if error.message.startswith("direct method name") else "invalid method call"
        raise HubOperationError(f"{what}: {error.message}", error.code)


def authenticate(pkt: p.Connect, hostname: str, registry: Registry, now: float, grace: float,
                 policies: Any = None) -> tuple[Any, Any]:
    """(user name, SAS token) of a CONNECT, or AuthError naming what is wrong. `policies`: the
    hub's shared access policies (limits.AccessPolicy by name), for tokens with `skn=`."""
    client_id = pkt.client_id
    if "/" in client_id:
        raise AuthError(f"client id {client_id!r} names a module; this hub knows devices only")
    user = limits.parse_device_username(pkt.username or "")  # api-version may be missing (D-MQTT)
    if isinstance(user, limits.IotHubError):
        raise AuthError(user.message)
    if user.hostname.lower() != hostname.lower():
        raise AuthError(f"user name names hub {user.hostname!r}, not {hostname!r}")
    if user.device_id != client_id or user.module_id is not None:
        raise AuthError(f"user name identity {user.device_id!r} does not match client id {client_id!r}")
    device = registry.get(client_id)
    if device is None:
        raise AuthError(f"device {client_id!r} is not registered")
    if not device.enabled:
        raise AuthError(f"device {client_id!r} is disabled")
    if pkt.password is None:
        raise AuthError("CONNECT has no password (SAS token)")
    try:
        password = pkt.password.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("password is not UTF-8") from None
    token = verify_sas_token(password, hostname=hostname, device_id=client_id,
                             keys=(device.primary_key, device.secondary_key),
                             now=now, clock_skew=grace, policies=policies or {})
    return user, token


class _Steps(TierGate):
    """The action buffer (an outermost call returns what it and everything it called produced)
    and the state the core's parts share."""
    registry: Registry
    events: EventLog
    connections: dict[str, Connection]
    sessions: dict[str, Session]
    c2d_queues: dict[str, C2DQueue]
    twins: dict[str, Twin]
    ledger: Ledger
    faults: FaultEngine
    history: ChangeHistory
    retain_property: str
    # the hub's shared access policies (limits.AccessPolicy by name); the driver replaces it whole
    policies: Mapping[str, Any] = MappingProxyType({})

    def __init__(self) -> None:
        self.now = 0.0
        self._out: list[Action] = []
        self._depth = 0

    def _step(self, now: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[Action]]:
        # A call that raises (a refused service request) keeps what it emitted before the error
        # in the buffer: the next step returns it, so no close or timer is ever lost.
        if self._depth == 0:
            self.now = now
        self._depth += 1
        try:
            result = fn(*args, **kwargs)
        finally:
            self._depth -= 1
        if self._depth:
            return result, []
        out, self._out = self._out, []
        return result, out

    def _step_packet(self, now: float, fn: Callable[[Connection, Any], None], conn: Connection,
                     packet: Any) -> list[Action]:
        """`_step` for the once-per-packet entry point, without the generic call's argument packing
        and result tuple (a measurable part of a telemetry message's cost)."""
        if self._depth:
            return self._step(now, fn, conn, packet)[1]
        self.now = now
        self._depth = 1
        try:
            fn(conn, packet)
        finally:
            self._depth = 0
        out, self._out = self._out, []
        return out

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _timer(self, key: Hashable, deadline: float | None) -> None:
        self._out.append(Timer(key, deadline))

    def _send(self, conn: Connection, packet: Any) -> None:
        if conn.live and not conn.paused:
            self._emit(Send(conn, codec.encode(packet)))

    def _ack(self, conn: Connection, packet_id: int | None) -> None:
        if packet_id is not None and conn.live and not conn.paused:
            self._emit(Send(conn, codec.encode_puback(packet_id)))

    def close_conn(self, conn: Connection, reason: str, abort: bool = False, **detail: Any) -> None:
        """Hub-initiated close (MQTT 3.1.1 has no server DISCONNECT: the socket just closes)."""
        if not conn.live:
            return
        conn.close_reason, conn.close_detail = reason, detail
        conn.advance(ConnEvent.CLOSE)
        self._emit(Reset(conn) if abort else Close(conn))

    def _violation(self, conn: Connection, message: str) -> None:
        self.events.add("protocol_violation", conn.device_id, message=message, peer=conn.peer)
        self.close_conn(conn, "protocol_violation", message=message)

    def _internal_error(self, conn: Connection | None, exc: BaseException) -> None:
        self.events.add("error", conn.device_id if conn else None, message=f"{type(exc).__name__}: {exc}",
                        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if conn is not None:
            self.close_conn(conn, "internal_error")

    def _registered(self, device_id: str) -> None:
        if self.registry.get(device_id) is None:
            raise HubOperationError(f"device {device_id!r} is not registered", 404001)



class _Failover(_Steps):
    """What a regional failover changes on the service side: refusals while it lasts, and the
    change history its rollback (rpo=, rpo.py) needs."""

    def _service_available(self, device_id: str | None, what: str) -> None:
        """During a regional failover the whole hub is unavailable, service APIs included
        (failover-facts.md "Time and endpoints"). 503001 is IoT Hub's ServiceUnavailable code
        (Microsoft.Azure.Devices ErrorCode enum); that a failover answers with it is an assumption."""
        if self.faults.service_outage(device_id):
            raise HubOperationError(f"{what}: the IoT hub is failing over to its paired region; "
                                    "try again after the failover", 503001)

    def _twin_changing(self, device_id: str) -> None:
        self.history.twin_changing(device_id, self.twins.get(device_id), self.now)

    def _add_device(self, device_id: str, primary_key: str | None, secondary_key: str | None,
                    enabled: bool) -> Device:
        self._service_available(None, "add_device")
        device = self.registry.add(device_id, primary_key, secondary_key, enabled)
        self.history.device_created(device_id, self.now)
        return device


class _TwinsAndMethods(_Failover):
    """Twin GET/PATCH and direct methods (§5, §6)."""
    _method_calls: dict[str, tuple[str, Callable[[MethodResponse], None], float]]
    _rids: Iterator[int]

    def _twin_reply(self, conn: Connection, status: int, rid: str | None, body: bytes = b"",
                    version: int | None = None) -> None:
        if t.TWIN_RES_FILTER in conn.session.subscriptions:  # §5.1: no response subscription, no response
            self._send(conn, p.Publish(t.twin_response_topic(status, rid, version), body, 0))

    def _twin_get(self, conn: Connection, rid: str | None) -> None:
        assert conn.device_id is not None
        if rid is None:
            return self._twin_reply(conn, 400, rid, _error_body(400004, "twin request has no $rid", self.now))
        body = json.dumps(self.twin(conn.device_id).document(), separators=(",", ":")).encode()
        return self._twin_reply(conn, 200, rid, body)

    def _twin_patch(self, conn: Connection, rid: str | None, payload: bytes) -> None:
        assert conn.device_id is not None
        if conn.api_version is None:
            # reported: without api-version in the user name, reported-property updates are answered
            # 400 (andriyadi/AzureIoTHubMQTTClient PR #5); 400001 InvalidProtocolVersion is CS-ERR's
            # name for a missing or unknown api-version (that the hub uses it here is an assumption)
            return self._twin_reply(conn, 400, rid, _error_body(
                400001, "the CONNECT user name has no api-version; twin updates need one", self.now))
        try:
            patch = load_json(payload)
        except ValueError as exc:
            return self._twin_reply(conn, 400, rid, _error_body(
                400004, f"reported properties are not valid JSON: {clip_text(str(exc), 120)}", self.now))
        problem = twin_problem(patch)
        if problem is not None:
            if not isinstance(patch, dict):
                problem = "reported properties must be a JSON object"
            return self._twin_reply(conn, 400, rid, _error_body(
                400004, f"reported properties rejected: {problem}", self.now))
        twin = self.twin(conn.device_id)
        merged, why = merged_section(twin.reported, patch, "reported")
        if merged is None:
            return self._twin_reply(conn, 400, rid, _error_body(400004, why, self.now))
        self._twin_changing(conn.device_id)
        twin.reported = merged
        twin.reported_version += 1
        self.events.add("twin_reported", conn.device_id, version=twin.reported_version)
        return self._twin_reply(conn, 204, rid, b"", twin.reported_version)

    def _twin_gated(self, conn: Connection, operation: Operation, rid: str | None, run: Callable[[], None]) -> None:
        """A twin request through the tier: handled now, when its turn comes, or answered 429."""
        verdict = self._tier_verdict(operation, conn.device_id)
        if isinstance(verdict, Reject):
            self.events.add("throttled", conn.device_id, operation=operation.value, error_code=verdict.error.code)
            return self._twin_reply(conn, verdict.error.status, rid, _error_body(
                verdict.error.code, verdict.error.message, self.now))
        if isinstance(verdict, Delay):
            return self._defer("tier_twin", verdict.seconds, lambda: run() if conn.live else None)
        return run()

    def twin(self, device_id: str) -> Twin:
        twin = self.twins.get(device_id)
        if twin is None:
            twin = self.twins[device_id] = Twin()
        return twin

    def _get_twin(self, device_id: str) -> dict[str, Any]:
        self._service_available(device_id, "get_twin")
        self._registered(device_id)
        return self.twin(device_id).document()

    def _update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        self._service_available(device_id, "update_desired")
        self._registered(device_id)
        if not isinstance(patch, dict):
            raise HubOperationError("desired patch must be a JSON object (dict)", 400004)
        try:
            body_obj = json.loads(json.dumps(patch, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise HubOperationError(f"desired patch is not JSON-serialisable: {exc}", 400004) from None
        problem = twin_problem(body_obj)
        if problem is not None:
            raise HubOperationError(f"desired patch rejected: {problem}", 400004)
        twin = self.twin(device_id)
        merged, why = merged_section(twin.desired, body_obj, "desired")
        if merged is None:
            raise HubOperationError(why, 400004)
        self._twin_changing(device_id)
        twin.desired = merged
        twin.desired_version += 1
        conn = self.connections.get(device_id)
        if conn is not None and t.TWIN_DESIRED_FILTER in conn.session.subscriptions:
            body_obj = {k: v for k, v in body_obj.items() if not k.startswith("$")}
            body_obj["$version"] = twin.desired_version
            self._send(conn, p.Publish(t.desired_patch_topic(twin.desired_version),
                                       json.dumps(body_obj, separators=(",", ":")).encode(), 0))
        return twin.desired_version

    def _invoke_method(self, device_id: str, name: str, payload: Any, timeout: float,
                       notify: Callable[[MethodResponse], None]) -> None:
        self._service_available(device_id, "invoke_method")
        try:
            body = json.dumps(payload).encode()
        except (TypeError, ValueError) as exc:
            raise HubOperationError(f"method payload is not JSON-serialisable: {exc}", 400000) from None
        _check_method_call(name, body, timeout)
        self._registered(device_id)
        delay = self._service_call_allowed(Operation.DIRECT_METHOD, device_id, len(body))
        if delay:
            # the call's timeout covers its wait in the shaping queue
            return self._defer("tier_method", delay, lambda: self._dispatch_method(
                device_id, name, body, timeout - delay, notify))
        return self._dispatch_method(device_id, name, body, timeout, notify)

    def _dispatch_method(self, device_id: str, name: str, body: bytes, timeout: float,
                         notify: Callable[[MethodResponse], None]) -> None:
        conn = self.connections.get(device_id)
        if conn is None or t.METHODS_FILTER not in conn.session.subscriptions:
            why = "not connected" if conn is None else "not subscribed to methods"
            self._emit(Reply(notify, MethodResponse(404, {"errorCode": 404103,
                                                          "message": f"device {device_id!r} is {why}"})))
            return
        rid = format(next(self._rids), "x")
        self._method_calls[rid] = (device_id, notify, timeout)
        self._timer(("method", rid), self.now + timeout)
        self._send(conn, p.Publish(t.method_request_topic(name, rid), body, 0))

    def _method_timeout(self, rid: str) -> None:
        call = self._method_calls.pop(rid, None)
        if call is not None:
            device_id, notify, timeout = call
            self._emit(Reply(notify, MethodResponse(504, {
                "errorCode": 504101, "message": f"device {device_id!r} did not answer within {timeout:g} s"})))

    def _method_response(self, conn: Connection, status_text: str, rid: str | None, payload: bytes) -> None:
        call = self._method_calls.get(rid or "")
        if call is None or call[0] != conn.device_id:
            return  # late or unknown response: discarded, as the real hub does
        del self._method_calls[rid or ""]
        self._timer(("method", rid), None)
        device_id, notify = call[0], call[1]
        # the status "is validated as an integer" (iothub-mqtt.md §5.1, §6.1); plain ASCII digits
        # here, since int() would also take '+1', ' 1', '1_0' or a thousand digits
        if not _METHOD_STATUS.fullmatch(status_text):
            self._emit(Reply(notify, _invalid_method_response(
                device_id, f"status {clip_text(status_text, 40)!r} is not an integer")))
            raise ProtocolViolation(f"method response status {status_text!r} is not an integer")
        if len(payload) > MAX_METHOD_PAYLOAD:
            return self._emit(Reply(notify, _invalid_method_response(
                device_id, f"payload of {len(payload)} bytes is over IoT Hub's {MAX_METHOD_PAYLOAD} limit")))
        try:
            result = load_json(payload) if payload.strip() else None
        except ValueError as exc:
            return self._emit(Reply(notify, _invalid_method_response(
                device_id, f"payload is not valid JSON: {clip_text(str(exc), 120)}")))
        return self._emit(Reply(notify, MethodResponse(int(status_text), result)))


class _CloudToDevice(C2DLifecycle, _Failover):
    """Cloud-to-device queues, delivery and subscriptions (§1.3, §4, §7); expiry and feedback
    in c2d_lifecycle.py."""

    def _send_c2d(self, device_id: str, body: bytes, properties: dict[str, Any] | None,
                  message_id: str | None, ttl: Any = None, expiry_time: Any = None, ack: Any = None) -> str:
        self._service_available(device_id, "send_c2d")
        self._registered(device_id)
        props = c2d_properties(properties)
        expiry, ack = self._c2d_terms(props, ttl, expiry_time, ack)
        self._c2d_sweep(device_id)  # expired messages no longer count towards the limit
        queue = self.c2d_queues.setdefault(device_id, new_c2d_queue())
        session = self.sessions.get(device_id)
        inflight = len(session.inflight) if session else 0
        if len(queue) + inflight >= C2D_QUEUE_LIMIT:
            raise HubOperationError(
                f"device {device_id!r} already has {C2D_QUEUE_LIMIT} cloud-to-device messages pending", 403004)
        self._service_call_allowed(Operation.C2D_SEND, device_id)
        msg = C2DMessage(body, props, message_id or f"c2d-{next(self._c2d_ids)}", expiry=expiry, ack=ack,
                         expiry_set=ttl is not None or expiry_time is not None)
        queue.append(msg)
        self._c2d_enqueued(device_id, msg)
        self._pump_c2d(device_id)
        return msg.message_id

    def _c2d_publish(self, device_id: str, msg: C2DMessage, qos: int, packet_id: int | None,
                     dup: bool) -> p.Publish:
        topic = t.c2d_topic(device_id, msg.message_id, msg.properties, c2d_expiry_text(msg))
        return p.Publish(topic, msg.body, qos, packet_id, dup)

    def _pump_c2d(self, device_id: str, redeliver: bool = False) -> None:
        conn = self.connections.get(device_id)
        if conn is None or not conn.live:
            return
        session = conn.session
        qos = session.subscriptions.get(t.c2d_filter(device_id))
        if qos is None:
            return
        if redeliver:
            for pid, msg in sorted(session.inflight.items()):
                if self._c2d_dead(device_id, msg):
                    del session.inflight[pid]
                    continue
                msg.delivery_count += 1
                self._send(conn, self._c2d_publish(device_id, msg, 1, pid, True))
        queue = self.c2d_queues.get(device_id)
        while queue:
            msg = queue.popleft()
            if self._c2d_dead(device_id, msg):
                continue
            msg.delivery_count += 1
            if qos == 0:
                # §4.2: delivery QoS is the granted QoS; at QoS 0 a message is complete once sent
                self._send(conn, self._c2d_publish(device_id, msg, 0, None, False))
                self._c2d_completed(device_id, msg)
                continue
            pid = conn.next_packet_id()
            session.inflight[pid] = msg
            self._send(conn, self._c2d_publish(device_id, msg, 1, pid, False))

    def _on_puback(self, conn: Connection, packet_id: int) -> None:
        msg = conn.session.inflight.pop(packet_id, None)
        if msg is not None and conn.device_id is not None:
            self._c2d_completed(conn.device_id, msg)

    def _on_subscribe(self, conn: Connection, pkt: p.Subscribe) -> None:
        assert conn.device_id is not None
        subs = conn.session.subscriptions
        allowed = t.allowed_filters(conn.device_id)
        codes = []
        for topic_filter, qos in pkt.topics:
            if topic_filter not in allowed:
                # §7: IoT Hub terminates the connection rather than answer SUBACK 0x80
                raise ProtocolViolation(f"subscription to unsupported topic filter {topic_filter!r}")
            if topic_filter not in subs and len(subs) >= MAX_SUBSCRIPTIONS:
                codes.append(p.SUBACK_FAILURE)
                continue
            subs[topic_filter] = min(qos, 1)
            codes.append(min(qos, 1))
        self._send(conn, p.Suback(pkt.packet_id, codes))
        # once each: a SUBSCRIBE may repeat one allowed filter thousands of times
        self.events.add("subscribe", conn.device_id, topics=list(dict.fromkeys(tf for tf, _ in pkt.topics)))
        self._pump_c2d(conn.device_id)


class _DeviceToCloud(_TwinsAndMethods):
    """Telemetry and wills (§1.2, §1.5, §3)."""

    def _will_problem(self, conn: Connection, will: p.Will) -> str | None:
        """Why IoT Hub would not take this will as the device's telemetry, or None.

        D-MQTT: the will topic must be the device's own telemetry topic (iothub-mqtt.md §1.2,
        §1.5). What the real hub does with another topic is not documented; the fake accepts
        the connection and drops the will (assumption), so that nothing the hub would not have
        accepted as telemetry reaches the ledger.
        """
        if not will.topic.startswith(conn.events_prefix):
            return f"will topic {will.topic!r} is not devices/{conn.device_id}/messages/events/"
        try:
            t.parse_d2c_topic(conn.events_prefix, will.topic)
        except ProtocolViolation as exc:
            return f"will topic: {exc}"
        problem = limits.property_bag_problem(will.topic)
        return None if problem is None else f"will topic: {problem}"

    def _record_will(self, conn: Connection, will: p.Will) -> None:
        props, sysprops = t.parse_d2c_topic(conn.events_prefix, will.topic)  # checked at CONNECT
        props["iothub-MessageType"] = "Will"
        if will.retain:
            props[self.retain_property] = "true"
        self._accept_d2c(conn, will.message, props, sysprops, dup=False, qos=min(will.qos, 1))

    def _step_publish(self, conn: Connection, pkt: p.Publish, now: float) -> list[Action]:
        """`_step_packet(now, _receive, conn, pkt)` for a PUBLISH on a connected socket, in one frame
        instead of four: the path of every telemetry message (a connected socket is live and stays
        in its state on a PUBLISH, so `_receive`'s checks have nothing to do)."""
        self.now = now
        self._depth = 1
        conn.last_rx = now
        try:
            if pkt.qos != 2 and pkt.topic.startswith(conn.events_prefix):
                self._on_telemetry(conn, pkt)
            else:
                self._on_publish(conn, pkt)
        except ProtocolViolation as exc:
            self._violation(conn, str(exc))
        except Exception as exc:
            self._internal_error(conn, exc)
        finally:
            self._depth = 0
        out, self._out = self._out, []
        return out

    def _on_publish(self, conn: Connection, pkt: p.Publish) -> None:
        if pkt.qos == 2:
            raise ProtocolViolation("QoS 2 is not supported by IoT Hub")
        topic = pkt.topic
        if topic.startswith(conn.events_prefix):
            return self._on_telemetry(conn, pkt)
        if not topic.startswith("$iothub/"):
            raise ProtocolViolation(f"unsupported topic {topic!r}")
        path, _, query = topic.partition("/?")
        params = t.parse_query(query)
        rid = params.get("$rid")
        if path == t.TWIN_GET:
            self._twin_gated(conn, Operation.TWIN_READ, rid, lambda: self._twin_get(conn, rid))
        elif path == t.TWIN_REPORTED:
            payload = bytes(pkt.payload)
            self._twin_gated(conn, Operation.TWIN_UPDATE, rid, lambda: self._twin_patch(conn, rid, payload))
        elif path.startswith(t.METHOD_RESPONSE_PREFIX):
            self._method_response(conn, path[len(t.METHOD_RESPONSE_PREFIX):], rid, pkt.payload)
        else:
            raise ProtocolViolation(f"unsupported topic {topic!r}")
        if pkt.qos:
            self._ack(conn, pkt.packet_id)
        return None

    def _on_telemetry(self, conn: Connection, pkt: p.Publish) -> None:
        props, sysprops = t.parse_d2c_topic(conn.events_prefix, pkt.topic)
        size = len(pkt.payload) + len(pkt.topic)
        if size > MAX_D2C_SIZE:
            size = len(pkt.payload) + sum(len(k) + len(v) for k, v in props.items()) + \
                sum(len(v) for v in sysprops.values())
        if size > MAX_D2C_SIZE:
            raise ProtocolViolation(f"message of {size} bytes exceeds IoT Hub's 256 KB limit")
        mid = sysprops.get("message_id")
        if mid is not None and len(mid) > limits.MESSAGE_ID_MAX_CHARS:
            # what the hub does with a too-long $.mid over MQTT is not documented: closed, as for
            # other messages it refuses (limits.validate_d2c_message, assumption)
            error = limits.validate_message_id(mid)
            if error is not None:
                raise ProtocolViolation(f"{error.name} {error.code}: {error.message}")
        # one match screens the bag; the rule itself runs only for a bag that fails it
        if not limits.plain_bag(pkt.topic, len(conn.events_prefix) + 1):
            problem = limits.property_bag_problem(pkt.topic)
            if problem is not None:  # reported: the hub closes the connection (limits.property_bag_problem)
                raise ProtocolViolation(problem)
        if pkt.retain:
            props[self.retain_property] = "true"
        faults = self.faults
        # no fault in force, none requested in this message: nothing for the engine to decide
        if faults.active or conn.doomed or FAULT_PROPERTY in props:
            verdict = faults.publish_verdict(conn, pkt, props)
            if verdict.consume:
                return
        else:
            verdict = PROCEED
        tier_delay = 0.0 if self.throttles.tier is None else self._d2c_tier_delay(conn)
        if tier_delay is None:
            return
        qos = pkt.qos
        self._accept_d2c(conn, pkt.payload, props, sysprops, pkt.dup, qos)
        ack_delay = max(verdict.ack_delay, tier_delay)
        if verdict.close_after_accept:
            self.close_conn(conn, verdict.reason, abort=True, message_id=mid)
        elif qos and ack_delay > 0:
            self._timer(("ack", conn, pkt.packet_id), self.now + ack_delay)
        elif qos and pkt.packet_id is not None and conn.state is _CONNECTED and not conn.paused:
            self._out.append(Send(conn, codec.encode_puback(pkt.packet_id)))  # _ack, inlined

    def _d2c_tier_delay(self, conn: Connection) -> float | None:
        """How long this message's PUBACK waits its turn, or None: over the tier's limit, the message
        is not acknowledged and the hub closes the connection (tiers.py, azure-iot-sdk-c #1766)."""
        verdict = self._tier_verdict(Operation.D2C_SEND, conn.device_id)
        if isinstance(verdict, Reject):
            self.events.add("throttled", conn.device_id, operation="d2c_send", error_code=verdict.error.code)
            self.faults.close_soon(conn, "throttled")
            return None
        return verdict.seconds if isinstance(verdict, Delay) else 0.0

    def _accept_d2c(self, conn: Connection, body: bytes, props: dict[str, str], sysprops: dict[str, str],
                    dup: bool, qos: int) -> None:
        assert conn.device_id is not None
        sysprops["connection_device_id"] = conn.device_id
        sysprops["connection_auth_method"] = AUTH_METHOD
        if conn.model_id:
            sysprops["dt_dataschema"] = conn.model_id
        # straight into the ledger's compact record: no Telemetry object per message
        self.ledger.record_message(conn.device_id, sysprops.get("message_id"), body, props, sysprops,
                                   self.now, dup, qos)
        if self.faults.waiting_for_messages:
            self.faults.on_accepted(conn)


class IoTHubCore(_DeviceToCloud, _CloudToDevice):
    def __init__(self, hostname: str, registry: Registry, ledger: Ledger, events: EventLog, *,
                 token_grace: float = 300.0, connect_timeout: float = 30.0, max_unauthenticated: int = 1000,
                 retain_property: str = "mqtt-retain", tier: Tier | None = None):
        super().__init__()
        self._init_tier_gate(HubThrottles(tier))
        self.hostname, self.registry, self.ledger, self.events = hostname, registry, ledger, events
        self.token_grace = token_grace
        self.connect_timeout = connect_timeout
        self.max_unauthenticated = max_unauthenticated
        self.retain_property = retain_property
        self.connections: dict[str, Connection] = {}     # authenticated, one per device
        self.open_connections: set[Connection] = set()   # every socket, authenticated or not
        self.unauthenticated: set[Connection] = set()    # admitted sockets still awaiting CONNECT
        self.sessions: dict[str, Session] = {}
        self.c2d_queues: dict[str, C2DQueue] = {}
        self.twins: dict[str, Twin] = {}
        self.history = ChangeHistory()
        self.region = "primary"
        self.faults = FaultEngine(self)
        self._method_calls: dict[str, tuple[str, Callable[[MethodResponse], None], float]] = {}
        self._rids = itertools.count(1)

    # --- driver entry points -------------------------------------------------------------------

    def open(self, peer: str, now: float) -> tuple[Connection, list[Action]]:
        return self._step(now, self._open, peer)

    def receive(self, conn: Connection, packet: Any, now: float) -> list[Action]:
        if type(packet) is _PUBLISH and conn.state is _CONNECTED and not self._depth:
            return self._step_publish(conn, packet, now)  # nearly every packet: telemetry
        return self._step_packet(now, self._receive, conn, packet)

    def violation(self, conn: Connection, message: str, now: float) -> list[Action]:
        """The driver could not decode what the peer sent."""
        return self._step(now, self._violation, conn, message)[1]

    def transport_error(self, conn: Connection, kind: str, message: str, now: float) -> list[Action]:
        """TLS failed or similar: logged as `kind`, the connection is reset."""
        def fail() -> None:
            self.events.add(kind, conn.device_id, message=message, peer=conn.peer)
            self.close_conn(conn, kind, abort=True)
        return self._step(now, fail)[1]

    def note(self, conn: Connection, kind: str, now: float, **detail: Any) -> list[Action]:
        """A transport observation worth an event (e.g. `send_paused`)."""
        return self._step(now, self.events.add, kind, conn.device_id, peer=conn.peer, **detail)[1]

    def close(self, conn: Connection, reason: str, now: float, abort: bool = False, **detail: Any) -> list[Action]:
        return self._step(now, self.close_conn, conn, reason, abort, **detail)[1]

    def connection_lost(self, conn: Connection, now: float) -> list[Action]:
        return self._step(now, self._lost, conn)[1]

    def timer_fired(self, key: Hashable, now: float) -> list[Action]:
        return self._step(now, self._fired, key)[1]

    def internal_error(self, conn: Connection | None, exc: BaseException, now: float) -> list[Action]:
        return self._step(now, self._internal_error, conn, exc)[1]

    # --- service entry points ------------------------------------------------------------------

    def send_c2d(self, device_id: str, body: bytes, properties: dict[str, Any] | None,
                 message_id: str | None, now: float, **terms: Any) -> tuple[str, list[Action]]:
        return self._step(now, self._send_c2d, device_id, body, properties, message_id, **terms)

    def update_desired(self, device_id: str, patch: dict[str, Any], now: float) -> tuple[int, list[Action]]:
        return self._step(now, self._update_desired, device_id, patch)

    def invoke_method(self, device_id: str, name: str, payload: Any, timeout: float,
                      notify: Callable[[MethodResponse], None], now: float) -> list[Action]:
        """Publish a method request; a `Reply(notify, MethodResponse)` follows exactly once
        (404 at once, 504 from timer_fired, or the device's answer from receive)."""
        return self._step(now, self._invoke_method, device_id, name, payload, timeout, notify)[1]

    def add_device(self, device_id: str, primary_key: str | None, secondary_key: str | None,
                   enabled: bool, now: float) -> tuple[Device, list[Action]]:
        return self._step(now, self._add_device, device_id, primary_key, secondary_key, enabled)

    def get_twin(self, device_id: str, now: float) -> tuple[dict[str, Any], list[Action]]:
        return self._step(now, self._get_twin, device_id)

    def device_disabled(self, device_id: str, removed: bool, now: float) -> list[Action]:
        return self._step(now, self._device_disabled, device_id, removed)[1]

    def schedule_fault(self, fault: Any, at: float | None, after_messages: int | None,
                       now: float) -> list[Action]:
        return self._step(now, self.faults.schedule, fault, at, after_messages)[1]

    def end_fault(self, fault: Any, cancelled: bool, now: float) -> list[Action]:
        return self._step(now, self.faults.end, fault, cancelled)[1]

    # --- used by the fault engine --------------------------------------------------------------

    def pause(self, conn: Connection, on: bool) -> None:
        if conn.paused != on and not conn.closed:
            conn.paused = on
            if not on:
                conn.last_rx = self.now  # what it sent meanwhile arrives now, as after a healed partition
            self._emit(Pause(conn, on))

    def in_scope(self, device_id: str | None) -> list[Connection]:
        return [c for c in self.open_connections if device_id is None or c.device_id == device_id]

    def arm(self, key: Hashable, deadline: float | None) -> None:
        self._timer(key, deadline)

    # --- connections -------------------------------------------------------------------------

    def _open(self, peer: str) -> Connection:
        conn = Connection(peer, self.now)
        self.open_connections.add(conn)
        if len(self.unauthenticated) >= self.max_unauthenticated:
            self.events.add("connect_refused", None, reason="too many unauthenticated connections",
                            limit=self.max_unauthenticated, peer=peer)
            self.close_conn(conn, "refused", abort=True)
            return conn
        self.unauthenticated.add(conn)
        self._timer(("connect_timeout", conn), self.now + self.connect_timeout)
        self.faults.on_open(conn)
        return conn

    def _receive(self, conn: Connection, packet: Any) -> None:
        if not conn.live:
            return
        conn.last_rx = self.now
        try:
            kind = packet.type
            if kind == p.CONNECT or conn.state is not _CONNECTED:  # connected: no change, no table lookup
                conn.advance(ConnEvent.CONNECT if kind == p.CONNECT else ConnEvent.PACKET, p.PACKET_NAMES.get(kind, ""))
            if kind == p.PUBLISH:
                self._on_publish(conn, packet)
            elif kind == p.CONNECT:
                self._on_connect(conn, packet)
            elif kind == p.PUBACK:
                self._on_puback(conn, packet.packet_id)
            elif kind == p.PINGREQ:
                self._send(conn, p.Pingresp())
            elif kind == p.SUBSCRIBE:
                self._on_subscribe(conn, packet)
            elif kind == p.UNSUBSCRIBE:
                for topic_filter in packet.topics:
                    conn.session.subscriptions.pop(topic_filter, None)
                self._send(conn, p.Unsuback(packet.packet_id))
            elif kind == p.DISCONNECT:
                conn.graceful = True
                self.close_conn(conn, "client")
            else:
                raise ProtocolViolation(f"{p.PACKET_NAMES.get(kind) or kind} is not accepted from a device")
        except ProtocolViolation as exc:
            self._violation(conn, str(exc))
        except Exception as exc:
            self._internal_error(conn, exc)

    def _refuse(self, conn: Connection, code: int, device_id: str | None, why: str, **detail: Any) -> None:
        kind = "auth_failure" if code in (p.CONNACK_BAD_CREDENTIALS, p.CONNACK_NOT_AUTHORIZED) else "connect_refused"
        self.events.add(kind, device_id, reason=why, return_code=code, peer=conn.peer, **detail)
        self._send(conn, p.Connack(code, False))
        self.close_conn(conn, "refused", return_code=code)

    def _on_connect(self, conn: Connection, pkt: p.Connect) -> None:
        if pkt.protocol_name != "MQTT" or pkt.protocol_level != 4:
            return self._refuse(conn, p.CONNACK_BAD_PROTOCOL, None,
                                f"protocol {pkt.protocol_name!r} level {pkt.protocol_level} is not MQTT 3.1.1")
        verdict = self.faults.connect_verdict(conn, pkt.client_id)
        if verdict is not None:
            fault, code = verdict
            if code is None:  # silenced: never answered
                self.events.add("connect_ignored", pkt.client_id, fault=fault.kind, fault_id=fault.id, peer=conn.peer)
                return None
            return self._refuse(conn, code, pkt.client_id, f"{fault.kind} fault", fault_id=fault.id)
        try:
            user, token = authenticate(pkt, self.hostname, self.registry, self.now, self.token_grace, self.policies)
        except AuthError as exc:
            known = self.registry.get(pkt.client_id) is not None
            return self._refuse(conn, p.CONNACK_NOT_AUTHORIZED, pkt.client_id if known else None, str(exc))
        admission = self._tier_verdict(Operation.NEW_CONNECTION, pkt.client_id)
        if isinstance(admission, Reject):
            return self._refuse(conn, p.CONNACK_SERVER_UNAVAILABLE, pkt.client_id, "throttled",
                                error_code=admission.error.code)
        if isinstance(admission, Delay):
            wait = admission.seconds
            return self._defer("tier_connect", wait, lambda: self._accept_connect(conn, pkt, user, token, wait))
        return self._accept_connect(conn, pkt, user, token)

    def _accept_connect(self, conn: Connection, pkt: p.Connect, user: Any, token: Any, throttled: float = 0.0) -> None:
        if not conn.live or conn.device_id is not None:
            return  # gone (or answered) while it waited its turn
        device_id = pkt.client_id
        old = self.connections.get(device_id)
        if old is not None and old is not conn:
            # §1.6: the newer connection wins; the session moves over to it
            self.close_conn(old, "replaced")
            del self.connections[device_id]
        session_present = self._attach_session(conn, device_id, pkt.clean_session)
        conn.advance(ConnEvent.ACCEPT)
        self.unauthenticated.discard(conn)
        conn.device_id, conn.will, conn.token_expiry = device_id, pkt.will, token.expiry
        conn.model_id, conn.api_version = user.params.get("model-id"), user.api_version
        conn.events_prefix = t.events_prefix(device_id)
        self.connections[device_id] = conn
        conn.keep_alive = min(1.5 * pkt.keep_alive, MAX_SERVER_KEEPALIVE) if pkt.keep_alive else MAX_SERVER_KEEPALIVE
        self._timer(("connect_timeout", conn), None)
        self._timer(("keepalive", conn), self.now + conn.keep_alive)
        self._timer(("token", conn), token.expiry + self.token_grace)
        self._send(conn, p.Connack(p.CONNACK_ACCEPTED, session_present))
        extra = {"throttled": round(throttled, 3)} if throttled else {}
        self.events.add("connect", device_id, session_present=session_present, clean_session=pkt.clean_session,
                        keep_alive=pkt.keep_alive, api_version=user.api_version, peer=conn.peer, region=self.region,
                        **extra)
        if conn.will is not None:
            problem = self._will_problem(conn, conn.will)
            if problem is not None:
                conn.will = None
                self.events.add("will_rejected", device_id, reason=problem, peer=conn.peer)
        # §1.3: queued C2D is pushed straight after CONNACK when the session holds the subscription
        self._pump_c2d(device_id, redeliver=True)
        return

    def _attach_session(self, conn: Connection, device_id: str, clean: bool) -> bool:
        session_present = False
        if clean:
            self._c2d_purge(device_id)
            self.sessions.pop(device_id, None)
            session = Session(clean=True)
        else:
            found = self.sessions.get(device_id)
            session_present = found is not None and not found.clean
            session = found if found is not None and session_present else Session()
        self.sessions[device_id] = conn.session = session
        return session_present

    def _lost(self, conn: Connection) -> None:
        if conn.closed:
            return
        accepted = conn.device_id is not None  # set once CONNACK 0 went out
        conn.advance(ConnEvent.LOST)
        self.open_connections.discard(conn)
        self.unauthenticated.discard(conn)
        for name in ("connect_timeout", "keepalive", "token"):
            self._timer((name, conn), None)
        self.faults.on_lost(conn)
        if not accepted:
            return
        device_id = conn.device_id
        assert device_id is not None
        reason = conn.close_reason or "connection_lost"
        self.events.add("disconnect", device_id, reason=reason, peer=conn.peer, **conn.close_detail)
        if conn.will is not None and not conn.graceful:
            self._record_will(conn, conn.will)
        if self.connections.get(device_id) is conn:
            del self.connections[device_id]
            if conn.session.clean:
                self.sessions.pop(device_id, None)

    def _fired(self, key: Hashable) -> None:
        assert isinstance(key, tuple)
        kind, subject = key[0], key[1]
        if kind in self.faults.TIMER_KINDS:
            self.faults.timer_fired(key)
        elif kind in TIER_TIMER_KINDS:
            self._tier_fired(key)
        elif kind in C2D_TIMER_KINDS:
            self._c2d_fired(key)
        elif kind == "method":
            self._method_timeout(subject)
        elif not isinstance(subject, Connection) or not subject.live:
            return
        elif kind == "connect_timeout" and subject.state is ConnState.AWAITING_CONNECT:
            self.events.add("connect_timeout", None, peer=subject.peer, seconds=self.connect_timeout)
            self.close_conn(subject, "connect_timeout")
        elif kind == "keepalive" and subject.keep_alive is not None:
            idle = self.now - subject.last_rx
            if idle >= subject.keep_alive and not subject.paused:
                self.close_conn(subject, "keepalive", idle=round(idle, 3))
            else:
                self._timer(key, max(subject.last_rx + subject.keep_alive, self.now + _RECHECK))
        elif kind == "token":
            self.close_conn(subject, "token_expired", expiry=subject.token_expiry)
        elif kind == "ack":
            self._ack(subject, key[2])

    def _device_disabled(self, device_id: str, removed: bool) -> None:
        conn = self.connections.get(device_id)
        if conn is not None:
            self.close_conn(conn, "device_removed" if removed else "device_disabled")
        if removed:
            self.sessions.pop(device_id, None)
            self.c2d_queues.pop(device_id, None)
            self.twins.pop(device_id, None)
