"""Rate-limit buckets in the database, so every worker and every instance sharing it
counts into the same bucket.

A bucket is one number, its "theoretical arrival time" (`tat_us`): the moment it will
be empty again.  Spending `cost` moves it to max(tat, now) + cost; a bucket may run at
most `window` ahead of now (burst × period).  That is the leaky bucket Sydent keeps in
memory, in a form one statement can update atomically (an UPSERT whose update only
happens WHERE the bucket has room, RETURNING the new time: SQLite >= 3.35, PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import BigInteger, String, bindparam, case, delete, select

from kith.store.database import Database
from kith.store.schema import rate_limits as buckets


@dataclass(frozen=True, slots=True)
class Charge:
    """What one hit costs one bucket, in microseconds of the bucket's drain."""

    bucket: str
    cost_us: int
    window_us: int  # how far ahead of now the bucket may run: burst × period


@dataclass(frozen=True, slots=True)
class Refusal:
    """The charge a bucket refused, and how long until it has room for it."""

    charge: Charge
    retry_after_us: int


_CHUNK = 500  # bucket names per IN (...) query
_NOW = bindparam("now", type_=BigInteger)
_COST = bindparam("cost", type_=BigInteger)
_WINDOW = bindparam("window", type_=BigInteger)
_BUCKET = bindparam("bucket", type_=String)
# When the bucket starts draining this charge: now, or later if it is not empty yet.
_START = case((buckets.c.tat_us > _NOW, buckets.c.tat_us), else_=_NOW)


class RateLimitStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        values = {"bucket": _BUCKET, "tat_us": _NOW + _COST}
        new_tat = {"tat_us": _START + _COST}
        self._take = db.upsert_where(
            buckets, values, ["bucket"], new_tat,
            where=_START + _COST - _NOW <= _WINDOW).returning(buckets.c.tat_us)
        self._add = db.upsert_where(buckets, values, ["bucket"], new_tat) \
            .returning(buckets.c.tat_us)
        self._get = select(buckets.c.tat_us).where(buckets.c.bucket == _BUCKET)

    async def take(self, charges: Sequence[Charge], now_us: int) -> Refusal | None:
        """Charge every bucket, or none of them: None when all had room, else the first
        refusal.  (A new bucket always has room: a charge never exceeds its window.)"""
        async with self._db.engine.connect() as conn:
            transaction = await conn.begin()
            try:
                for charge in charges:
                    params = {"bucket": charge.bucket, "now": now_us,
                              "cost": charge.cost_us, "window": charge.window_us}
                    if (await conn.execute(self._take, params)).first() is None:
                        tat = (await conn.execute(self._get, params)).scalar_one()
                        await transaction.rollback()
                        return Refusal(charge, max(
                            0, tat + charge.cost_us - now_us - charge.window_us))
                await transaction.commit()
            except BaseException:
                if transaction.is_active:
                    await transaction.rollback()
                raise
        return None

    async def add(self, costs_us: Mapping[str, int], now_us: int) -> dict[str, int]:
        """Charge buckets whether or not they have room (what was counted elsewhere, to
        be shared); answers each bucket's new time, in one transaction."""
        times: dict[str, int] = {}
        if not costs_us:
            return times
        async with self._db.engine.begin() as conn:
            for bucket, cost_us in costs_us.items():
                row = (await conn.execute(self._add, {
                    "bucket": bucket, "now": now_us, "cost": cost_us})).one()
                times[bucket] = int(row[0])
        return times

    async def times_of(self, names: Sequence[str]) -> dict[str, int]:
        """When each of the named buckets will be empty (those stored)."""
        times: dict[str, int] = {}
        async with self._db.engine.connect() as conn:
            for start in range(0, len(names), _CHUNK):
                result = await conn.execute(
                    select(buckets.c.bucket, buckets.c.tat_us)
                    .where(buckets.c.bucket.in_(names[start:start + _CHUNK])))
                times.update((str(bucket), int(tat)) for bucket, tat in result)
        return times

    async def time_of(self, bucket: str) -> int | None:
        """When the bucket will be empty (None: it is, or never was)."""
        async with self._db.engine.connect() as conn:
            tat = (await conn.execute(self._get, {"bucket": bucket})).scalar()
        return None if tat is None else int(tat)

    async def purge(self, now_us: int) -> int:
        """Forget the buckets that are empty by now; how many went."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(delete(buckets).where(buckets.c.tat_us < now_us))
        return int(result.rowcount or 0)
