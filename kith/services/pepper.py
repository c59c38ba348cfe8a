"""The lookup pepper: where it is kept, how it changes, how every process follows.

The store holds the announced pepper and, while a change is under way, the next one.
A change (`PepperRotation`) names the next pepper first; every process then builds an
index of the next pepper's hashes beside the one it serves (`LookupPeppers`), keeps
both up to date, and answers lookups made with either.  Meanwhile the stored hashes are
rewritten; then the next pepper becomes the announced one in a single write.  A
process announces a pepper only once its index of that pepper is complete, and a
lookup with the pepper a process is still indexing waits for that index: so a lookup
made with the announced pepper, or the one about to be, is never answered from a
partial index, and one made with a pepper no longer held gets `M_INVALID_PEPPER` with
the announced one (docs/decisions.md, "Changing the lookup pepper").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kith.store import HeldLock, Store
from kith.threepid import lookup_hash, new_pepper, now_ms

if TYPE_CHECKING:
    from kith.services.index import AssociationIndex

log = logging.getLogger(__name__)

CURRENT = "lookup_pepper"
NEXT = "lookup_pepper.next"
# The pepper the stored lookup hashes are made with, for rows up to HASHED_UPTO
# (absent: the announced pepper, for every row).
HASHED = "lookup_pepper.hashed"
HASHED_UPTO = "lookup_pepper.hashed_upto"
ROTATED_AT = "lookup_pepper.rotated_at"
KEYS = (CURRENT, NEXT, HASHED, HASHED_UPTO, ROTATED_AT)
# How often a change of the pepper says how far its rewrite of the stored hashes got.
PROGRESS_EVERY_S = 10.0
# Held by whoever changes the pepper (a server or `kith rotate-pepper`).
ROTATION_LOCK = "lookup-pepper"


class RotationBusy(Exception):
    """Another process is changing the pepper."""


@dataclass(frozen=True)
class PepperRecord:
    current: str
    next: str | None = None
    hashed: str | None = None
    hashed_upto: int | None = None
    rotated_at: int | None = None

    def stored_upto(self, pepper: str) -> int | None:
        """Rows up to which id hold a stored hash made with `pepper` (None: every row,
        0: none)."""
        if pepper != (self.hashed or self.current):
            return 0
        return self.hashed_upto if self.hashed else None


async def read_record(store: Store) -> PepperRecord:
    values = await store.state.get_many(KEYS)
    current = values.get(CURRENT) or await store.state.get_or_create(CURRENT, new_pepper())
    upto, rotated = values.get(HASHED_UPTO), values.get(ROTATED_AT)
    return PepperRecord(current=current, next=values.get(NEXT) or None,
                        hashed=values.get(HASHED) or None,
                        hashed_upto=int(upto) if upto else None,
                        rotated_at=int(rotated) if rotated else None)


async def hold_rotation_lock(store: Store, wait_s: float) -> HeldLock:
    deadline = time.monotonic() + wait_s
    while True:
        held = await store.locks.try_hold(ROTATION_LOCK, across_processes=True)
        if held is not None:
            return held
        if time.monotonic() >= deadline:
            raise RotationBusy("another process is changing the lookup pepper")
        await asyncio.sleep(0.1)


class PepperRotation:
    """One change of the pepper, by the holder of the store's lock `lookup-pepper`."""

    def __init__(self, store: Store, held: HeldLock, pepper: str) -> None:
        self._store = store
        self._held = held
        self.pepper = pepper

    @classmethod
    async def begin(cls, store: Store, pepper: str | None = None, wait_s: float = 30.0,
                    due: Callable[[PepperRecord], bool] | None = None,
                    ) -> PepperRotation | None:
        """Name the next pepper (`pepper`, or a new random one); None if `pepper` is
        already the announced one, or `due` (asked under the lock) says no.  Every
        process starts indexing it from here on."""
        held = await hold_rotation_lock(store, wait_s)
        try:
            record = await read_record(store)
            if (pepper is not None and pepper == record.current) or (
                    due is not None and not due(record)):
                await held.release()
                return None
            pepper = pepper or new_pepper()
            # The stored hashes are about to be rewritten: none of them is to be trusted
            # for any pepper until the rewrite is done.
            await store.state.set_many({NEXT: pepper, HASHED: pepper, HASHED_UPTO: "0"})
        except BaseException:
            await held.release()
            raise
        return cls(store, held, pepper)

    async def complete(self, say: Callable[[str], None] | None = None) -> int:
        """Rewrite the stored hashes, then announce the new pepper; returns the rows
        rewritten.  Every `PROGRESS_EVERY_S` the rewrite says how far it got, through
        `say` (the log when None).  The lock is let go whatever happens."""
        store, pepper = self._store, self.pepper
        try:
            upto = await store.associations.max_id()
            reported = time.monotonic()

            def progress(done: int, after_id: int) -> None:
                nonlocal reported
                if time.monotonic() - reported >= PROGRESS_EVERY_S:
                    reported = time.monotonic()
                    (say or log.info)(f"rewriting the stored lookup hashes: {done} rewritten, "
                                      f"about {after_id * 100 // max(upto, 1)}% of the way")

            rewritten = await store.associations.rehash(
                lambda medium, address: lookup_hash(medium, address, pepper), upto,
                progress=progress)
            await store.state.set_many({CURRENT: pepper, NEXT: "", HASHED_UPTO: str(upto),
                                        ROTATED_AT: str(now_ms())})
            log.info("lookup pepper changed; %d stored lookup hashes rewritten", rewritten)
            return rewritten
        finally:
            await self._held.release()


