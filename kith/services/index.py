"""The in-memory index of lookup hashes: lookup hash → mxid per source and per pepper.

Every lookup is answered from memory (a dict probe per address), never from a scan:
the index is built from the store at start, updated on every local write, and tails
the store's change cursor so writes by other processes and instances appear too.
While the lookup pepper changes it holds the hashes of both peppers (kith.services
.pepper); it hashes what changed itself, so it never depends on the pepper a writer in
another process knew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple

from kith.config import LDAP, LOCAL
from kith.services.coherence import ChangeCounter, StoreContact
from kith.services.lookup_table import LookupTable
from kith.store import IndexChange, Store
from kith.threepid import lookup_hash

log = logging.getLogger(__name__)

Tables = dict[str, LookupTable]


class PepperedHash(NamedTuple):
    """A lookup hash and the pepper it was made with."""

    pepper: str
    value: str


class AssociationIndex:
    """lookup hash → mxid for every live association, one map per source and pepper.

    Sources are kept apart ('local' bindings, 'ldap' synced rows, ...) because the same
    address may be stored by several and the lookup rules decide which one answers.
    `changes` is bumped after every local write; when another process bumps it, the next
    `refresh()` reads what changed from the store, so a bind acknowledged by any worker
    is visible to the lookups of every worker at once.
    """

    def __init__(self, store: Store, changes: ChangeCounter | None = None,
                 order: Sequence[str] = (LDAP, LOCAL)) -> None:
        self._store = store
        self._changes = changes or ChangeCounter()
        self._seen_changes = self._changes.value()
        self._order = tuple(order)
        self._tables: dict[str, Tables] = {}  # pepper → source → map
        self._catching_up = asyncio.Lock()
        self.pepper = ""  # the announced pepper, whose maps `source` gives
        self.last_id = 0
        # Ids of rows this process wrote and `set` in every map held, not yet passed by
        # `last_id`: a catch-up steps over those right after `last_id` without reading
        # them back (see `_step_over_own`).
        self._own_ids: set[int] = set()
        self._reads = 0  # reads of changes in flight
        self.contact = StoreContact()

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.get(self.pepper, {}).values())

    # --- peppers --------------------------------------------------------------------

    def peppers(self) -> set[str]:
        return set(self._tables)

    def holds(self, pepper: str) -> bool:
        return pepper in self._tables

    def announce(self, pepper: str) -> None:
        """Serve `pepper` (an index of it must be held)."""
        assert pepper in self._tables
        self.pepper = pepper

    def drop(self, pepper: str) -> None:
        if pepper != self.pepper:
            self._tables.pop(pepper, None)

    def hash(self, medium: str, address: str) -> str:
        """The lookup hash of an address under the announced pepper."""
        return lookup_hash(medium, address, self.pepper)

    def peppered_hash(self, medium: str, address: str) -> PepperedHash:
        """`hash`, with its pepper: `set` takes it back instead of hashing again (the
        announced pepper may change while the write is committed)."""
        return PepperedHash(self.pepper, lookup_hash(medium, address, self.pepper))

    async def build(self, pepper: str, stored_upto: int | None = 0,
                    stored_still: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Index `pepper` beside the peppers held: the store as of the cursor, then what
        changed since, under the lock of `catch_up`.  Stored hashes are used for rows up
        to `stored_upto` (None: all), the others hashed here; if `stored_still` says
        after reading that they may have been rewritten meanwhile, every row is hashed
        here instead."""
        if pepper in self._tables:
            return
        first = not self._tables
        start = await self._store.associations.max_id()
        tables = await self._read(pepper, start, stored_upto)
        if stored_upto != 0 and stored_still is not None and not await stored_still():
            tables = await self._read(pepper, start, 0)
        async with self._catching_up:
            if first:
                self.last_id = start
            while self.last_id < start:  # the maps held, as far as the new one at least
                changes = await self._changes_since(self.last_id)
                if not changes:
                    break
                self.apply(changes)
            cursor = start
            while cursor < self.last_id:
                changes = await self._store.associations.changes_since(cursor,
                                                                       upto=self.last_id)
                if not changes:
                    break
                _apply(tables, pepper, changes)
                cursor = changes[-1].id
            self._tables[pepper] = tables
            self._own_ids.clear()  # set before these maps were held: to be read
            if first:
                self.pepper = pepper
        if first:
            await self.catch_up()

    async def _read(self, pepper: str, start: int, stored_upto: int | None) -> Tables:
        """The live rows up to `start`, with their stored hashes up to `stored_upto`
        (None: all), the later ones hashed here with `pepper` (see `build`)."""
        tables = self._new_tables()
        for source, count in (await self._store.associations.count_bound()).items():
            _table(tables, source).reserve(count)
        trusted = start if stored_upto is None else min(stored_upto, start)
        if trusted > 0:
            async for packed in self._store.associations.stream_bound_packed(upto=trusted):
                if not _table(tables, packed.source).update_packed(
                        packed.lookup_hashes, packed.mxids, packed.count):
                    # Rows the packing cannot carry (a stored hash of another length, a
                    # newline in an mxid, a hash stored twice): that batch's rows of the
                    # source as rows, which `update` takes in any shape.
                    async for chunk in self._store.associations.stream_bound(
                            after=packed.after, upto=packed.upto):
                        if chunk.source == packed.source:
                            _table(tables, chunk.source).update(
                                zip(chunk.lookup_hashes, chunk.mxids, strict=True))
                await asyncio.sleep(0)
        async for rows in self._store.associations.stream_bound_threepids(trusted, start,
                                                                        batch=5000):
            by_source: dict[str, list[tuple[str, str | None]]] = {}
            for source, medium, address, mxid in rows:
                by_source.setdefault(source, []).append(
                    (lookup_hash(medium, address, pepper), mxid))
            for source, entries in by_source.items():
                _table(tables, source).update(entries)
            await asyncio.sleep(0)
        return tables

    async def load(self, pepper: str, stored_upto: int | None = None) -> None:
        """Fill the index of `pepper` from the store and serve it."""
        self._seen_changes = self._changes.value()
        await self.build(pepper, stored_upto)
        self.announce(pepper)

    # --- reading --------------------------------------------------------------------

    def source(self, source: str, pepper: str | None = None) -> LookupTable:
        """The map of one source (read only, for probing in a chosen order)."""
        tables = self._tables.get(pepper or self.pepper)
        return LookupTable() if tables is None else _table(tables, source)

    def get(self, hash_: str, source: str | None = None) -> str | None:
        """The mxid of `hash_` in `source`, or in the first source (index order) having it."""
        if source is not None:
            return self.source(source).get(hash_)
        for mxids in self._tables.get(self.pepper, {}).values():
            mxid = mxids.get(hash_)
            if mxid is not None:
                return mxid
        return None

    # --- writing --------------------------------------------------------------------

    def set(self, medium: str, address: str, mxid: str | None, source: str = LOCAL,
            hashed: PepperedHash | None = None, row_id: int | None = None) -> None:
        """Record a committed local write (and tell the other processes); `hashed`, the
        address's hash under one pepper, need not be made again; `row_id`, the id the
        write took, need not be read back from the store."""
        for pepper, tables in self._tables.items():
            hash_ = hashed.value if hashed is not None and hashed.pepper == pepper \
                else lookup_hash(medium, address, pepper)
            _table(tables, source).set(hash_, mxid)
        if row_id is not None and row_id > self.last_id and not self._reads:
            # (A read in flight may return an older row of this address, to be applied
            # after this one: this one is then read back after it.)
            self._own_ids.add(row_id)
        self._told()

    def set_many(self, source: str, entries: Iterable[tuple[str, str, str | None]]) -> None:
        """Record many committed writes (medium, address, mxid) of one source, telling
        the other processes once."""
        entries = list(entries)
        for pepper, tables in self._tables.items():
            _table(tables, source).update(
                (lookup_hash(medium, address, pepper), mxid) for medium, address, mxid in entries)
        self._told()

    def _told(self) -> None:
        self._changes.bump()
        self._seen_changes += 1

    async def written(self) -> None:
        """Take in writes this process committed without `set`ting them (associations
        replicated from a peer, which keep a row only if newer): read them from the store,
        and tell the other processes."""
        await self.catch_up()
        self._told()

    def apply(self, changes: Sequence[IndexChange]) -> None:
        for pepper, tables in self._tables.items():
            _apply(tables, pepper, changes)
        if changes and changes[-1].id > self.last_id:
            self.last_id = changes[-1].id

    async def catch_up(self) -> None:
        async with self._catching_up:
            await self._catch_up_locked()

    async def _changes_since(self, last_id: int) -> list[IndexChange]:
        """The store's changes after `last_id`, to apply to the maps held."""
        self._reads += 1
        try:
            return await self._store.associations.changes_since(last_id)
        finally:
            self._reads -= 1

    def _step_over_own(self) -> None:
        """Move `last_id` over the rows right after it that this process wrote and `set`
        itself while no read was in flight.  Every row before them was applied before
        them: a read that returned one was made after they were `set`, so after they
        were committed, and returned them too, after it (a rewrite of an address
        deletes its older row, so no read made later returns that).  Own rows after
        another writer's are read back; the others would be read, hashed and applied a
        second time for nothing."""
        own = self._own_ids
        if not own:
            return
        while self.last_id + 1 in own:
            self.last_id += 1
        if min(own) <= self.last_id:
            self._own_ids = {i for i in own if i > self.last_id}

    async def _catch_up_locked(self) -> None:
        self.contact.reading()
        try:
            while True:
                self._step_over_own()
                changes = await self._changes_since(self.last_id)
                if not changes:
                    break
                self.apply(changes)
        except Exception as exc:
            self.contact.failed(exc)
            raise
        self.contact.succeeded()

    async def refresh(self) -> None:
        """Catch up if another process of this server wrote since we last looked; 503
        M_UNKNOWN if the index may be missing other instances' writes (`StoreContact`).
        A lookup arriving while another one's catch-up runs waits for it: it must not
        answer from the index as it was before a write it may already know of."""
        self.contact.check()
        current = self._changes.value()
        if current <= self._seen_changes:
            return
        async with self._catching_up:
            if current <= self._seen_changes:  # caught up meanwhile, by another lookup
                return
            seen = self._changes.value()
            await self._catch_up_locked()
            self._seen_changes = max(self._seen_changes, seen)

    def _new_tables(self) -> Tables:
        return {source: LookupTable() for source in self._order}


def _table(tables: Tables, source: str) -> LookupTable:
    table = tables.get(source)
    if table is None:
        table = tables[source] = LookupTable()
    return table


def _apply(tables: Tables, pepper: str, changes: Iterable[IndexChange]) -> None:
    """Apply changes in id order, hashing each address with `pepper`."""
    by_source: dict[str, list[tuple[str, str | None]]] = {}
    for change in changes:
        by_source.setdefault(change.source, []).append(
            (lookup_hash(change.medium, change.address, pepper), change.mxid))
    for source, entries in by_source.items():
        _table(tables, source).update(entries)
