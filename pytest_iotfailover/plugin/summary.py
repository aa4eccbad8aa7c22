"""The "iothub failover" section at the end of the terminal report."""
from __future__ import annotations

import json
from typing import Any

import pytest

from . import reporting


class Summary:
    """One per pytest run (pytester runs nest): collects the figures tests left in user_properties,
    which also carries them over from pytest-xdist workers."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []
        self.outcomes: dict[str, str] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # the Outboxes as the test left them, before the fixtures' finalizers close theirs: a message
        # still being retried then is "pending", not "given up" by the fixture's close()
        record = reporting.record_of(item)
        if record is not None and record.outboxes_wanted():
            record.outbox_snapshots()

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            xfail = hasattr(report, "wasxfail")
            self.outcomes[report.nodeid] = ({"skipped": "xfailed", "passed": "xpassed"}.get(report.outcome, "?")
                                            if xfail else report.outcome)
        if report.when == "teardown":
            if report.outcome == "failed" and self.outcomes.get(report.nodeid) == "passed":
                self.outcomes[report.nodeid] = "error"  # its teardown failed: a broken SLO, a regression
            for name, value in report.user_properties:
                if name == reporting.PROPERTY and json.loads(value).get("faults"):
                    self.rows.append((report.nodeid, self.outcomes.get(report.nodeid, "?"), json.loads(value)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.rows:
            terminalreporter.write_sep("=", "iothub failover")
            for line in reporting.summary_lines(self.rows):
                terminalreporter.write_line(line)
