"""The buffered sender: keep every telemetry message until the hub acknowledged it.

The azure-iot-device SDK leaves buffering to the application: `send_message` raises at once while
the client is disconnected, and blocks with no timeout while a publish waits for its PUBACK. An
`Outbox` is the loop every resilient device needs around it: accept messages at once, send them in
order per device, bound each SDK call, retry the same message with exponential backoff until the
hub acknowledges it, and tell a test exactly which ids are still outstanding.

Delivery is **at least once**, never at most once. The hub may see a message twice when

* the connection drops after the hub accepted a publish but before its PUBACK arrived (the SDK
  re-sends it with DUP set after reconnecting), or
* an SDK call outlives `send_timeout`: the call cannot be cancelled, so the outbox abandons it and
  sends the message again; the abandoned call may still complete later.

Compare delivered ids as sets (`set(outbox.message_ids) <= {t.message_id for t in hub.telemetry()}`),
not as lists.
"""
import asyncio
import inspect
from types import TracebackType
from typing import Any, Self

from ..deadline import Call
from . import wedge as _wedge
from .backoff import MAX_BACKOFF, MIN_BACKOFF
from .outbox_core import OutboxClosed, OutboxCore, OutboxFull, _Attempt

__all__ = ["AsyncOutbox", "Outbox", "OutboxClosed", "OutboxFull"]


