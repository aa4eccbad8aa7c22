"""The one retry delay of the device side: exponential growth with jitter, capped.

    delay(attempt) = min(max, min + delta * (2**attempt - 1) * uniform(1 - JITTER, 1 + JITTER))

`attempt` counts the failed tries so far, so the first retry comes `min` after the failure. Only
the exponential part is jittered (by +-20 %), so that devices that failed together spread out
without any delay dropping below `min`: IoT Hub's reconnection guidance asks for exponential
back-off with jitter, since mass reconnects overload a scale unit (MicrosoftDocs
`concepts-manage-device-reconnections.md`). The defaults (100 ms min, 10 s max, 100 ms delta, and
the 4 min operation timeout callers pair with them) are the project's, from DESIGN.md ("Pooled and
non-pooled clients").
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import checks

__all__ = ["DELTA_BACKOFF", "MAX_BACKOFF", "MIN_BACKOFF", "OPERATION_TIMEOUT", "Backoff"]

MIN_BACKOFF = 0.1
MAX_BACKOFF = 10.0
DELTA_BACKOFF = 0.1
OPERATION_TIMEOUT = 240.0
JITTER = 0.2
_MAX_EXPONENT = 60  # 2**1000 does not fit a float; the cap is reached long before anyway


@dataclass(frozen=True)
class Backoff:
    min: float = MIN_BACKOFF
    max: float = MAX_BACKOFF
    delta: float = DELTA_BACKOFF

    @classmethod
    def checked(cls, min_backoff: Any = MIN_BACKOFF, max_backoff: Any = MAX_BACKOFF,
                delta_backoff: Any = DELTA_BACKOFF) -> Backoff:
        """A Backoff from caller-given arguments, each checked and named when wrong."""
        low = checks.required_seconds("min_backoff", min_backoff)
        high = checks.required_seconds("max_backoff", max_backoff)
        if high < low:
            raise ValueError(f"max_backoff ({max_backoff!r}) must not be less than min_backoff ({min_backoff!r})")
        return cls(low, high, checks.required_seconds("delta_backoff", delta_backoff))

    def delay(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        growth = 2 ** min(max(attempt, 0), _MAX_EXPONENT) - 1
        return min(self.max, self.min + self.delta * growth * uniform(1 - JITTER, 1 + JITTER))
