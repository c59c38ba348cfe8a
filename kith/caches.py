"""What a source answered, positive or negative, kept for a while.

Every cache in kith is a cachetools cache (TTLCache when all entries live equally long,
TLRUCache when each entry says how long it lives): bounded, the least recently used
entry dropped first when full, never everything at once (which would send a burst of
queries to whatever the cache protects).  This module holds the one shape two sources
share: an answer per key, where "nobody" (None) is an answer worth remembering too,
often for less time than a positive one.

It imports nothing from kith, so any room can use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

from cachetools import TLRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_ANSWERS = 100_000


class AnswerCache(Generic[K, V]):
    """Answers per key: a value for `ttl_s`, None ("nobody") for `negative_ttl_s`."""

    def __init__(self, ttl_s: float, negative_ttl_s: float, *, maxsize: int = MAX_ANSWERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._answers: TLRUCache[K, V | None] = TLRUCache(maxsize, self._expires, clock)

    def __len__(self) -> int:
        return len(self._answers)

    def split(self, keys: Iterable[K]) -> tuple[dict[K, V], list[K]]:
        """The positive answers held for `keys`, and the keys with no answer held."""
        found: dict[K, V] = {}
        missing: list[K] = []
        with self._answers.timer:  # one clock reading for the whole batch
            for key in keys:
                try:
                    answer = self._answers[key]
                except KeyError:
                    missing.append(key)
                    continue
                if answer is not None:
                    found[key] = answer
        return found, missing

    def remember(self, asked: Iterable[K], answers: Mapping[K, V]) -> None:
        """Hold the answer for each key asked: its value in `answers`, else None."""
        with self._answers.timer:
            for key in asked:
                self._answers[key] = answers.get(key)

    def clear(self) -> None:
        self._answers.clear()

    def _expires(self, _key: K, answer: V | None, now: float) -> float:
        return now + (self.ttl_s if answer is not None else self.negative_ttl_s)
