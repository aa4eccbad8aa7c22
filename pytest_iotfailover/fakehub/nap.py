"""The hub's nap: how long its thread waits after a busy wake-up so the next one takes more at once.

At device-like rates every message would otherwise be an event-loop wake-up of its own, each
paying the loop's and the hub's per-wake-up cost with cold caches. A short sleep after a loop
iteration that read device data lets the next poll return what several connections sent
meanwhile (bench/README.md, "Coalescing wake-ups", has the figures). fakehub/server.py takes the
nap; this module only resolves the setting.
"""
import math
import os

from .. import checks

NAP_ENV = "IOTFAILOVER_NAP"
# 5 ms: the shortest nap that took a material share off the hub's CPU per message at
# 2,000 msg/s over 100 connections (1 ms took nothing measurable); it adds at most that much to
# an acknowledgement, and only while messages arrive less than a nap apart
DEFAULT_NAP = 0.005
# a nap delays the hub's timers and service calls by as much: longer ones would change behaviour
MAX_NAP = 0.05


def resolve_nap(nap: float | None) -> float:
    """Seconds the hub naps; `nap` None means the IOTFAILOVER_NAP environment variable (seconds),
    then DEFAULT_NAP. 0 turns napping off."""
    if nap is not None:
        return checks.required_seconds("nap", nap, maximum=MAX_NAP)
    text = os.environ.get(NAP_ENV, "").strip()
    if not text:
        return DEFAULT_NAP
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid environment variable {NAP_ENV} {text!r}: expected a number of seconds "
                         f"from 0 to {MAX_NAP:g}") from None
    if not math.isfinite(value):
        raise ValueError(f"invalid environment variable {NAP_ENV} {text!r}: expected a finite number of seconds")
    return checks.required_seconds(f"environment variable {NAP_ENV}", value, maximum=MAX_NAP)
