"""Argument checks shared by every layer: one wording for every "must be" error.

Standard library only, so the sans-IO protocol layer may use it too. Each check returns the value in
its canonical type (seconds as float) or raises TypeError / ValueError naming the argument and
showing what was given.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")


def is_number(value: Any) -> bool:
    """A finite int or float; bool is not a number here (True would pass as 1 s otherwise)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seconds(name: str, value: Any, *, positive: bool = False, allow_none: bool = False,
            maximum: float | None = None) -> float | None:
    """A duration in seconds: a finite number, >= 0 (> 0 with positive=True)."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} is required: a number of seconds")
    if not is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number of "
                         f"seconds, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} s, got {value!r}")
    return float(value)


def required_seconds(name: str, value: Any, *, positive: bool = False, maximum: float | None = None) -> float:
    out = seconds(name, value, positive=positive, maximum=maximum)
    assert out is not None
    return out


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    out = integer(name, value, minimum=1)
    assert out is not None
    return out


def number(name: str, value: Any, *, positive: bool = False) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value: T, choices: Collection[T]) -> T:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def text(name: str, value: Any, *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    return value