class _OutboxView:
    """What both front-ends show of their core: settings, ids and counts, read under its lock."""

    _core: OutboxCore

    @property
    def target(self) -> Any:
        return self._core.target

    @property
    def capacity(self) -> int:
        return self._core.capacity

    @property
    def on_overflow(self) -> str:
        return self._core.on_overflow

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def replayed_ids(self) -> list[str]:
        """Ids sent again after a failover (replay=), in the order they were queued again."""
        with self._core._cond:
            return list(self._core.replayed_ids)

    @property
    def block_timeout(self) -> float:
        """How long a blocked send() waits without any acknowledgement before raising OutboxFull."""
        return self._core.block_timeout

    @block_timeout.setter
    def block_timeout(self, value: float) -> None:
        self._core.block_timeout = value

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged by the hub (including those left behind by close())."""
        with self._core._cond:
            return self._core._pending

    @property
    def pending_ids(self) -> list[str]:
        """Ids of the messages not yet acknowledged, oldest first."""
        with self._core._cond:
            return self._core._pending_ids_locked()

    @property
    def sent_ids(self) -> list[str]:
        """Ids the hub acknowledged, in acknowledgement order (each once)."""
        with self._core._cond:
            return list(self._core._sent_ids)

    @property
    def message_ids(self) -> list[str]:
        """Every id send() accepted, in the order it accepted them."""
        with self._core._cond:
            return list(self._core._message_ids)

    @property
    def submitted_at(self) -> dict[str, float]:
        """message id -> time.time() when send() first accepted it (for delivery latencies)."""
        with self._core._cond:
            return dict(self._core._submitted_at)

    @property
    def dropped_ids(self) -> list[str]:
        """Ids evicted by on_overflow="drop_oldest" (a call abandoned earlier may still deliver one)."""
        with self._core._cond:
            return list(self._core._dropped_ids)

    @property
    def failures(self) -> list[tuple[str, str, float]]:
        """(message_id, exception repr, time.time()) of failed attempts, the latest 1000."""
        with self._core._cond:
            return list(self._core._failures)

    @property
    def wedges(self) -> list["_wedge.Wedge"]:
        """Times this outbox found its client dead while it claimed to be connected, and revived it."""
        with self._core._cond:
            return list(self._core._wedges)

    @property
    def closed(self) -> bool:
        return self._core._closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<{type(self).__name__} {self.name!r} {state}: {self.pending} pending, "
                f"{len(self.sent_ids)} sent, {len(self.dropped_ids)} dropped>")


class Outbox(_OutboxView):
    """A buffered, retrying, order-keeping sender in front of a device client or a device pool.

    `target` is either a device client with `send_message(message)` (one lane: messages go out one
    at a time, in order) or a pool with `send(device_id, message, timeout=None)` and `device_ids`
    (one lane per device; `send()` without a `device_id` spreads messages round-robin).

    Each lane's worker sends its oldest message and only after the hub acknowledged it (the SDK
    call returned) the next one. Every call is bounded by `send_timeout`; a failed or timed-out
    attempt is retried with the same message (same message id) after an exponential backoff with
    jitter between `min_backoff` and `max_backoff`; when the failure left a device client
    disconnected, the wait ends early once the SDK has reconnected it. A transient error never
    drops a message.

    Delivery is at least once: a call abandoned at `send_timeout` keeps running inside the SDK,
    which cannot cancel it, and may still deliver its message after the retry did, and a publish
    cut off before its PUBACK is re-sent by the SDK itself. The hub may therefore record a message
    id more than once; order holds for the first delivery of each message.

    `capacity` bounds the messages not yet acknowledged. When it is reached, `on_overflow`
    decides: "block" makes `send()` wait for room (raising `OutboxFull` if no message was
    acknowledged for `block_timeout` seconds, `OutboxClosed` if the outbox is closed meanwhile),
    "drop_oldest" evicts the oldest message not being sent at that moment (listed in
    `dropped_ids`), "raise" raises `OutboxFull`.

    `replay` (seconds, default 0: off): a regional failover loses messages the hub acknowledged but
    no backend had read yet. After a lane stalled for at least `replay_outage` s (default 2), the
    messages it had acknowledged in the `replay` s before the stall are sent again, first, with
    their message ids (`replayed_ids`); the backend deduplicates. Choose `replay` above the
    backend's lag.

    The outbox never connects, disconnects or shuts down its target: the caller owns it.
    """

    def __init__(self, target: Any, *, capacity: int = 10_000, on_overflow: str = "block",
                 send_timeout: float = 30.0, min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 name: str | None = None, replay: float = 0.0, replay_outage: float = 2.0):
        self._core = OutboxCore(self, target, capacity=capacity, on_overflow=on_overflow,
                                send_timeout=send_timeout, min_backoff=min_backoff,
                                max_backoff=max_backoff, name=name, replay=replay, replay_outage=replay_outage)

    def _check_client_kind(self, client) -> None:
        # an un-awaited coroutine would look like an instant acknowledgement
        if inspect.iscoroutinefunction(client.send_message):
            raise ValueError("target is an asyncio client (its send_message is a coroutine function); "
                             "use AsyncOutbox for azure.iot.device.aio clients")

    def _check_blocking_allowed(self) -> None:
        pass  # a plain client's sends run on their own threads: waiting here holds nothing up

    def _launch(self, attempt: _Attempt) -> None:
        """Start one SDK call for `attempt` that reports to the core; it must not block."""
        Call(lambda: self._call_target(attempt), f"{self.name}:send:{attempt.entry.message_id}")

    def _call_target(self, attempt: _Attempt) -> None:
        entry = attempt.entry
        try:
            if self._core._is_pool:
                result = self._core.target.send(entry.device_id, entry.message, timeout=self._core._send_timeout)
            else:
                result = self._core.target.send_message(entry.message)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError("the target returned an awaitable: it is an asyncio client, use AsyncOutbox")
        except BaseException as exc:
            self._core._attempt_done(attempt, exc)
        else:
            self._core._attempt_done(attempt, None)

    def send(self, message: Any, device_id: str | None = None) -> str:
        """Queue `message` and return its message id at once; it is sent in the background.

        `message` may be a str, bytes, a dict (sent as JSON) or an `azure.iot.device.Message`;
        a message without a message id gets a fresh one (uuid4 hex). `device_id` picks the lane of
        a pool target; with a plain client it must be None.
        """
        return self._core.send(message, device_id)

    def flush(self, timeout: float = 60.0) -> None:
        """Block until the hub acknowledged every accepted message; TimeoutError if it did not
        within `timeout` seconds, OutboxClosed if the outbox is closed with messages pending."""
        self._core.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers; unacknowledged messages stay in `pending_ids`. Calls in flight are
        abandoned, not cancelled: the hub may still receive (and acknowledge) them."""
        self._core.close(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _run_in_thread(loop: asyncio.AbstractEventLoop, fn, *args) -> "asyncio.Future":
    """Await a blocking call without the loop's default executor, whose threads asyncio.run()
    waits for on exit: an abandoned flush would hold up the end of the program."""
    fut = loop.create_future()

    def settle(call: Call) -> None:
        if not fut.done():
            if call.error is not None:
                fut.set_exception(call.error)
            else:
                fut.set_result(call.result)

    def report(call: Call) -> None:
        try:
            loop.call_soon_threadsafe(settle, call)
        except RuntimeError:
            pass  # the loop is gone; nobody is waiting any more
    Call(lambda: fn(*args), f"outbox:{getattr(fn, '__name__', 'call')}", on_done=report)
    return fut


class AsyncOutbox(_OutboxView):
    """`Outbox` for azure.iot.device.aio clients (and pools whose `send` is a coroutine).

    `send()` stays synchronous and returns the message id at once; the SDK coroutines run on the
    event loop that was running when the outbox was created or first used. `await flush()` and
    `await close()` replace the blocking versions, and `async with` closes.

    A full outbox with on_overflow="block" cannot block `send()` on the loop itself (the sends
    that would make room run on that loop): there it raises `OutboxFull`; `await asend(...)`
    waits for room instead. Delivery is at least once, as for `Outbox`.
    """

    def __init__(self, target: Any, **kwargs: Any):
        self._loop: asyncio.AbstractEventLoop | None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._core = OutboxCore(self, target, **kwargs)

    def _check_client_kind(self, client) -> None:
        # a blocking send_message would stall the loop that runs every other coroutine
        if not inspect.iscoroutinefunction(client.send_message):
            raise ValueError("target's send_message is not a coroutine function; use Outbox for "
                             "synchronous clients")

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or (self._loop.is_closed() and running is not None):
            if running is None:
                raise RuntimeError("AsyncOutbox.send() needs a running event loop the first time "
                                   "(call it from a coroutine)")
            self._loop = running
        return self._loop

    def _check_blocking_allowed(self) -> None:
        if self._loop is not None and self._on_loop_thread():
            raise OutboxFull(self._core._full_text() + "; send() cannot wait for room on the event loop "
                             "that delivers the messages: use `await outbox.asend(...)`")

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _launch(self, attempt: _Attempt) -> None:
        entry = attempt.entry
        target, is_pool, send_timeout = self._core.target, self._core._is_pool, self._core._send_timeout

        async def call():
            if is_pool:
                result = target.send(entry.device_id, entry.message, timeout=send_timeout)
            else:
                result = target.send_message(entry.message)
            if inspect.isawaitable(result):
                await result

        coro = call()
        loop = self._loop
        try:
            if loop is None:  # the caller's send() bound it; None only if send() was bypassed
                raise RuntimeError("AsyncOutbox has no event loop to send on")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except BaseException:
            coro.close()
            raise
        # the worker stops waiting at send_timeout but the coroutine is left to finish: cancelling
        # it would not cancel the publish inside the SDK, only hide whether it got through
        future.add_done_callback(lambda f: self._core._attempt_done(
            attempt, asyncio.CancelledError("the event loop cancelled the send") if f.cancelled()
            else f.exception()))

    def send(self, message: Any, device_id: str | None = None) -> str:
        """Queue `message` and return its id at once, as Outbox.send (never waits for room here)."""
        self._bind_loop()
        return self._core.send(message, device_id)

    async def asend(self, message: Any, device_id: str | None = None) -> str:
        """Like send(), but waits for room instead of raising when on_overflow="block"."""
        self._bind_loop()
        return await _run_in_thread(asyncio.get_running_loop(), self._core.send, message, device_id)

    async def flush(self, timeout: float = 60.0) -> None:
        """Wait until the hub acknowledged every accepted message (TimeoutError otherwise)."""
        await _run_in_thread(asyncio.get_running_loop(), self._core.flush, timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the workers; unacknowledged messages stay in `pending_ids`."""
        await _run_in_thread(asyncio.get_running_loop(), self._core.close, timeout)

    def __enter__(self) -> None:
        raise TypeError("AsyncOutbox is an async context manager: use `async with`")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # pragma: no cover - __enter__ refuses
        pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.close()
