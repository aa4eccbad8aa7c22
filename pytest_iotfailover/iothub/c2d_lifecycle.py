"""A cloud-to-device message's life after `send_c2d`: its time to live, its expiry and the
`iothub-ack` feedback its outcome produces. A mixin of the hub core (core.py), sans-IO like it.

Source, unless noted: MicrosoftDocs/azure-docs `articles/iot-hub/iot-hub-devguide-messages-c2d.md`
(ms.date 2026-02-11, "D-C2D" as in limits.py).

- Every message has an expiry: the sender's `ExpiryTimeUtc`, else the hub's default time to live,
  one hour (D-C2D "Message expiration"). A per-message expiry has no documented minimum, so a TTL of
  a second is what a real hub takes too; more than two days ahead is refused with 403009
  (limits.validate_c2d_expiry: the limit is documented, refusing rather than capping is assumed).
- An expired message is dead-lettered, never delivered (D-C2D): it leaves the queue when it would
  be delivered, at its expiry if its sender asked for negative feedback, and when the device's queue
  is counted for the 50-message limit. A message the device holds un-acknowledged when it expires
  is dead-lettered too, so a later PUBACK finds nothing to complete (assumption: D-C2D says the hub
  dead-letters a message "after its expiration time", without exception for locked ones).
- Feedback (D-C2D "Message feedback"): `positive` reports Success when the message is completed,
  `negative` reports a dead-lettered outcome, `full` both. Over MQTT a device completes a message
  by PUBACK (QoS 1) or on delivery (QoS 0) and can neither reject nor abandon it (D-C2D), and the
  max delivery count only counts explicit abandons (D-C2D "Understanding delivery count behavior"),
  so MQTT devices produce Success and Expired only, never Rejected or DeliveryCountExceeded.
- Purged: queued and un-acknowledged messages a clean session throws away (the fake's own purge,
  core.py) report Purged to negative and full feedback (assumption: D-C2D lists the status without
  saying when).
- A message whose sender set its expiry carries it to the device as `$.exp` in the delivery topic's
  property bag: D-MSG lists `absolute-expiry-time` among the user-settable C2D system properties, and
  D-MQTT (`iot-mqtt-connect-to-iot-hub.md`, "Receiving cloud-to-device messages") puts the user-settable
  system properties in the property bag. The value's form is not documented; the fake writes ISO 8601
  UTC with seven fractional digits (`2026-01-02T03:04:05.1234560Z`), the form of the delivery topics in
  azure-iot-sdk-python's own topic tests (`tests/unit/iothub/pipeline/test_mqtt_topic_iothub.py`), and
  leaves `$.exp` out when the hub's default time to live applies (the real delivery topics quoted in
  iothub-mqtt.md §4.1 have none). The SDK hands the text over as `Message.expiry_time_utc`.
- The real hub batches feedback (64 records or 15 s); the fake records each outcome at once
  (simplification), stamped with when it happened: the PUBACK, or the message's expiry instant.
"""
from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..checks import is_number, seconds
from ..errors import HubOperationError
from . import limits
from .events import EventLog
from .session import C2DMessage, C2DQueue, Session

__all__ = ["C2D_TIMER_KINDS", "FEEDBACK_STATUSES", "C2DLifecycle", "FeedbackLog", "FeedbackRecord",
           "c2d_expiry_text", "c2d_properties", "expiry_seconds"]

C2D_TIMER_KINDS = frozenset({"c2d_expiry"})
FEEDBACK_STATUSES = ("Success", "Expired", "DeliveryCountExceeded", "Rejected", "Purged")  # D-C2D
_WANTS = {"Success": ("positive", "full")}   # every other status is a dead-lettered outcome
_NEGATIVE = ("negative", "full")


