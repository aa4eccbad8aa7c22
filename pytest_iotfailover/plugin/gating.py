"""Whether a run or a test needs the CI gate (plugin/gate.py), decided without importing it.

The gate's machinery (entries, SLO verdicts, baselines, the timeline) is imported on first use:
only a run with --iothub-slo, --iothub-report, --iothub-html or --iothub-baseline, or a test whose
failover marker sets `slo=`, needs it.
"""
from __future__ import annotations

from typing import Any


def wanted(settings: Any) -> bool:
    return bool(settings.slo or settings.report or settings.html or settings.baseline)


def needed(item: Any, settings: Any) -> bool:
    """The test gets an entry: the run gates or reports, or its own marker sets objectives."""
    marker = item.get_closest_marker("failover")
    return wanted(settings) or (marker is not None and marker.kwargs.get("slo") is not None)
