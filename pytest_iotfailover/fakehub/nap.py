"""The hub's nap: how long its thread waits after a busy wake-up so the next one takes more at once.

At device-like rates every message would otherwise be an event-loop wake-up of its own, each
paying the loop's and the hub's per-wake-up cost with cold caches. A short sleep after a loop
iteration that read device data lets the next poll return what several connections sent
meanwhile (bench/README.md, "Coalescing wake-ups", has the figures). fakehub/server.py takes the
nap; this module resolves the setting and decides when (wants_nap).
"""
import math
import os

from .. import checks

NAP_ENV = "IOTFAILOVER_NAP"
# 20 ms, the longest nap (nap_for): amid many senders at 2,000 msg/s it took the hub's CPU per
# message from about 2x mosquitto's (a flat 5 ms nap) to 1.1-1.5x (bench/README.md, "A longer nap
# where it gathers more"). It holds an acknowledgement up to that long, and only while several
# connections send less than half a nap apart: PUBACKs then took 15-19 ms (median) and 27-33 ms
# (99th percentile) at 2,000 msg/s, against 5-6 and 9-10 ms at 5 ms. A real hub is slower still:
# a send takes a network round trip to the hub's region, and users of the Python SDK report
# 130-300 ms per send_message (Azure/azure-iot-sdk-python#1155); its latency is not documented.
DEFAULT_NAP = 0.020
# connections whose data one loop iteration read for the whole nap to apply (nap_for)
NAP_FULL_AT = 8
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


# seconds after the last new connection before the hub naps again: a device's way in (TLS,
# CONNECT, subscriptions, twin) is a chain of round trips, and a nap in each made 100 devices take
# three times as long to come back after a failover (bench/README.md)
STORM_QUIET = 1.0


def nap_for(nap: float, connections: int) -> float:
    """How long to nap after a loop iteration that read data from `connections` connections: `nap`
    from NAP_FULL_AT of them, a share of it below. What a nap saves is the wake-ups of the messages
    it gathers. Devices that each wait on their PUBACK send once per nap whatever its length, so
    amid two of them a long nap gathers no more than a short one and only slows them; amid many
    devices a long one gathers from all of them (two SDK clients: 173 messages a second each at a
    5 ms nap, 48 at 20 ms)."""
    return nap * min(1.0, max(connections, 1) / NAP_FULL_AT)


def wants_nap(nap: float, mixed: bool, since_check: float, since_open: float) -> bool:
    """Whether the hub thread naps now, after a loop iteration that read device data.

    `mixed`: more than one connection sent since the last check. A lone sender waits on each
    acknowledgement before it sends again, so a nap would only hold it (100 messages of one
    Outbox took 0.75-1.5 s longer). `since_check`: seconds since the last check (or nap): only
    under half a nap, so a lone message after a quiet spell is never held, and neither is a hub
    whose work between polls takes that long, as under saturation (it batches by itself, and a
    nap would only cost it throughput). `since_open`: seconds since the last new connection (see
    STORM_QUIET).
    """
    return mixed and since_check < nap / 2 and since_open > STORM_QUIET