@dataclass(frozen=True)
class FeedbackRecord:
    """One record of the hub's feedback endpoint (D-C2D: `originalMessageId`, `deviceId`,
    `statusCode`, `description`, `enqueuedTimeUtc`). The fake has no device generation ids, so
    `deviceGenerationId` is left out. `description` repeats the status, as D-C2D's example does."""
    message_id: str
    device_id: str
    status_code: str
    description: str
    enqueued_at: float     # epoch seconds: when the outcome happened

    @property
    def enqueued_time_utc(self) -> str:
        at = datetime.datetime.fromtimestamp(self.enqueued_at, datetime.UTC)
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"

    def as_json(self) -> dict[str, str]:
        """The record as the feedback message's JSON body carries it (D-C2D)."""
        return {"originalMessageId": self.message_id, "enqueuedTimeUtc": self.enqueued_time_utc,
                "statusCode": self.status_code, "description": self.description, "deviceId": self.device_id}


class FeedbackLog:
    """The feedback the hub produced, in order. `lock` (any context manager) guards it for a
    driver that reads it from other threads; the core itself never locks."""

    def __init__(self, lock: AbstractContextManager[Any] | None = None) -> None:
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._records: list[FeedbackRecord] = []

    def add(self, record: FeedbackRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self, device_id: str | None = None, message_id: str | None = None) -> list[FeedbackRecord]:
        with self._lock:
            return [r for r in self._records if (device_id is None or r.device_id == device_id)
                    and (message_id is None or r.message_id == message_id)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def expiry_seconds(expiry_time: object) -> float:
    """An absolute expiry as epoch seconds: a number of them, or a timezone-aware datetime."""
    if isinstance(expiry_time, datetime.datetime):
        if expiry_time.tzinfo is None:
            raise ValueError(f"expiry_time {expiry_time!r} has no time zone; give an aware datetime "
                             "(datetime.timezone.utc) or epoch seconds")
        return expiry_time.timestamp()
    if not is_number(expiry_time):
        raise TypeError(f"expiry_time must be epoch seconds or an aware datetime, got {expiry_time!r}")
    return float(expiry_time)  # type: ignore[arg-type]


def c2d_properties(properties: dict[str, Any] | None) -> dict[str, str | None]:
    """A sender's application properties as the message carries them: names and values as text."""
    return {str(k): (None if v is None else str(v)) for k, v in (properties or {}).items()}


def c2d_expiry_text(msg: C2DMessage) -> str | None:
    """`$.exp` of a delivered message (module docstring): None unless its sender set the expiry."""
    if not msg.expiry_set:
        return None
    at = datetime.datetime.fromtimestamp(msg.expiry, datetime.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond:06d}0Z"


def _refuse(error: limits.IotHubError | None) -> None:
    if error is not None:
        raise HubOperationError(f"send_c2d refused: {error.message}", error.code)


class C2DLifecycle:
    """Expiry and feedback for the core's C2D queues. Needs the core's clock (`now`), queues,
    sessions, event log and `_timer`. A driver that reads `feedback` from other threads replaces
    it with a FeedbackLog holding a lock."""
    now: float
    events: EventLog
    c2d_queues: dict[str, C2DQueue]
    sessions: dict[str, Session]
    _timer: Callable[[Hashable, float | None], None]

    def __init__(self) -> None:
        super().__init__()
        self.feedback = FeedbackLog()
        self._c2d_ids: Iterator[int] = itertools.count(1)          # message ids the hub makes up
        self._c2d_expiry_ids: Iterator[int] = itertools.count(1)   # keys of expiry timers

    def _c2d_terms(self, properties: dict[str, str | None], ttl: Any, expiry_time: Any,
                   ack: Any) -> tuple[float, str]:
        """(absolute expiry, iothub-ack) of a message about to be sent; sets `iothub-ack` in
        `properties`, where the device reads it (iothub-mqtt.md §4.1)."""
        if ttl is not None and expiry_time is not None:
            raise ValueError("give ttl (seconds from now) or expiry_time (absolute), not both")
        given = properties.get("iothub-ack")
        if ack is not None and given is not None and ack != given:
            raise ValueError(f"ack={ack!r} contradicts the property iothub-ack={given!r}")
        ack = ack if ack is not None else given
        _refuse(limits.validate_c2d_ack(ack))
        if ttl is not None:
            expiry_time = self.now + (seconds("ttl", ttl) or 0.0)
        expiry = limits.c2d_expiry(self.now, expiry_time=None if expiry_time is None
                                   else expiry_seconds(expiry_time))
        _refuse(limits.validate_c2d_expiry(self.now, expiry))
        ack = ack or "none"
        if ack != "none" or given is not None:
            properties["iothub-ack"] = ack
        return expiry, ack

    def c2d_check(self, properties: dict[str, Any] | None, ttl: Any, expiry_time: Any, ack: Any) -> None:
        """Raise what `send_c2d` would for these terms, changing nothing: the check a throttled
        send runs before it is booked (tier_gate.py), so a bad `ttl` is refused at once."""
        self._c2d_terms(c2d_properties(properties), ttl, expiry_time, ack)

    def _c2d_enqueued(self, device_id: str, msg: C2DMessage) -> None:
        """A message joined the queue: an expiry timer when its sender waits for negative feedback
        (the others are swept lazily; nobody can tell when)."""
        if msg.ack in _NEGATIVE:
            msg.expiry_timer = ("c2d_expiry", device_id, next(self._c2d_expiry_ids))
            self._timer(msg.expiry_timer, msg.expiry)

    def _c2d_dead(self, device_id: str, msg: C2DMessage) -> bool:
        """True (and dead-lettered, with feedback) when `msg` has expired."""
        if not limits.c2d_expired(msg.expiry, self.now):
            return False
        self.events.add("c2d_expired", device_id, message_id=msg.message_id, expired_at=msg.expiry,
                        delivery_count=msg.delivery_count)
        self._c2d_feedback(device_id, msg, "Expired", msg.expiry)
        return True

    def _c2d_sweep(self, device_id: str) -> None:
        """Dead-letter the device's expired messages, queued or un-acknowledged."""
        queue = self.c2d_queues.get(device_id)
        if queue:
            kept = [m for m in queue if not self._c2d_dead(device_id, m)]
            if len(kept) != len(queue):
                queue.clear()
                queue.extend(kept)
        session = self.sessions.get(device_id)
        if session is not None and session.inflight:
            for pid, msg in sorted(session.inflight.items()):
                if self._c2d_dead(device_id, msg):
                    del session.inflight[pid]

    def _c2d_completed(self, device_id: str, msg: C2DMessage) -> None:
        if msg.expiry_timer is not None:  # a completed message never expires: no timer held for it
            self._timer(msg.expiry_timer, None)
            msg.expiry_timer = None
        self.events.add("c2d_completed", device_id, message_id=msg.message_id, delivery_count=msg.delivery_count)
        self._c2d_feedback(device_id, msg, "Success", self.now)

    def _c2d_purge(self, device_id: str) -> None:
        """A clean session throws away the device's queue and its un-acknowledged messages."""
        session = self.sessions.get(device_id)
        held = [m for _, m in sorted(session.inflight.items())] if session is not None else []
        for msg in held + list(self.c2d_queues.pop(device_id, None) or ()):
            self._c2d_feedback(device_id, msg, "Purged", self.now)

    def _c2d_fired(self, key: Hashable) -> None:
        assert isinstance(key, tuple)
        self._c2d_sweep(key[1])

    def _c2d_feedback(self, device_id: str, msg: C2DMessage, status: str, at: float) -> None:
        if msg.ack not in _WANTS.get(status, _NEGATIVE):
            return
        self.feedback.add(FeedbackRecord(msg.message_id, device_id, status, status, at))
        # the event also wakes whoever waits on feedback (FakeHub.wait_for_feedback)
        self.events.add("c2d_feedback", device_id, message_id=msg.message_id, status_code=status)
