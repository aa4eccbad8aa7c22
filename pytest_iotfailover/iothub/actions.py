"""What the hub core asks its driver to do. The core never performs I/O; it returns these.

A driver (fakehub/server.py, or a test with a fake clock) executes them in order: `Send` writes
bytes to a connection, `Close` closes it gracefully (unsent output first), `Reset` aborts it (a
TCP reset), `Pause` stops (on) or resumes (off) reading and writing a connection while keeping
the socket open, `Timer` arms `key` for wall-clock `deadline` (None cancels it) and `Reply`
hands a service call its answer. A fired timer goes back as `IoTHubCore.timer_fired(key, now)`.
"""
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Send:
    conn: Any
    data: bytes


@dataclass(frozen=True)
class Close:
    conn: Any


@dataclass(frozen=True)
class Reset:
    conn: Any


@dataclass(frozen=True)
class Pause:
    conn: Any
    on: bool


@dataclass(frozen=True)
class Timer:
    key: Hashable
    deadline: float | None


@dataclass(frozen=True)
class Reply:
    notify: Callable[[Any], None]
    response: Any


Action = Any  # one of the classes above
