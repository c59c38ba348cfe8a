"""Fuzzing reports: lines a test records here are printed in pytest's closing summary,
so a passing run still shows its seed and figures."""

from __future__ import annotations

import pytest

_REPORT_LINES = pytest.StashKey[list[str]]()


@pytest.fixture
def summary_lines(request: pytest.FixtureRequest) -> list[str]:
    return request.config.stash.setdefault(_REPORT_LINES, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_REPORT_LINES, [])
    if lines:
        terminalreporter.section("spec fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
