"""Call a blocking function on a daemon thread, so that the caller can stop waiting for it.

The SDK's calls (connect, shutdown, send_message, setting a handler) can block without end when a
connection is wedged, and none of them can be cancelled. The call is left running on its own
daemon thread and the caller waits for it with a deadline; a call abandoned that way may still
finish later, which is why callers must treat an abandoned send as "may have been delivered".

A leaf module (standard library only) used by every layer that drives device clients.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Call", "call_with_deadline"]


class Call:
    """`fn()` running on a daemon thread named `name`; `on_done(call)` runs on that thread when it
    ends (with the result or the error already set), e.g. to notify a condition."""

    def __init__(self, fn: Callable[[], Any], name: str,
                 on_done: Callable[[Call], None] | None = None):
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn: Callable[[], Any] | None = fn
        self._on_done = on_done
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        fn = self._fn
        try:
            if fn is not None:
                self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self._fn = None  # an abandoned call must not keep its arguments alive
            self.done.set()
            if self._on_done is not None:
                self._on_done(self)

    def wait(self, timeout: float | None) -> bool:
        return self.done.wait(timeout)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def call_with_deadline(fn: Callable[[], Any], timeout: float, what: str, *,
                       name: str | None = None) -> Any:
    """`fn()`'s result (or its exception); TimeoutError naming `what` if it has not returned within
    `timeout` seconds (the call keeps running in the background)."""
    call = Call(fn, name or f"iotfailover:{what}")
    if not call.wait(timeout):
        raise TimeoutError(f"{what} did not finish within {timeout:g} s")
    return call.outcome()
