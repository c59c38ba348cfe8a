"""Change counters: how one process learns that another changed shared state.

Each worker process keeps in-memory views (the lookup index, the token cache). After a
write commits, the writer bumps a counter; a reader that sees the counter move refreshes
its view from the store before answering. In a single process the counter is a plain
integer; with several workers it lives in memory shared by all of them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from typing import Any


class ChangeCounter:
    """A number that only goes up, bumped after every committed change."""

    def __init__(self) -> None:
        self._value = 0

    def value(self) -> int:
        return self._value

    def bump(self) -> None:
        self._value += 1


class SharedChangeCounter(ChangeCounter):
    """A ChangeCounter in shared memory, for worker processes forked from one parent."""

    def __init__(self, array: Any, slot: int, lock: Any) -> None:
        super().__init__()
        self._array = array
        self._slot = slot
        self._lock = lock

    def value(self) -> int:
        # An aligned 64-bit read: no lock needed to see the latest bump.
        return int(self._array[self._slot])

    def bump(self) -> None:
        with self._lock:
            self._array[self._slot] += 1


class SharedCounters:
    """The counters every worker shares; create before forking."""

    ASSOCIATIONS = 0
    ACCOUNTS = 1
    INVITES = 2

    def __init__(self) -> None:
        self._array = multiprocessing.RawArray(ctypes.c_int64, 3)
        self._lock = multiprocessing.Lock()
        self._claims = multiprocessing.RawArray(ctypes.c_int64, 1)
        # Taken by each worker around its database commits (see kith.store.Database).
        self.write_lock = multiprocessing.Lock()

    def counter(self, slot: int) -> SharedChangeCounter:
        return SharedChangeCounter(self._array, slot, self._lock)

    # Jobs one worker runs for all (claimed by the first that asks).
    LDAP_SYNC = 0

    def claim(self, job: int) -> bool:
        """True for the first worker claiming `job`, False for every other."""
        with self._lock:
            if self._claims[job]:
                return False
            self._claims[job] = os.getpid()
            return True
