"""3PID associations: writes through the group-commit writer, reads for the index."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update

from kith.store.database import Database
from kith.store.schema import threepid_associations as t


@dataclass(frozen=True, slots=True)
class AssociationRow:
    """One stored association; `mxid` is None for a tombstone (an unbind)."""

    source: str
    medium: str
    address: str
    mxid: str | None
    ts: int
    not_before: int
    not_after: int
    lookup_hash: str

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
        }


@dataclass(frozen=True, slots=True)
class IndexChange:
    id: int
    source: str
    lookup_hash: str
    mxid: str | None


class AssociationStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        # A write replaces the row *and gives it a new id*: the id is the change cursor.
        self._upsert = db.replace_with_new_id(
            t, ["source", "medium", "address"], AssociationRow.__slots__)

    async def write(self, rows: Sequence[AssociationRow]) -> None:
        """Store binds and tombstones durably (returns after the commit)."""
        await self._db.writer.execute(self._upsert, [r.as_params() for r in rows])

    async def get(self, source: str, medium: str, address: str) -> AssociationRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(
                select(t).where(t.c.source == source, t.c.medium == medium,
                                t.c.address == address)
            )).mappings().first()
        if row is None:
            return None
        return AssociationRow(**{k: row[k] for k in AssociationRow.__slots__})

    async def changes_since(self, last_id: int, limit: int = 50000) -> list[IndexChange]:
        """Rows written after `last_id`, oldest first (bindings and tombstones)."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(t.c.id, t.c.source, t.c.lookup_hash, t.c.mxid)
                .where(t.c.id > last_id).order_by(t.c.id).limit(limit)
            )
            return [IndexChange(*r) for r in result]

    async def stream_bound(self, batch: int = 20000) -> AsyncIterator[list[IndexChange]]:
        """Every live binding, in chunks, for building the index at start."""
        async with self._db.engine.connect() as conn:
            result = await conn.stream(
                select(t.c.id, t.c.source, t.c.lookup_hash, t.c.mxid)
                .where(t.c.mxid.is_not(None))
            )
            async for chunk in result.partitions(batch):
                yield [IndexChange(*r) for r in chunk]

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

    async def set_lookup_hashes(self, hashes: list[tuple[int, str]]) -> None:
        """Set the lookup hash of rows by id (after the pepper changed)."""
        if not hashes:
            return
        stmt = update(t).where(t.c.id == bindparam("row_id")).values(
            lookup_hash=bindparam("new_hash"))
        async with self._db.engine.begin() as conn:
            await conn.execute(stmt, [{"row_id": i, "new_hash": h} for i, h in hashes])
