"""Validation sessions: one row per (medium, address, client_secret)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select, update

from kith.store.database import Database
from kith.store.schema import threepid_validation_sessions as sessions


@dataclass(frozen=True, slots=True)
class ValidationSessionRow:
    id: int
    medium: str
    address: str
    client_secret: str
    validated_at: int | None
    mtime: int
    next_link: str | None
    send_attempt: int
    token: str
    failed_attempts: int


_COLUMNS = [sessions.c[name] for name in ValidationSessionRow.__slots__]


class ValidationSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert_ignore = db.insert_or_ignore(sessions)

    async def get(self, sid: int) -> ValidationSessionRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(sessions.c.id == sid))).first()
        return ValidationSessionRow(*row) if row else None

    async def find(self, medium: str, address: str,
                   client_secret: str) -> ValidationSessionRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(
                sessions.c.medium == medium, sessions.c.address == address,
                sessions.c.client_secret == client_secret))).first()
        return ValidationSessionRow(*row) if row else None

    async def create(self, row: ValidationSessionRow) -> ValidationSessionRow:
        """Insert `row` unless a session for its (medium, address, client_secret) exists;
        answer the stored session either way (concurrent requests share one)."""
        async with self._db.engine.begin() as conn:
            await conn.execute(self._insert_ignore, {
                name: getattr(row, name) for name in ValidationSessionRow.__slots__})
        stored = await self.find(row.medium, row.address, row.client_secret)
        assert stored is not None
        return stored

    async def replace(self, old_sid: int, row: ValidationSessionRow) -> ValidationSessionRow:
        """Delete session `old_sid` and create `row` in its place (expired or locked)."""
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(sessions).where(sessions.c.id == old_sid))
        return await self.create(row)

    async def touch(self, sid: int, mtime: int, send_attempt: int | None = None,
                    next_link: str | None = None) -> None:
        values: dict[str, object] = {"mtime": mtime}
        if send_attempt is not None:
            values["send_attempt"] = send_attempt
        if next_link is not None:
            values["next_link"] = next_link
        async with self._db.engine.begin() as conn:
            await conn.execute(update(sessions).where(sessions.c.id == sid).values(values))

    async def mark_validated(self, sid: int, now_ms: int, max_failures: int) -> bool:
        """Validate the session (keeping the first validation time) unless it is locked
        by `max_failures` wrong tokens; False if it was locked.  One statement, so a
        right guess racing wrong ones cannot slip past the bound."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(sessions)
                .where(sessions.c.id == sid, sessions.c.failed_attempts < max_failures)
                .values(validated_at=func.coalesce(sessions.c.validated_at, now_ms),
                        mtime=now_ms))
        return bool(result.rowcount)

    async def count_failure(self, sid: int) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(update(sessions).where(sessions.c.id == sid).values(
                failed_attempts=sessions.c.failed_attempts + 1))

    async def delete_older_than(self, mtime: int) -> int:
        """Delete the sessions last touched before `mtime`; how many went."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(delete(sessions).where(sessions.c.mtime < mtime))
        return int(result.rowcount)

    async def insert_many(self, rows: list[ValidationSessionRow]) -> None:
        """Add sessions whose id or (medium, address, client_secret) is not taken yet."""
        if not rows:
            return
        async with self._db.engine.begin() as conn:
            await conn.execute(self._insert_ignore, [
                {name: getattr(row, name) for name in ValidationSessionRow.__slots__}
                for row in rows])

    async def count(self) -> tuple[int, int]:
        """(sessions waiting for their token, sessions validated)."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(sessions.c.validated_at.is_(None), func.count())
                .group_by(sessions.c.validated_at.is_(None)))
            counts = {bool(waiting): int(n) for waiting, n in result}
        return counts.get(True, 0), counts.get(False, 0)
