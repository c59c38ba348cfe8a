"""Change counters: how one process learns that another changed shared state.

Each worker process keeps in-memory views (the lookup index, the token cache). After a
write commits, the writer bumps a counter; a reader that sees the counter move refreshes
its view from the store before answering. In a single process the counter is a plain
integer; with several workers it lives in memory shared by all of them.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import time
from typing import Any

from kith.errors import database_unreachable
from kith.store.locks import HeldLock, NamedLocks

log = logging.getLogger(__name__)


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
        self._claims = multiprocessing.RawArray(ctypes.c_int64, 3)
        # Taken by each worker around its database commits (see kith.store.Database).
        self.write_lock = multiprocessing.Lock()

    def counter(self, slot: int) -> SharedChangeCounter:
        return SharedChangeCounter(self._array, slot, self._lock)

    # Jobs one worker runs for all (claimed by the first that asks).
    LDAP_SYNC = 0
    REPLICATION_PUSH = 1
    PEPPER_ROTATION = 2

    def claim(self, job: int) -> bool:
        """True for the first worker claiming `job`, False for every other."""
        with self._lock:
            if self._claims[job]:
                return False
            self._claims[job] = os.getpid()
            return True


# A view that follows the store, whose read of it has had no answer for this long (the
# database hangs), may miss writes of other instances: it answers 503, not a stale answer.
STALE_AFTER_S = 5.0


class StoreContact:
    """Whether a view that follows the store (the lookup index) is current enough to answer.

    The view is current while its reads of the store are answered.  When one fails, or
    when one has waited for an answer for `stale_after_s` while the view is
    `following`, a bind made on another instance may be missing from it: `check` then
    refuses with 503 M_UNKNOWN (never a stale "not found") until a read succeeds again.
    Only a read that waits counts, not the time between reads: a busy process, whose
    polls start late, is still current when they are answered.  The failure and the
    recovery are logged once per outage.
    """

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self._stale_after_s = stale_after_s
        self._following = False
        self._waiting_since: float | None = None
        self.failing = False

    def following(self) -> None:
        """Polls now keep the view current: one that waits for long makes it stale."""
        self._following = True

    def reading(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

    def succeeded(self) -> None:
        self._waiting_since = None
        if self.failing:
            self.failing = False
            log.warning("the database answers again; lookups are served")

    def failed(self, exc: BaseException) -> None:
        self._waiting_since = None
        if not self.failing:
            self.failing = True
            log.error("cannot read the database (%s); lookups answer 503 until it answers",
                      exc)

    def check(self) -> None:
        if self.failing:
            raise database_unreachable()
        waiting_since = self._waiting_since
        if (self._following and waiting_since is not None
                and time.monotonic() - waiting_since > self._stale_after_s):
            self.failed(TimeoutError(f"no answer for {self._stale_after_s:.0f} s"))
            raise database_unreachable()


class Turn:
    """Work one instance does for all that share a database (syncing a directory,
    pushing to replication peers): whoever holds the store's lock `name` does it; the
    others wait, and one takes over when it is let go (or its holder dies)."""

    def __init__(self, locks: NamedLocks, name: str, doing: str) -> None:
        self._locks = locks
        self._name = name
        self._doing = doing  # for the log: "syncs the LDAP directory", ...
        self.held = False
        self.refused = 0  # times another instance held the lock

    async def wait(self, interval_s: float) -> HeldLock:
        """Hold the lock, trying every `interval_s` while another instance has it."""
        said = False
        while True:
            try:
                held = await self._locks.try_hold(self._name)
            except Exception as exc:  # noqa: BLE001 - a dead database must not stop kith
                log.warning("could not take the lock %r: %s", self._name, exc)
                held = None
            if held is not None:
                if said:
                    log.info("this instance now %s", self._doing)
                self.held = True
                return held
            self.refused += 1
            if not said:
                log.info("another kith instance %s; this one takes over if it stops",
                         self._doing)
                said = True
            await asyncio.sleep(interval_s)
