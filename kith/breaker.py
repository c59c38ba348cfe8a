"""A circuit breaker: after a dependency fails, callers stop waiting for it.

Closed, every call goes.  After `threshold` failures in a row it opens: calls are
refused, except one trial per `cooldown_s` (the caller decides what a trial is: the
call itself, or a cheap probe in the background).  The first success closes it.  It
says one line when it opens and one when it closes, never one per refused call.

It imports nothing from kith, so any room (sources, delivery, federation) can use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

_log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, name: str, *, threshold: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None,
                 on_state: Callable[[bool], None] | None = None) -> None:
        """`on_state(is_open)` is told the state now and at every change (a gauge)."""
        if threshold < 1 or cooldown_s <= 0:
            raise ValueError("a breaker needs threshold >= 1 and cooldown_s > 0")
        self.name = name
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._log = logger or _log
        self._failures = 0
        self._is_open = False
        self._next_trial = 0.0
        self._on_state = on_state or (lambda _is_open: None)
        self._on_state(False)

    @property
    def is_open(self) -> bool:
        return self._is_open

    def allow(self) -> bool:
        """Whether a call may go now: always when closed; when open, once per cool-down.

        A trial whose outcome is never reported (a cancelled caller) does not hold the
        breaker open for ever: the next one is allowed a cool-down later."""
        if not self._is_open:
            return True
        now = self._clock()
        if now < self._next_trial:
            return False
        self._next_trial = now + self.cooldown_s
        return True

    def succeeded(self) -> None:
        self._failures = 0
        if self._is_open:
            self._is_open = False
            self._on_state(False)
            self._log.info("%s answers again", self.name)

    def failed(self, reason: str) -> bool:
        """Count a failure; True if this one opened the breaker."""
        self._next_trial = self._clock() + self.cooldown_s
        if self._is_open:
            return False
        self._failures += 1
        if self._failures < self.threshold:
            return False
        self._is_open = True
        self._on_state(True)
        self._failures = 0
        in_a_row = f" {self.threshold} times in a row" if self.threshold > 1 else ""
        self._log.warning("%s failed%s (%s); not asked again until it answers (tried "
                          "once every %g s)", self.name, in_a_row, reason, self.cooldown_s)
        return True
