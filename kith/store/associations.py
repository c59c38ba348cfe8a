"""3PID associations: writes through the group-commit writer, reads for the index and
for the replication pusher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    and_,
    bindparam,
    func,
    literal,
    or_,
    select,
    text,
    update,
)

from kith.store.database import Database, is_conflict
from kith.store.schema import NO_ORIGIN, OWN_SOURCE
from kith.store.schema import threepid_associations as t

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AssociationRow:
    """One stored association; `mxid` is None for a tombstone (an unbind).  `origin_server`
    and `origin_id` name the replication peer it came from and its id there (None: the
    server's own)."""

    source: str
    medium: str
    address: str
    mxid: str | None
    ts: int
    not_before: int
    not_after: int
    lookup_hash: str
    origin_server: str | None = None
    origin_id: int | None = None

    def as_params(self) -> dict[str, object]:
        return {
            "source": self.source,
            "medium": self.medium,
            "address": self.address,
            "mxid": self.mxid,
            "ts": self.ts,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "lookup_hash": self.lookup_hash,
            "origin_server": self.origin_server,
            "origin_id": self.origin_id,
        }


@dataclass(frozen=True, slots=True)
class OwnChange:
    """A bind or unbind made on this server, as the pusher sends it to peers."""

    id: int
    medium: str
    address: str
    mxid: str | None
    ts: int
    not_before: int
    not_after: int


def _stored_is_as_new(stored: FromClause) -> ColumnElement[bool]:
    """The stored row is at least as new as the replicated one being written: from the
    same peer, with an id at least as large (a peer's own order decides); else with a
    `ts` at least as large (on a tie, what is stored stays)."""
    origin = bindparam("origin_server", type_=t.c.origin_server.type)
    same_origin = stored.c.origin_server == origin
    return or_(and_(same_origin,
                    stored.c.origin_id >= bindparam("origin_id", type_=t.c.origin_id.type)),
               and_(or_(stored.c.origin_server.is_(None), stored.c.origin_server != origin),
                    stored.c.ts >= bindparam("ts", type_=t.c.ts.type)))


@dataclass(frozen=True, slots=True)
class IndexChange:
    """A row as the lookup index reads it.  `lookup_hash` is what its writer stored,
    made with the pepper that writer knew (see `rehash`)."""

    id: int
    source: str
    medium: str
    address: str
    lookup_hash: str
    mxid: str | None


@dataclass(frozen=True, slots=True)
class BoundChunk:
    """Live bindings of one source: `lookup_hashes[i]` is bound to `mxids[i]`."""

    source: str
    lookup_hashes: list[str]
    mxids: list[str]


@dataclass(frozen=True, slots=True)
class PackedChunk:
    """`count` live bindings of one source, packed by the database: `lookup_hashes` is
    their hashes one after another, `mxids` their mxids joined by newlines, in the same
    order.  They are the bindings of `source` with an id after `after`, up to `upto`."""

    source: str
    count: int
    lookup_hashes: str
    mxids: str
    after: int
    upto: int


_REHASH_ATTEMPTS = 5
_REHASH = update(t).where(t.c.id == bindparam("row_id")).values(
    lookup_hash=bindparam("new_hash"))
_REHASH_POSTGRESQL = text(
    "UPDATE threepid_associations AS a SET lookup_hash = b.lookup_hash"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:hashes AS text[])) AS b(id, lookup_hash)"
    " WHERE a.id = b.id")
_INDEX_COLUMNS = (t.c.id, t.c.source, t.c.medium, t.c.address, t.c.lookup_hash, t.c.mxid)


class AssociationStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        # A write replaces the row *and gives it a new id*: the id is the change cursor.
        key = ["source", "medium", "address"]
        self._upsert = db.replace_with_new_id(t, key, AssociationRow.__slots__)
        self._upsert_if_newer = db.replace_with_new_id(t, key, AssociationRow.__slots__,
                                                       unless=_stored_is_as_new)
        # The partial index ix_threepid_own_changes serves every query of own rows.
        self._own = text(f"{db.likely(OWN_SOURCE)} AND {NO_ORIGIN}")

    async def write(self, rows: Sequence[AssociationRow]) -> range | None:
        """Store binds and tombstones durably (returns after the commit), and say which
        ids they took, in order, where the database says (see `GroupCommitWriter.insert`)."""
        return await self._db.writer.insert(self._upsert, [r.as_params() for r in rows])

    async def write_replicated(self, rows: Sequence[AssociationRow]) -> None:
        """Store associations replicated from peers, all in one transaction, each only if
        it is newer than the stored association of its address (see `_stored_is_as_new`):
        a push received twice, or late, changes nothing."""
        if rows:
            await self._db.writer.execute(self._upsert_if_newer,
                                          [r.as_params() for r in rows])

    async def get(self, source: str, medium: str, address: str) -> AssociationRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(
                select(t).where(t.c.source == source, t.c.medium == medium,
                                t.c.address == address)
            )).mappings().first()
        if row is None:
            return None
        return AssociationRow(**{k: row[k] for k in AssociationRow.__slots__})

    async def changes_since(self, last_id: int, limit: int = 50000,
                            upto: int | None = None) -> list[IndexChange]:
        """Rows written after `last_id` (and up to `upto`), oldest first (bindings and
        tombstones)."""
        query = select(*_INDEX_COLUMNS).where(t.c.id > last_id)
        if upto is not None:
            query = query.where(t.c.id <= upto)
        async with self._db.engine.connect() as conn:
            result = await conn.execute(query.order_by(t.c.id).limit(limit))
            return [IndexChange(*r) for r in result]

    async def stream_bound(self, batch: int = 20000, after: int = 0,
                           upto: int | None = None) -> AsyncIterator[BoundChunk]:
        """Every live binding (with an id after `after`, up to `upto`), in chunks of one
        source each, with its stored lookup hash, for building an index (as columns: no
        object per row).  With `upto`, these rows and the changes after `upto` are
        exactly the store as it was at `upto`, whatever is written meanwhile."""
        query = select(t.c.source, t.c.lookup_hash, t.c.mxid).where(
            t.c.mxid.is_not(None), t.c.id > after)
        if upto is not None:
            query = query.where(t.c.id <= upto)
        async for rows in self._db.stream_tuples(query, batch):
            sources, hashes, mxids = zip(*rows, strict=True)
            if sources.count(sources[0]) == len(sources):
                yield BoundChunk(sources[0], list(hashes), list(mxids))
                continue
            by_source: dict[str, BoundChunk] = {}
            for source, lookup_hash, mxid in rows:
                chunk = by_source.get(source)
                if chunk is None:
                    chunk = by_source[source] = BoundChunk(source, [], [])
                chunk.lookup_hashes.append(lookup_hash)
                chunk.mxids.append(mxid)
            for chunk in by_source.values():
                yield chunk

    async def stream_bound_packed(self, upto: int,
                                  batch: int = 50_000) -> AsyncIterator[PackedChunk]:
        """Every live binding with an id up to `upto` (as `stream_bound`), `batch` rows
        at a time, packed into two strings a source by the database: a few objects for
        the driver to make a batch instead of three a row, which is what a start on
        millions of bindings spends its time on (docs/performance.md).  Each batch is a
        read of its own: a row rewritten between two reads is read in its new version
        with the changes after `upto`, as it would be after one read of them all."""
        def joined(column: ColumnElement[str], separator: str) -> ColumnElement[str]:
            if self._db.dialect == "postgresql":
                return func.string_agg(column, literal(separator))
            return func.group_concat(column, literal(separator))

        async def read(after: int) -> Sequence[Any]:
            rows = select(t.c.id, t.c.source, t.c.lookup_hash, t.c.mxid).where(
                t.c.mxid.is_not(None), t.c.id > after, t.c.id <= upto,
            ).order_by(t.c.id).limit(batch).subquery()
            query = select(rows.c.source, func.count(), func.max(rows.c.id),
                           joined(rows.c.lookup_hash, ""), joined(rows.c.mxid, "\n"),
                           ).group_by(rows.c.source)
            async with self._db.engine.connect() as conn:
                return (await conn.execute(query)).all()

        after, groups = 0, await read(0)
        while groups:
            last = max(int(group[2]) for group in groups)
            for source, count, _, lookup_hashes, mxids in groups:
                yield PackedChunk(source, int(count), lookup_hashes, mxids, after, last)
            after, groups = last, await read(last)

    async def stream_bound_threepids(
            self, after: int, upto: int,
            batch: int = 20000) -> AsyncIterator[Sequence[Sequence[str]]]:
        """(source, medium, address, mxid) of the live bindings with an id after `after`,
        up to `upto`: those whose stored hash is not to be trusted, to hash anew."""
        async for rows in self._db.stream_tuples(
                select(t.c.source, t.c.medium, t.c.address, t.c.mxid).where(
                    t.c.mxid.is_not(None), t.c.id > after, t.c.id <= upto), batch):
            yield rows

    async def count_bound(self) -> dict[str, int]:
        """How many live bindings each source holds (the index makes room for them)."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(t.c.source, func.count()).where(t.c.mxid.is_not(None))
                .group_by(t.c.source))
            return {str(source): int(count) for source, count in result}

    async def max_id(self) -> int:
        async with self._db.engine.connect() as conn:
            value = (await conn.execute(select(func.max(t.c.id)))).scalar()
        return int(value or 0)

    async def live_rows(self, source: str) -> list[tuple[str, str, str, str]]:
        """(medium, address, mxid, lookup_hash) of every live row from `source`: what a
        directory sync compares the directory against."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(t.c.medium, t.c.address, t.c.mxid, t.c.lookup_hash)
                .where(t.c.source == source, t.c.mxid.is_not(None))
            )
            return [(r[0], r[1], r[2], r[3]) for r in result]

    async def live_threepids(self) -> list[tuple[int, str, str]]:
        """(id, medium, address) of every live binding, e.g. to hash them anew."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(select(t.c.id, t.c.medium, t.c.address)
                                        .where(t.c.mxid.is_not(None)))
            return [(int(i), m, a) for i, m, a in result]

    async def rehash(self, hash_of: Callable[[str, str], str], upto: int,
                     batch: int = 2000,
                     progress: Callable[[int, int], None] | None = None) -> int:
        """Store `hash_of(medium, address)` as the lookup hash of every live row with an
        id up to `upto`, a batch per transaction; ids stay as they are (no reader of the
        change cursor needs to see this).  A row rewritten meanwhile has a larger id and
        is left as its writer stored it.  Returns the number of rows rewritten; after
        each batch, `progress(rows rewritten, the batch's last id)`."""
        after, done = 0, 0
        while True:
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(
                    select(t.c.id, t.c.medium, t.c.address)
                    .where(t.c.id > after, t.c.id <= upto, t.c.mxid.is_not(None))
                    .order_by(t.c.id).limit(batch))).all()
            if not rows:
                return done
            ids = [int(row[0]) for row in rows]
            hashes = [hash_of(medium, address) for _, medium, address in rows]
            for attempt in range(1, _REHASH_ATTEMPTS + 1):
                try:
                    await self._rehash_rows(ids, hashes)
                    break
                except Exception as exc:
                    # A bind's group commit, in this process or another instance, may
                    # hold some of the batch's rows and wait for others: PostgreSQL then
                    # rolls one of them back.  The batch is as good to run again.
                    if not is_conflict(exc) or attempt == _REHASH_ATTEMPTS:
                        raise
                    log.info("rewriting lookup hashes: a batch met a concurrent write "
                             "(%s); running it again", type(exc).__name__)
            after, done = ids[-1], done + len(rows)
            if progress is not None:
                progress(done, after)

    async def _rehash_rows(self, ids: list[int], hashes: list[str]) -> None:
        if self._db.dialect == "postgresql":
            # One statement for the batch: an executemany's rows would each be a
            # statement of their own.
            async with self._db.engine.begin() as conn:
                await conn.execute(_REHASH_POSTGRESQL, {"ids": ids, "hashes": hashes})
        else:  # the group-commit writer runs it on its own connection, in its thread
            await self._db.writer.execute(_REHASH, [
                {"row_id": i, "new_hash": h} for i, h in zip(ids, hashes, strict=True)])

    # ---------------------------------------------------- the server's own, for peers

    async def ids_past(self, past: int) -> None:
        """Give every row written from now on an id larger than `past` (taking over
        another server's id space, in which its peers know its associations)."""
        await self._db.advance_ids(t, past)

    async def own_changes(self, after_id: int, limit: int) -> list[OwnChange]:
        """The server's own binds and unbinds after `after_id`, oldest first."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(t.c.id, t.c.medium, t.c.address, t.c.mxid, t.c.ts, t.c.not_before,
                       t.c.not_after)
                .where(self._own, t.c.id > after_id).order_by(t.c.id).limit(limit))
            return [OwnChange(*r) for r in result]

    async def own_backlog(self, after_id: int) -> tuple[int, int | None]:
        """(how many own changes come after `after_id`, the `ts` of the first of them)."""
        async with self._db.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(t).where(
                self._own, t.c.id > after_id))).scalar()
            first = (await conn.execute(select(t.c.ts).where(
                self._own, t.c.id > after_id).order_by(t.c.id).limit(1))).scalar()
        return int(count or 0), None if first is None else int(first)

    async def own_ids(self) -> dict[tuple[str, str], int]:
        """(medium, address) → id of every own row (bindings and tombstones)."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(select(t.c.medium, t.c.address, t.c.id)
                                        .where(self._own))
            return {(m, a): int(i) for m, a, i in result}

    async def count_live(self) -> dict[tuple[str, str | None], int]:
        """(source, origin server or None for the server's own) → live bindings."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(t.c.source, t.c.origin_server, func.count())
                .where(t.c.mxid.is_not(None)).group_by(t.c.source, t.c.origin_server))
            return {(source, origin): int(n) for source, origin, n in result}
