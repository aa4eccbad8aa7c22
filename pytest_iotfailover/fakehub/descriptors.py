"""Running out of file descriptors: a resource limit of the machine, not a hub bug.

At start the soft limit is raised to the hard one (`raise_fd_limit`). When accept() fails anyway,
asyncio's accept loop leaves the waiting connections in the listen backlog and retries a second
later, so a device would sit in its TLS handshake until a descriptor frees, possibly for ever.
`AcceptGuard` keeps one descriptor in reserve instead: on a failed accept it gives the reserve up,
accepts each waiting connection and closes it at once (the device sees a reset and retries, as it
does for any refused connection), then takes the reserve back. Connected devices keep being served
throughout. The same trick is libuv's (`uv__emfile_trick`), which is why uvloop needs no help.
"""
import asyncio
import asyncio.selector_events
import errno
import logging
import os
import socket
import struct
import time
from typing import Any, Protocol

resource: Any
try:
    import resource
except ImportError:  # Windows
    resource = None

__all__ = ["ACCEPT_ERRNOS", "ACCEPT_WARNING_EVERY", "AcceptGuard", "Reserve", "raise_fd_limit"]

# asyncio retries a failed accept() itself (after a second) and tells the loop's exception
# handler each time: one warning per this many seconds is enough to see a descriptor shortage
ACCEPT_WARNING_EVERY = 10.0
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# at most the listen backlog (server.py) per failed accept, so one call cannot run for ever
_REFUSE_AT_MOST = 4096
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, keeps no TIME_WAIT

_log = logging.getLogger("pytest_iotfailover.fakehub")


class _EventSink(Protocol):
    def add(self, kind: str, device_id: str | None = None, **detail: Any) -> Any: ...


def raise_fd_limit() -> int | None:
    """Raise the soft limit on open descriptors to the hard one; the soft limit now, or None.

    The usual soft limit of 1,024 stops a hub at about a thousand connections, far below what the
    hard limit allows. Where the hard limit is "unlimited" (macOS), the kernel still refuses more
    than its own per-process maximum, so smaller figures are tried in turn.
    """
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return soft
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    targets += [n for n in (1_048_576, 65_536, 10_240) if hard == resource.RLIM_INFINITY or n < hard]
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _soft_limit() -> int | None:
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


class Reserve:
    """One descriptor held back, to be given up for refusing a connection when none is left."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def take(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._fd = None  # still short: the next refusal tries again

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refuse(self, listener: socket.socket, at_most: int = _REFUSE_AT_MOST, retake: bool = True) -> int:
        """Give the reserve up, accept and reset up to `at_most` waiting connections, and (with
        `retake`) take the reserve back; how many were refused."""
        self.close()
        refused = 0
        blocking = listener.getblocking()
        try:
            listener.setblocking(False)
            while refused < at_most:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # another thread took the freed descriptor: the next failure tries again
                refused += 1
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
                conn.close()
        finally:
            if blocking:
                listener.setblocking(True)
            if retake:
                self.take()
        return refused


class AcceptGuard:
    """Called with each failed accept's OSError: refuses the connections waiting in the backlog and
    warns (an `accept_failed` event and a logging warning) at most once per ACCEPT_WARNING_EVERY s,
    counting the failures and refusals since the last warning.

    uvloop never reports a failed accept (libuv refuses the waiting connections itself), so on any
    loop but asyncio's own the guard instead looks once per PROBE_EVERY s whether a descriptor can
    still be opened, and warns the same way when none can."""

    PROBE_EVERY = 1.0

    def __init__(self, log: _EventSink):
        self._log = log
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._reserve = Reserve()
        self._warned_at: float | None = None
        self._failures = 0
        self._refused: int | None = 0

    def arm(self, listener: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Watch `listener`, the non-blocking socket `loop` accepts on (call on the loop's thread)."""
        self._listener = listener
        self._loop = loop
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            self._reserve.take()
        else:
            self._refused = None  # libuv does not say how many it refused
            self._probe = loop.call_later(self.PROBE_EVERY, self._check)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._reserve.close()
        self._listener = self._loop = None

    def refuse_waiting(self) -> int:
        """Accept and reset each connection waiting on the listener; how many."""
        if self._listener is None or self._loop is None:
            return 0
        refused = self._reserve.refuse(self._listener, retake=False)
        # retaken once asyncio's accept loop has returned: retaken at once, each further accept()
        # in that loop would fail with EMFILE again even on an empty backlog (Linux allocates the
        # descriptor first), and asyncio would call the exception handler and schedule one more
        # retry for each, up to 100 times per wake-up
        self._loop.call_soon(self._reserve.take)
        return refused

    def _check(self) -> None:
        if self._loop is None:
            return
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._warn(exc)
        self._probe = self._loop.call_later(self.PROBE_EVERY, self._check)

    def __call__(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refused is not None:
            self._refused += self.refuse_waiting()
        self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < ACCEPT_WARNING_EVERY:
            return
        self._warned_at = now
        name = errno.errorcode.get(exc.errno or 0, exc.errno)
        limit = _soft_limit()
        refused = "" if self._refused is None else f"; {self._refused} connections refused"
        self._log.add("accept_failed", None, message=f"{type(exc).__name__}: {exc}", failures=self._failures,
                      errno=name, refused=self._refused, fd_limit=limit)
        _log.warning("out of descriptors, new connections are refused: %s (%s; open file limit %s); "
                     "%d times since the last warning%s; connected devices are still served "
                     "(at most one warning per %g s)", name, exc.strerror or exc, limit, self._failures,
                     refused, ACCEPT_WARNING_EVERY)
        self._failures = 0
        if self._refused is not None:
            self._refused = 0
