"""The leaky-bucket limiter, driven by an injected clock."""

from __future__ import annotations

import pytest

from kith.delivery.ratelimit import RateLimited, RateLimiter
from kith.errors import M_LIMIT_EXCEEDED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=3, rate_hz=1 / 10, clock=clock)
    for _ in range(3):
        limiter.hit("alice")
    with pytest.raises(RateLimited) as raised:
        limiter.hit("alice")
    error = raised.value
    assert (error.status, error.errcode) == (429, M_LIMIT_EXCEEDED)
    assert error.to_json()["retry_after_ms"] == 10_000
    limiter.hit("bob")  # other keys have their own bucket


def test_drains_one_per_period() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=2, rate_hz=1 / 10, clock=clock)
    limiter.hit("k")
    limiter.hit("k")
    clock.now += 9.9
    with pytest.raises(RateLimited) as raised:
        limiter.hit("k")
    assert raised.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1  # one period: one unit drained
    limiter.hit("k")
    with pytest.raises(RateLimited):
        limiter.hit("k")
    clock.now += 25  # 2.5 periods: two more units
    limiter.hit("k")
    limiter.hit("k")
    with pytest.raises(RateLimited):
        limiter.hit("k")


def test_refused_hits_are_not_counted() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=1, rate_hz=1, clock=clock)
    limiter.hit("k")
    for _ in range(100):
        with pytest.raises(RateLimited):
            limiter.hit("k")
    clock.now += 1
    limiter.hit("k")


def test_a_long_idle_bucket_starts_afresh() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=2, rate_hz=1, clock=clock)
    limiter.hit("k")
    clock.now += 1000
    limiter.hit("k")
    limiter.hit("k")
    with pytest.raises(RateLimited):
        limiter.hit("k")


def test_drained_buckets_are_dropped() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=5, rate_hz=1, clock=clock)
    for i in range(1500):
        limiter.hit(f"old-{i}")
    clock.now += 2  # every old bucket has drained
    for i in range(3000):
        limiter.hit(f"new-{i}")
    assert len(limiter) < 3000 + 1024
    assert not any(f"old-{i}" in limiter for i in range(1500))
    assert "new-2999" in limiter


def test_live_buckets_survive_a_sweep() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=1, rate_hz=1 / 60, clock=clock)
    limiter.hit("busy")
    for i in range(5000):
        limiter.hit(f"k{i}")
    with pytest.raises(RateLimited):
        limiter.hit("busy")


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RateLimiter(burst=0, rate_hz=1)
    with pytest.raises(ValueError):
        RateLimiter(burst=1, rate_hz=0)
