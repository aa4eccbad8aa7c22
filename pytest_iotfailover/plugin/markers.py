"""The plugin's markers: their registration and the check of `@pytest.mark.failover(...)`."""
from __future__ import annotations

from typing import Any

MARKER_KEYWORDS = ("outage", "timeout", "slo")


def register(config: Any) -> None:
    config.addinivalue_line(
        "markers", "failover(outage=None, timeout=None, slo=None): a test that fails the hub over; outage is "
        "the default outage of failover() in seconds, timeout its limit (default --iothub-timeout), slo "
        "its recovery objectives over --iothub-slo's, key by key")
    if not config.pluginmanager.has_plugin("timeout"):
        # -p no:timeout: the watchdog still reads @pytest.mark.timeout, and --strict-markers must
        # not reject suites written for pytest-timeout
        config.addinivalue_line(
            "markers", "timeout(seconds): limit of a test that uses the IoT hub (pytest-timeout is disabled)")
    config.addinivalue_line(
        "markers", "real_hub: needs a real IoT Hub (--iothub-connection); skipped on the embedded hub")


def check_marker(marker: Any) -> str | None:
    """What is wrong with a `@pytest.mark.failover(...)` as written, or None."""
    written = "@pytest.mark.failover(" + ", ".join(
        [repr(a) for a in marker.args] + [f"{k}={v!r}" for k, v in marker.kwargs.items()]) + ")"
    usage = "@pytest.mark.failover(outage=SECONDS, timeout=SECONDS, slo='recover<=10s, ...')"
    if marker.args:
        return f"{written}: the failover marker takes keywords only: {usage}"
    unknown = [k for k in marker.kwargs if k not in MARKER_KEYWORDS]
    if unknown:
        return f"{written}: unknown keyword {unknown[0]!r}; the failover marker takes {usage}"
    from ..checks import is_number  # the collection of a marked test, not the plugin's load
    outage = marker.kwargs.get("outage")
    if outage is not None and not (is_number(outage) and outage >= 0):
        return f"{written}: outage must be a non-negative number of seconds, got {outage!r}"
    timeout = marker.kwargs.get("timeout")
    if timeout is not None and not (is_number(timeout) and timeout > 0):
        return f"{written}: timeout must be a positive number of seconds (the test's limit), got {timeout!r}"
    slo = marker.kwargs.get("slo")
    if slo is not None:
        from ..testing.slo import SloSyntaxError, parse_objectives
        try:
            parse_objectives(slo, f"{written}: slo")
        except SloSyntaxError as exc:
            return str(exc)
    return None


def marker_objectives(marker: Any) -> Any:
    """The objectives of a checked failover marker (testing.slo.Objectives), None without slo=."""
    slo = marker.kwargs.get("slo") if marker is not None else None
    if slo is None:
        return None
    from ..testing.slo import parse_objectives
    return parse_objectives(slo, "@pytest.mark.failover(slo=...)")


def marker_timeout(marker: Any) -> float | None:
    """A timeout marker's seconds; None for none (0, negative, or not a number: pytest-timeout
    reports its own marker's mistakes)."""
    value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 and seconds != float("inf") else None
