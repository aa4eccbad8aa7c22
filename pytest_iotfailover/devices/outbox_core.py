"""The one sending core behind Outbox and AsyncOutbox: lanes, workers, retries and bookkeeping.

A front-end supplies how one SDK call is started (`_launch`), which clients it accepts
(`_check_client_kind`) and whether send() may wait for room on the calling thread
(`_check_blocking_allowed`); everything else, and all the state, is here.
"""
import collections
import itertools
import json
import threading
import time
import uuid
from typing import Any

from azure.iot.device import Message

from .. import checks
from . import observers as _observers
from . import wedge as _wedge
from .backoff import MAX_BACKOFF, MIN_BACKOFF, Backoff
from .replay import Replay
from .send_times import SendTimes

__all__ = ["OutboxClosed", "OutboxCore", "OutboxFull"]

# the SDK refuses bigger payloads on every attempt; caught in send() so it is not retried forever
_MAX_MESSAGE_SIZE = 256 * 1024
_OVERFLOW_POLICIES = ("block", "drop_oldest", "raise")
# enough to explain a failure; a long outage with fast retries must not grow memory without end
_FAILURES_KEPT = 1000
_IDS_SHOWN = 5
# how often a worker waiting for an acknowledgement looks at whether its client died silently
_WEDGE_CHECK = 0.25
# how often a worker in its back-off looks at whether its disconnected client is connected again
_RECONNECT_CHECK = 0.05

_names = itertools.count(1)


class OutboxFull(Exception):
    """send() found no room: the outbox holds `capacity` messages the hub has not acknowledged."""


class OutboxClosed(RuntimeError):
    """The outbox was closed: it takes no more messages and sends nothing more."""


class _Entry:
    __slots__ = ("device_id", "first_try", "message", "message_id", "seq", "state")

    def __init__(self, seq: int, message: Message, device_id: str | None):
        self.seq = seq
        self.message_id: str = message.message_id
        self.message = message
        self.device_id = device_id
        self.state = "pending"      # "pending" | "acked" | "dropped"
        self.first_try: float | None = None  # monotonic time of its first attempt (replay=)


class _Attempt:
    __slots__ = ("entry", "error", "finished")

    def __init__(self, entry: _Entry):
        self.entry = entry
        self.finished = False
        self.error: BaseException | None = None


class _Lane:
    """The messages of one device, sent strictly one after the other by one worker thread."""
    __slots__ = ("current", "entries", "key", "thread")

    def __init__(self, key: str | None):
        self.key = key
        self.entries: collections.deque[_Entry] = collections.deque()
        self.current: _Entry | None = None   # the entry a worker is waiting on right now
        self.thread: threading.Thread | None = None


def _as_message(message: Any) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, (str, bytes, bytearray)):
        return Message(bytes(message) if isinstance(message, bytearray) else message)
    if isinstance(message, dict):
        try:
            body = json.dumps(message)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"message: the dict cannot be encoded as JSON: {exc}") from None
        return Message(body, content_encoding="utf-8", content_type="application/json")
    raise TypeError(f"message must be str, bytes, dict or azure.iot.device.Message, "
                    f"not {type(message).__name__}")


