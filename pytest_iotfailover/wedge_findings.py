"""The process-wide list of device clients found dead while they claimed to be connected.

A leaf module (standard library only): `devices.wedge` records findings here, and the hub's
recovery report reads them without depending on the device side or the SDK.
"""
from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = ["Wedge", "findings", "note_once", "record"]

_FINDINGS_KEPT = 1000
_lock = threading.Lock()
_noted: weakref.WeakSet[Any] = weakref.WeakSet()  # dead threads already recorded


class Wedge(NamedTuple):
    """One client found dead while it claimed to be connected."""
    device_id: str
    at: float                 # time.time() when it was noticed
    died_at: float | None  # when its network thread ended, if known
    error: str | None      # the exception that ended it, if known
    text: str                 # "dev-7: the SDK's network thread died at 12:00:03.2 (SSLEOFError); ..."

    def __str__(self) -> str:
        return self.text


_findings: collections.deque[Wedge] = collections.deque(maxlen=_FINDINGS_KEPT)


def note_once(thread: Any, wedge: Wedge) -> Wedge:
    """Record `wedge` once per dead network thread."""
    with _lock:
        if thread in _noted:
            return wedge
        _noted.add(thread)
        _findings.append(wedge)
    return wedge


def record(wedge: Wedge) -> Wedge:
    with _lock:
        _findings.append(wedge)
    return wedge


def findings(device_ids: Iterable[str] | None = None, since: float = 0.0) -> list[Wedge]:
    """Wedged clients noticed at or after `since` (time.time()), optionally for some devices."""
    wanted = None if device_ids is None else set(device_ids)
    with _lock:
        return [w for w in _findings if w.at >= since and (wanted is None or w.device_id in wanted)]


