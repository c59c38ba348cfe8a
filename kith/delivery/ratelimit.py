"""Sydent's leaky-bucket rate limiter: cheap, in memory, keyed by any string.

Each hit adds 1 to the key's bucket and is refused when the bucket already holds
`burst`; every 1/rate_hz seconds a bucket loses 1.  Sydent drains all buckets on one
global tick; kith drains each bucket from its own first hit, which is the same rate
without a timer task.  Empty buckets are forgotten, so memory follows the keys seen
in the last burst/rate_hz seconds, not all keys ever seen.

Refusals raise `RateLimited`, a MatrixError (429 M_LIMIT_EXCEEDED with
`retry_after_ms`), so the API layer answers them without a translation step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from kith.errors import M_LIMIT_EXCEEDED, MatrixError

_MIN_SWEEP_SIZE = 1024


class RateLimited(MatrixError):
    """Too many hits for one key: 429 M_LIMIT_EXCEEDED, with `retry_after_ms`."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(429, M_LIMIT_EXCEEDED, "Too many requests, try again later",
                         retry_after_ms=math.ceil(retry_after_s * 1000))


@dataclass
class _Bucket:
    level: int
    drained_at: float  # when the bucket last lost (or started losing) a unit


class RateLimiter:
    """`hit(key)` raises RateLimited when `key` used up its burst; else counts the hit."""

    def __init__(self, burst: int, rate_hz: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or not rate_hz > 0:
            raise ValueError("burst must be at least 1 and rate_hz positive")
        self.burst = burst
        self.period_s = 1.0 / rate_hz
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._sweep_at = _MIN_SWEEP_SIZE

    def __len__(self) -> int:
        """Buckets held in memory (some may have drained since the last sweep)."""
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        """Whether a bucket for `key` is held in memory."""
        return key in self._buckets

    def hit(self, key: str) -> None:
        """Count one request for `key`, or raise RateLimited (counting nothing)."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(1, now)
            self._maybe_sweep(now)
            return
        self._drain(bucket, now)
        if bucket.level >= self.burst:
            raise RateLimited(bucket.drained_at + self.period_s - now)
        if bucket.level == 0:
            bucket.drained_at = now
        bucket.level += 1

    def _drain(self, bucket: _Bucket, now: float) -> None:
        units = int((now - bucket.drained_at) // self.period_s)
        if units > 0:
            bucket.level = max(0, bucket.level - units)
            bucket.drained_at += units * self.period_s

    def _maybe_sweep(self, now: float) -> None:
        """Forget empty buckets once the map doubles: amortised O(1) per hit."""
        if len(self._buckets) < self._sweep_at:
            return
        for key, bucket in list(self._buckets.items()):
            self._drain(bucket, now)
            if bucket.level == 0:
                del self._buckets[key]
        self._sweep_at = max(_MIN_SWEEP_SIZE, 2 * len(self._buckets))