async def rotate(store: Store, pepper: str | None = None, wait_s: float = 30.0,
                 say: Callable[[str], None] | None = None) -> bool:
    """Change the pepper (to `pepper`, or a new random one); False if it already was.
    `say`: as `PepperRotation.complete`."""
    rotation = await PepperRotation.begin(store, pepper, wait_s)
    if rotation is None:
        return False
    await rotation.complete(say)
    return True


async def finish_interrupted(store: Store) -> int:
    """Finish a change of the pepper that was begun and never finished (the process
    making it died, a `kith rotate-pepper` was killed): until one finishes, every process
    holds an index for each pepper.  1 if one was finished here; 0 if none was left
    unfinished, or a live process is still making it."""
    record = await read_record(store)
    if record.next is None:
        return 0
    try:
        rotation = await PepperRotation.begin(
            store, record.next, wait_s=0, due=lambda now: now.next == record.next)
    except RotationBusy:
        return 0
    if rotation is None:
        return 0
    log.warning("finishing a change of the lookup pepper that was begun and not finished")
    await rotation.complete()
    return 1


async def pepper_upkeep(store: Store, period_s: float | None) -> int:
    """What a server does for the pepper now and then: finish an interrupted change, and
    with `[general] lookup_pepper.rotation`, make the periodic one."""
    finished = await finish_interrupted(store)
    if period_s is None or finished:
        return finished
    return await rotate_when_due(store, period_s)


async def rotate_when_due(store: Store, period_s: float) -> int:
    """Rotate if the last change is `period_s` old (1) or not (0); the first period
    starts when this is first asked.  Of several instances asking, one rotates."""
    record = await read_record(store)
    if record.rotated_at is None:
        await store.state.get_or_create(ROTATED_AT, str(now_ms()))
        return 0

    def due(record: PepperRecord) -> bool:
        return record.rotated_at is None or now_ms() - record.rotated_at >= period_s * 1000

    if not due(record):
        return 0
    try:
        rotation = await PepperRotation.begin(store, wait_s=0, due=due)
    except RotationBusy:
        return 0
    if rotation is None:
        return 0
    await rotation.complete()
    return 1