class OutboxCore:
    """Messages accepted but not yet acknowledged, per lane, and the workers that send them."""

    #: how long a blocked send() waits without any acknowledgement before raising OutboxFull
    block_timeout: float = 600.0

    def __init__(self, front: Any, target: Any, *, capacity: int = 10_000, on_overflow: str = "block",
                 send_timeout: float = 30.0, min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 name: str | None = None, replay: float = 0.0, replay_outage: float = 2.0):
        self._front = front
        self._replay = Replay(replay, replay_outage, capacity)
        self.replayed_ids: list[str] = []  # read under the lock
        self._is_pool = hasattr(target, "device_ids")
        self._check_target(target)
        checks.positive_int("capacity", capacity)
        checks.choice("on_overflow", on_overflow, _OVERFLOW_POLICIES)
        self._send_timeout = checks.required_seconds("send_timeout", send_timeout, positive=True)
        # the pool's formula, its step as long as the shortest delay
        self._backoff = Backoff.checked(min_backoff, max_backoff, min_backoff)
        if name != "":  # "" picks the default name, as None does
            checks.text("name", name, allow_none=True)
        self.target = target
        self.capacity = capacity
        self.on_overflow = on_overflow
        self.name = name or f"outbox-{next(_names)}"
        self._cond = threading.Condition()
        self._lanes: dict[str | None, _Lane] = {}
        self._pending = 0
        self._round_robin = 0
        self._message_ids: list[str] = []
        self._submitted_at: dict[str, float] = {}
        self._times = SendTimes()  # by entry seq, which is the message's index in _message_ids
        self._sent_ids: list[str] = []
        self._dropped_ids: list[str] = []
        self._failures: collections.deque[tuple[str, str, float]] = collections.deque(maxlen=_FAILURES_KEPT)
        self._closed = False
        self._last_progress = time.monotonic()
        self._wedges: list[_wedge.Wedge] = []
        if not self._is_pool:
            _wedge.watch(target)
        _observers.created(front)  # the test report learns of every outbox without the user's help

    def _check_target(self, target) -> None:
        if self._is_pool:
            if not callable(getattr(target, "send", None)):
                raise ValueError("target has device_ids but no send(device_id, message, timeout=None) method")
        elif not callable(getattr(target, "send_message", None)):
            raise ValueError(f"target must be a device client with send_message() or a pool with send() "
                             f"and device_ids, got {type(target).__name__}")
        else:
            self._front._check_client_kind(target)

    def send(self, message, device_id: str | None = None) -> str:
        """Queue `message` and return its message id at once; it is sent in the background.

        `message` may be a str, bytes, a dict (sent as JSON) or an `azure.iot.device.Message`;
        a message without a message id gets a fresh one (uuid4 hex). `device_id` picks the lane of
        a pool target; with a plain client it must be None.
        """
        msg = _as_message(message)
        if device_id is not None and not isinstance(device_id, str):
            raise ValueError(f"device_id must be a string or None, got {device_id!r}")
        if device_id is not None and not self._is_pool:
            raise ValueError(f"device_id {device_id!r} given, but the target is a single device client; "
                             "device_id selects a device of a pool target")
        if msg.message_id is None:
            msg.message_id = uuid.uuid4().hex
        if msg.get_size() > _MAX_MESSAGE_SIZE:
            raise ValueError(f"message: {msg.get_size()} bytes exceed IoT Hub's 256 KB telemetry limit")
        with self._cond:
            self._raise_if_closed()
            lane_key = self._lane_key(device_id)
            if self._pending >= self.capacity:
                self._make_room()
            lane = self._lanes.get(lane_key)
            if lane is None:
                lane = self._lanes[lane_key] = _Lane(lane_key)
            lane.entries.append(_Entry(len(self._message_ids), msg, lane_key))
            self._pending += 1
            self._message_ids.append(msg.message_id)
            self._times.add()
            self._submitted_at.setdefault(msg.message_id, time.time())
            if lane.thread is None:
                lane.thread = threading.Thread(target=self._run_lane, args=(lane,), daemon=True,
                                               name=f"{self.name}:{lane_key or 'client'}")
                lane.thread.start()
            self._cond.notify_all()
        return msg.message_id

    def _lane_key(self, device_id: str | None) -> str | None:
        if not self._is_pool:
            return None
        ids = list(self.target.device_ids)
        if device_id is not None:
            if device_id not in ids:
                raise ValueError(f"device_id {device_id!r} is not one of the pool's devices ({', '.join(ids)})")
            return device_id
        if not ids:
            raise ValueError("the pool has no devices (its device_ids is empty)")
        key = ids[self._round_robin % len(ids)]
        self._round_robin += 1
        return key

    def _make_room(self) -> None:
        """Called with the lock held and the outbox full."""
        if self.on_overflow == "raise":
            raise OutboxFull(self._full_text())
        since = time.monotonic()
        if self.on_overflow == "drop_oldest":
            while not self._evict_oldest():
                # every pending message is being sent right now; one attempt ends within send_timeout
                self._wait_for_room_step(since)
                if self._pending < self.capacity:
                    return
            return
        while self._pending >= self.capacity:
            self._wait_for_room_step(since)

    def _wait_for_room_step(self, since: float) -> None:
        self._front._check_blocking_allowed()
        self._cond.wait(1.0)
        self._raise_if_closed()
        if time.monotonic() - max(since, self._last_progress) > self.block_timeout:
            raise OutboxFull(self._full_text() + f"; send() waited {self.block_timeout:g} s "
                             "without a single acknowledgement")

    def _evict_oldest(self) -> bool:
        victim: _Entry | None = None
        for lane in self._lanes.values():
            for entry in itertools.islice(lane.entries, 2):
                if entry is not lane.current:
                    if victim is None or entry.seq < victim.seq:
                        victim = entry
                    break
        if victim is None:
            return False
        self._lanes[victim.device_id].entries.remove(victim)
        victim.state = "dropped"
        self._pending -= 1
        self._dropped_ids.append(victim.message_id)
        return True

    def _full_text(self) -> str:
        return (f"outbox {self.name!r} is full: {self._pending} messages not yet acknowledged "
                f"(capacity {self.capacity})")

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise OutboxClosed(f"outbox {self.name!r} is closed"
                               + (f"; {self._pending} messages were left pending" if self._pending else ""))

    def _run_lane(self, lane: _Lane) -> None:
        failures_in_a_row = 0
        cond = self._cond
        while True:
            with cond:
                while not self._closed and not lane.entries:
                    cond.wait()
                if self._closed:
                    return
                entry = lane.entries[0]
                lane.current = entry
                if entry.first_try is None:
                    entry.first_try = time.monotonic()
                self._times.attempt(entry.seq, time.time())
                attempt = _Attempt(entry)
            try:
                self._front._launch(attempt)
            except BaseException as exc:
                self._attempt_done(attempt, exc)
            deadline = time.monotonic() + self._send_timeout
            with cond:
                # any earlier, abandoned call for this entry may be the one that gets acknowledged
                while not (attempt.finished or entry.state == "acked" or self._closed):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(min(left, _WEDGE_CHECK))
                    if not (attempt.finished or entry.state == "acked" or self._closed):
                        self._revive_if_wedged()
                lane.current = None
                if self._closed:
                    return
                if entry.state == "acked":
                    failures_in_a_row = 0
                    continue
                error = attempt.error if attempt.finished else TimeoutError(
                    f"no acknowledgement within send_timeout={self._send_timeout:g} s "
                    "(the call was abandoned and may still complete)")
                self._failures.append((entry.message_id, repr(error), time.time()))
                failures_in_a_row += 1
                delay_until = time.monotonic() + self._backoff.delay(failures_in_a_row - 1)
                offline = self._client_connected() is False
                # an abandoned call that completes meanwhile ends the wait: nothing left to retry
                while not self._closed and entry.state != "acked":
                    left = delay_until - time.monotonic()
                    if left <= 0:
                        break
                    if offline and self._client_connected():
                        # the SDK reconnected by itself, so the hub is back: the rest of the
                        # back-off would only hold the buffer back. The SDK's own retry interval
                        # paces these early tries, so a hub that drops every connection at once
                        # sees no more attempts than the SDK makes anyway.
                        break
                    cond.wait(min(left, _RECONNECT_CHECK) if offline else left)
                if self._closed:
                    return
                if entry.state == "acked":
                    failures_in_a_row = 0

    def _client_connected(self) -> bool | None:
        """The plain client's own view of its connection; None for a pool (its send() waits for
        the device's next client itself) or a client that does not say."""
        if self._is_pool:
            return None
        connected = getattr(self.target, "connected", None)
        return connected if isinstance(connected, bool) else None

    def _revive_if_wedged(self) -> None:
        """A plain client that says it is connected while its network thread is dead never
        acknowledges anything again: make the SDK see the loss (caller holds the lock; a pool
        watches its own clients)."""
        if self._is_pool:
            return
        found = _wedge.diagnose(self.target)
        if found is None:
            return
        if not any(w.text == found.text for w in self._wedges):
            self._wedges.append(found)
            self._failures.append(("", f"wedged client: {found.text}", time.time()))
        # a no-op if someone (the fixtures' monitor) revived it already
        _wedge.revive(self.target, timeout=0)

    def _attempt_done(self, attempt: _Attempt, error: BaseException | None) -> None:
        returned = time.time() if error is None else 0.0  # before waiting for the lock
        with self._cond:
            if attempt.finished:
                return
            attempt.finished = True
            attempt.error = error
            entry = attempt.entry
            if error is None:  # the device got its acknowledgement, even for an entry dropped meanwhile
                self._times.acked(entry.seq, returned)
            # also after close(): the hub has it, so it is no longer pending
            if error is None and entry.state == "pending":
                entry.state = "acked"
                self._lanes[entry.device_id].entries.remove(entry)
                self._pending -= 1
                self._sent_ids.append(entry.message_id)
                self._last_progress = time.monotonic()
                self._send_again(entry)
            self._cond.notify_all()

    def _send_again(self, acked: _Entry) -> None:
        """replay=: after a failover-length stall, what the lanes had acknowledged just before it
        goes first again, each on its own lane (caller holds the lock)."""
        for entry in reversed(self._replay.acked(acked.device_id, acked, acked.first_try, self._last_progress)):
            entry.state, entry.first_try = "pending", None
            self._lanes[entry.device_id].entries.appendleft(entry)
            self._pending += 1
            self.replayed_ids.append(entry.message_id)

    def _pending_ids_locked(self) -> list[str]:
        entries = [e for lane in self._lanes.values() for e in lane.entries]
        return [e.message_id for e in sorted(entries, key=lambda e: e.seq)]

    def flush(self, timeout: float = 60.0) -> None:
        """Block until the hub acknowledged every accepted message; TimeoutError if it did not
        within `timeout` seconds, OutboxClosed if the outbox is closed with messages pending."""
        timeout = checks.required_seconds("timeout", timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                if self._closed:
                    raise OutboxClosed(f"outbox {self.name!r} was closed with {self._describe_pending()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"outbox {self.name!r}: flush timed out after {timeout:g} s with "
                                       f"{self._describe_pending()}")
                self._cond.wait(left)

    def _describe_pending(self) -> str:
        ids = self._pending_ids_locked()
        shown = ", ".join(ids[:_IDS_SHOWN]) + (", ..." if len(ids) > _IDS_SHOWN else "")
        text = f"{len(ids)} messages pending (first: {shown})"
        if self._failures:
            mid, error, at = self._failures[-1]
            text += f"; last failure {time.time() - at:.1f} s ago for {mid}: {error}"
        return text

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers; unacknowledged messages stay in `pending_ids`. Calls in flight are
        abandoned, not cancelled: the hub may still receive (and acknowledge) them."""
        timeout = checks.required_seconds("timeout", timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = [lane.thread for lane in self._lanes.values() if lane.thread is not None]
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        _observers.closed(self._front)
