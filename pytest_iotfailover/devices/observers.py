"""Who wants to hear of every Outbox made while they listen, without devices/ knowing who they are.

A test harness (the pytest plugin) listens for the span of one test: each Outbox created meanwhile,
through a fixture or with `Outbox(client)` in the test body, is told to the listener, which keeps
only a weak reference. An Outbox also reports when it is closed, so a listener can take a snapshot
before the last reference goes (an Outbox the test closed and dropped is collected before the test's
teardown looks at it). `snapshot` turns an Outbox into plain data: ids, devices, submit times,
when each attempt started and failed, when the device got the acknowledgement, and the final state
of each message; `unacknowledged` counts the messages a snapshot shows the device never got an
acknowledgement for.

Standard library only, and nothing here may raise into an Outbox: a listener's error is a warning.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

__all__ = ["Listener", "MessageRecord", "OutboxSnapshot", "closed", "created", "listen", "snapshot",
           "unacknowledged"]

_lock = threading.Lock()
_listeners: list[Listener] = []


class Listener:
    """One subscription; `close()` ends it (idempotent)."""

    def __init__(self, on_created: Callable[[Any], None], on_closed: Callable[[Any], None] | None = None):
        self.on_created = on_created
        self.on_closed = on_closed

    def close(self) -> None:
        with _lock:
            if self in _listeners:
                _listeners.remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen(on_created: Callable[[Any], None], on_closed: Callable[[Any], None] | None = None) -> Listener:
    """Call `on_created(outbox)` for every Outbox/AsyncOutbox made from now on, `on_closed(outbox)`
    when one is closed; both run on the thread that made or closed it, so they must be quick.
    `on_created` runs while the Outbox is still being built: keep a reference, read it later."""
    listener = Listener(on_created, on_closed)
    with _lock:
        _listeners.append(listener)
    return listener


def _tell(kind: str, outbox: Any) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        fn = listener.on_created if kind == "created" else listener.on_closed
        if fn is None:
            continue
        try:
            fn(outbox)
        except Exception as exc:  # sending must go on whatever a report collector does wrong
            warnings.warn(f"an Outbox listener failed when told an outbox was {kind}: {exc!r}",
                          RuntimeWarning, stacklevel=3)


def created(outbox: Any) -> None:
    """An Outbox front-end was made (called by its core)."""
    if _listeners:  # read without the lock: a listener added this instant may miss this outbox
        _tell("created", outbox)


def closed(outbox: Any) -> None:
    """An Outbox was closed (called by its core after its workers stopped)."""
    if _listeners:
        _tell("closed", outbox)


@dataclass(frozen=True)
class MessageRecord:
    message_id: str
    device_id: str | None      # None: a pool's message evicted by drop_oldest (its lane is not kept)
    submitted_at: float | None  # time.time() when send() first accepted it
    state: str                  # "acknowledged" | "pending" | "dropped"
    failures: tuple[float, ...]  # time.time() of each failed or timed-out attempt (the latest 1000 overall)
    # time.time() each attempt started: the first and the latest (send_times.ATTEMPTS_KEPT at most)
    attempts: tuple[float, ...] = ()
    attempt_count: int = 0      # every attempt started, also those not kept in `attempts`
    acked_at: float | None = None  # when a send of it first returned successfully: the device's acknowledgement

    def never_acknowledged(self, outbox_closed: bool) -> str | None:
        """"given_up" (dropped, or left pending by a closed Outbox), "pending" (its open Outbox
        still retries it), or None: the device got an acknowledgement for it."""
        if self.state == "acknowledged" or self.acked_at is not None:
            return None
        return "given_up" if self.state == "dropped" or outbox_closed else "pending"


@dataclass(frozen=True)
class OutboxSnapshot:
    name: str
    closed: bool
    messages: tuple[MessageRecord, ...]

    def unacknowledged(self) -> tuple[int, int]:
        """(given up, still pending): its messages the device never got an acknowledgement for."""
        never = [r.never_acknowledged(self.closed) for r in self.messages]
        return never.count("given_up"), never.count("pending")


def unacknowledged(snapshots: Iterable[OutboxSnapshot]) -> tuple[int, int]:
    """(given up, still pending) over several Outboxes' snapshots."""
    given_up = pending = 0
    for snap in snapshots:
        g, p = snap.unacknowledged()
        given_up += g
        pending += p
    return given_up, pending


def _device_of_client(target: Any) -> str | None:
    from .wedge import device_id_of
    try:
        return device_id_of(target)
    except Exception:  # another SDK version, or not an SDK client at all
        return None


def snapshot(outbox: Any, *, unacknowledged_only: bool = False) -> OutboxSnapshot:
    """What `outbox` knows of each message it accepted, in the order it accepted them;
    `unacknowledged_only`: just the messages the device never got an acknowledgement for (cheap
    for an Outbox of many messages, nearly all acknowledged)."""
    from .send_times import merged
    core = outbox._core
    with core._cond:
        ids = list(core._message_ids)
        submitted = dict(core._submitted_at)
        acked = set(core._sent_ids)
        dropped = set(core._dropped_ids)
        lane_of = {e.message_id: e.device_id for lane in core._lanes.values() for e in lane.entries}
        failures: dict[str, list[float]] = {}
        for mid, _error, at in core._failures:
            if mid:
                failures.setdefault(mid, []).append(at)
        columns = core._times.copy()
        is_closed = bool(core._closed)
    single = None if core._is_pool else _device_of_client(core.target)
    first: dict[str, int] = {}
    repeats: dict[str, list[int]] = {}
    for index, mid in enumerate(ids):
        if mid in first:  # the same id sent twice is one message to the hub
            repeats.setdefault(mid, [first[mid]]).append(index)
        else:
            first[mid] = index
    # every message's times in one pass, or, for the few a summary wants, one by one
    every = None if unacknowledged_only else list(columns.each())
    records = []
    for mid, index in first.items():
        if unacknowledged_only and mid in acked:
            continue
        state = "acknowledged" if mid in acked else "pending" if mid in lane_of else (
            "dropped" if mid in dropped else "pending")
        device = single if not core._is_pool else lane_of.get(mid)
        if mid in repeats:
            t = merged([columns.of(i) for i in repeats[mid]])
            times = (t.attempts, t.attempt_count, t.acked_at)
        elif every is not None:
            times = every[index]
        else:
            t = columns.of(index)
            times = (t.attempts, t.attempt_count, t.acked_at)
        rec = MessageRecord(mid, device, submitted.get(mid), state, tuple(failures.get(mid, ())), *times)
        if not unacknowledged_only or rec.never_acknowledged(is_closed) is not None:
            records.append(rec)
    return OutboxSnapshot(str(core.name), is_closed, tuple(records))
