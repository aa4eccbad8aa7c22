"""What the plugin keeps on pytest's objects (`config.stash`, `item.stash`), in one place."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..testing.view import HubView
    from .options import Settings
    from .reporting import TestRecord
    from .watchdog import Watchdog

SETTINGS: pytest.StashKey[Settings] = pytest.StashKey()
WATCHDOG: pytest.StashKey[Watchdog] = pytest.StashKey()
# (seconds, covered by pytest-timeout) of a test that uses the hub
LIMIT: pytest.StashKey[tuple[float, bool]] = pytest.StashKey()
# the test's HubView, to end its faults first thing at teardown
VIEW: pytest.StashKey[HubView] = pytest.StashKey()
# what the test did to the hub and what got through: from setup to the end of teardown
RECORD: pytest.StashKey[TestRecord] = pytest.StashKey()
# the --iothub-baseline report, read once (None without one)
BASELINE: pytest.StashKey[Any] = pytest.StashKey()
# the user property carrying a test's figures to the terminal summary (and junit XML, pytest-xdist)
PROPERTY = "iothub_failover"


def settings_of(config: Any) -> Settings:
    return config.stash[SETTINGS]


def record_of(node: Any) -> TestRecord | None:
    """The record of the test `node` is (None for a node that is not a running test)."""
    stash = getattr(node, "stash", None)
    return stash.get(RECORD, None) if stash is not None else None
