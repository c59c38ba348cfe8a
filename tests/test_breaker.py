"""The circuit breaker shared by the LDAP directory and the upstream identity server."""

from __future__ import annotations

import logging

import pytest

from kith.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_lets_one_trial_through_per_cooldown(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kith.breaker")
    clock = Clock()
    breaker = CircuitBreaker("the dependency", threshold=3, cooldown_s=30, clock=clock)
    assert not breaker.failed("refused") and not breaker.failed("refused")
    assert breaker.allow() and not breaker.is_open
    assert breaker.failed("timed out")  # the third in a row opens it
    assert breaker.is_open and not breaker.allow()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one per cool-down, even if never reported
    clock.now += 30
    assert breaker.allow()
    assert not breaker.failed("timed out")  # a failed trial: still open, nothing said
    assert not breaker.allow()
    clock.now += 30
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow()
    breaker.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "the dependency failed 3 times in a row (timed out); not asked again until it "
        "answers (tried once every 30 s)",
        "the dependency answers again"]


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker("x", threshold=2, cooldown_s=1, clock=Clock())
    breaker.failed("a")
    breaker.succeeded()
    assert not breaker.failed("b")
    assert breaker.failed("c")


def test_threshold_one_opens_at_the_first_failure(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("LDAP directory", threshold=1, cooldown_s=10, clock=Clock())
    assert breaker.failed("no answer within 3 s")
    assert caplog.records[0].getMessage().startswith(
        "LDAP directory failed (no answer within 3 s); not asked again")


@pytest.mark.parametrize(("threshold", "cooldown_s"), [(0, 1.0), (1, 0.0)])
def test_nonsense_settings_are_refused(threshold: int, cooldown_s: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", threshold=threshold, cooldown_s=cooldown_s)
