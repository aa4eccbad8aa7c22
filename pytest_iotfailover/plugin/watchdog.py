"""The hard limit on a test that uses the hub, teardown included.

pytest-timeout cancels its timer as soon as a test's body fails (its `pytest_exception_interact`
hook does so for every failure, not only under --pdb), so a teardown that then blocks — an app's
`stop()` waiting on the SDK's `shutdown()`, say — would run with no limit and hang CI. The
watchdog is one thread per pytest process that watches the test in progress:

1. At the deadline it takes the stacks of every thread (`sys._current_frames`) and interrupts the
   thread running the test: with a signal when that is the main thread (blocking waits such as
   `Event.wait()`, `Thread.join()` and socket reads are interruptible by signals since PEP 475),
   else with `PyThreadState_SetAsyncExc`. The exception is a `pytest.fail` outcome carrying the
   stacks, so the test fails (or errors at teardown) and the run goes on with the next test.
2. If the test is still not over `grace` seconds later (another blocking finalizer), it does so
   again, up to `strikes` times.
3. If even that does not end the test (a thread stuck in C code that never returns to Python),
   it prints the stacks to the real stderr and ends the process with exit status 1. Under
   pytest-xdist that is a crashed worker, which xdist reports and replaces; without it the run
   ends — with the reason — instead of hanging until the CI job is killed.
"""
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

# A signal of its own, so neither pytest-timeout's SIGALRM nor an application's SIGUSR1 is
# disturbed. The handler is installed when the first hub test starts, only if nobody else has one
# for this signal, and stays until the run ends: a signal still in flight when a test finishes
# must find a handler that ignores it, not the default action (which ends the process).
SIGNAL: Any = getattr(signal, "SIGUSR2", None)

# "armed": an interruption was sent for the test in progress and not yet raised or withdrawn
_pending = {"message": "Timeout", "armed": False}


class HubTestTimeout(pytest.fail.Exception):  # type: ignore[name-defined]  # pytest's Failed, not public by name
    """Raised into the thread running a test that exceeded its hub limit.

    Built without arguments by PyThreadState_SetAsyncExc, hence the message from `_pending`."""

    def __init__(self, msg: str | None = None, pytrace: bool = True) -> None:
        super().__init__(msg if msg is not None else _pending["message"], pytrace)


def _signal_handler(signum, frame):
    __tracebackhide__ = True
    if _pending["armed"]:
        _pending["armed"] = False
        raise HubTestTimeout()


# pytest's and pluggy's own frames say nothing about where a test is stuck
_NOISE = ("/_pytest/", "/pluggy/", "<frozen runpy>", "/pytest/__main__.py", "/pytest_timeout.py")


def _frames(frame) -> str:
    entries = [e for e in traceback.extract_stack(frame)
               if not any(n in e.filename.replace("\\", "/") for n in _NOISE)]
    return "".join(traceback.format_list(entries)).rstrip()


def thread_stacks(skip_ident: int | None = None, test_ident: int | None = None) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    blocks = []
    for ident, frame in sorted(sys._current_frames().items(), key=lambda kv: kv[0] != test_ident):
        if ident == skip_ident:
            continue
        title = f"Thread {names.get(ident, ident)!s}" + (" (running the test)" if ident == test_ident else "")
        blocks.append(title + ":\n" + (_frames(frame) or "  (only pytest's own frames)"))
    return "\n\n".join(blocks)


class _Job:
    def __init__(self, nodeid: str, limit: float, covered: bool, ident: int, use_signal: bool):
        self.nodeid = nodeid
        self.limit = limit
        self.covered = covered          # pytest-timeout's timer is still running for this test
        self.ident = ident
        self.use_signal = use_signal
        self.started = time.monotonic()
        self.deadline = self.started + limit
        self.phase = "setup"
        self.strikes = 0


class Watchdog:
    def __init__(self, grace: float = 10.0, strikes: int = 3,
                 last_resort: Callable[[str], None] | None = None):
        self.grace = grace
        self.strikes = strikes
        self._last_resort = last_resort or _exit_process
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._previous_handler: Any = None
        self._installed = False

    # --- called from the thread running the tests --------------------------------------------

    def arm(self, nodeid: str, limit: float, covered_by_pytest_timeout: bool) -> None:
        ident = threading.get_ident()
        use_signal = False
        if SIGNAL is not None and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(SIGNAL)
            if current is _signal_handler:
                use_signal = True
            elif current in (signal.SIG_DFL, signal.SIG_IGN, None) and not self._installed:
                self._previous_handler = current
                signal.signal(SIGNAL, _signal_handler)
                self._installed = use_signal = True
        job = _Job(nodeid, limit, covered_by_pytest_timeout, ident, use_signal)
        if covered_by_pytest_timeout:
            # pytest-timeout fires first and says so in its own words; this is the backstop
            job.deadline += self.grace
        with self._cond:
            self._job = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iotfailover-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def phase(self, name: str) -> None:
        with self._cond:
            if self._job is not None:
                self._job.phase = name

    def failed(self) -> None:
        """The test just failed, so pytest-timeout no longer watches it: hold it to its own limit
        (or, if the limit is already spent, give its teardown `grace` seconds)."""
        with self._cond:
            job = self._job
            if job is None or not job.covered:
                return
            job.covered = False
            own = job.started + job.limit
            job.deadline = own if own > time.monotonic() else time.monotonic() + self.grace
            self._cond.notify_all()

    def disarm(self) -> None:
        with self._cond:
            job, self._job = self._job, None
            _pending["armed"] = False
            self._cond.notify_all()
        if job is not None and job.strikes and not job.use_signal:
            # withdraw an asynchronous exception not yet delivered: it must not land in pytest itself
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(job.ident), None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._job = None
            _pending["armed"] = False
            self._cond.notify_all()
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(SIGNAL, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL)
            self._installed = False

    # --- the watchdog thread -------------------------------------------------------------------

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                job = self._job
                if job is None:
                    self._cond.wait()
                    continue
                left = job.deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                job.strikes += 1
                message = self._message(job)
                if job.strikes > self.strikes:
                    self._job = None
                    self._cond.release()
                    try:
                        self._last_resort(message + "\n\nthe test did not stop when interrupted "
                                          f"{self.strikes} times; ending the process")
                    finally:
                        self._cond.acquire()
                    continue
                # a short limit gets a short grace too, else a 2 s test could linger for 30 s
                job.deadline = time.monotonic() + min(self.grace, max(2.0, job.limit / 3))
                _pending["message"] = message
                _pending["armed"] = True
                self._interrupt(job)

    def _message(self, job: _Job) -> str:
        stacks = thread_stacks(skip_ident=threading.get_ident(), test_ident=job.ident)
        where = {"setup": "in setup", "call": "in the test body", "teardown": "in teardown"}.get(job.phase, "")
        again = f" (still stuck, interruption {job.strikes})" if job.strikes > 1 else ""
        return (f"Timeout (>{job.limit:g}s): {job.nodeid} uses the IoT hub, whose tests must finish — setup, "
                f"body and teardown together — within {job.limit:g} s; it was stuck {where}{again}. "
                f"Stacks of the threads at that moment:\n\n{stacks}")

    @staticmethod
    def _interrupt(job: _Job) -> None:
        if job.use_signal:
            signal.pthread_kill(job.ident, SIGNAL)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(job.ident), ctypes.py_object(HubTestTimeout))


def _exit_process(message: str) -> None:
    try:
        if sys.__stderr__ is not None:  # None only in an embedded interpreter without a console
            sys.__stderr__.write("\n[iothub] " + message + "\n")
            sys.__stderr__.flush()
    finally:
        os._exit(1)
