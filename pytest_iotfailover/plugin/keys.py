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


def settings_of(config: Any) -> Settings:
    return config.stash[SETTINGS]