class LookupPeppers:
    """What one process does with the store's pepper record: index the peppers it
    names, announce the current one once indexed, drop the ones no longer named."""

    def __init__(self, store: Store, index: AssociationIndex) -> None:
        self._store = store
        self._index = index
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._record: PepperRecord | None = None
        self._sync_lock = asyncio.Lock()
        # Reads of the record begun, and the number of the last one finished.
        self._reads_begun = 0
        self._read_done = 0

    @property
    def current(self) -> str:
        return self._index.pepper

    async def load(self) -> None:
        """At start: index the announced pepper (and the next one, if named)."""
        record = await read_record(self._store)
        self._record = record
        await self._index.build(record.current, record.stored_upto(record.current),
                                self._stored_still(record))
        self._index.announce(record.current)
        if record.next and record.next != record.current:
            self._start_build(record.next, record)

    async def sync(self) -> None:
        """Follow the store's record: start indexing a named pepper, announce the
        current one once it is indexed, drop the others.

        The record is read once more unless a read that began after this call has
        finished meanwhile: reads run one at a time, and one answers every caller that
        waited for it, so made-up peppers in flight at once cost the store one read."""
        asked = self._reads_begun
        async with self._sync_lock:
            if self._read_done > asked:
                return
            self._reads_begun += 1
            begun = self._reads_begun
            record = await read_record(self._store)
            self._record, self._read_done = record, begun
            wanted = {record.current} | ({record.next} if record.next else set())
            for pepper in wanted:
                if not self._index.holds(pepper):
                    self._start_build(pepper, record)
            if self._index.holds(record.current):
                self._switch(record)

    async def accepts(self, pepper: str) -> bool:
        """True once `pepper` can be answered (waiting for its index if it is being
        built); False for a pepper the store does not name."""
        if self._index.holds(pepper):
            return True
        if pepper not in self._builds:
            await self.sync()
        build = self._builds.get(pepper)
        if build is not None:
            await asyncio.shield(build)  # a failed build is logged by `_build`
        return self._index.holds(pepper)

    async def close(self) -> None:
        for build in self._builds.values():
            build.cancel()
        for build in list(self._builds.values()):
            try:
                await build
            except BaseException:  # noqa: BLE001, S110 - stopping: nothing to report
                pass

    def _start_build(self, pepper: str, record: PepperRecord) -> None:
        if pepper in self._builds:
            return
        task = asyncio.create_task(self._build(pepper, record), name="kith-pepper-index")
        self._builds[pepper] = task

    def _stored_still(self, record: PepperRecord) -> Callable[[], Awaitable[bool]]:
        async def still() -> bool:
            """The stored hashes read are as `record` said (no rewrite began since)."""
            now = await read_record(self._store)
            return (now.hashed, now.hashed_upto) == (record.hashed, record.hashed_upto)
        return still

    async def _build(self, pepper: str, record: PepperRecord) -> None:
        try:
            log.info("indexing the lookup hashes of a new lookup pepper")
            await self._index.build(pepper, record.stored_upto(pepper),
                                    self._stored_still(record))
            if self._record is not None and self._record.current == pepper:
                self._switch(self._record)
        except Exception:
            log.warning("could not index a new lookup pepper; trying again on the next "
                        "look at the store", exc_info=True)
        finally:
            self._builds.pop(pepper, None)

    def _switch(self, record: PepperRecord) -> None:
        if self._index.pepper != record.current:
            log.info("announcing the new lookup pepper")
            self._index.announce(record.current)
        keep = {record.current} | ({record.next} if record.next else set())
        for pepper in self._index.peppers() - keep:
            self._index.drop(pepper)

    async def follow(self, interval_s: float) -> None:
        """Every `interval_s`: the pepper record, and what other writers changed."""
        self._index.contact.following()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._index.catch_up()
                await self.sync()
            except Exception:  # the index's StoreContact says it, once per outage
                log.debug("could not follow the store", exc_info=True)
