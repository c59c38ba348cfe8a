"""Small named values the server keeps for itself (the lookup pepper, ...)."""

from __future__ import annotations

from sqlalchemy import select

from kith.store.database import Database
from kith.store.schema import server_state


class ServerStateStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, name: str) -> str | None:
        async with self._db.engine.connect() as conn:
            return (await conn.execute(
                select(server_state.c.value).where(server_state.c.name == name)
            )).scalar()

    async def get_or_create(self, name: str, value: str) -> str:
        """The stored value, or `value` stored now if there is none (first writer wins)."""
        async with self._db.engine.begin() as conn:
            await conn.execute(self._db.insert_or_ignore(server_state),
                               {"name": name, "value": value})
        stored = await self.get(name)
        assert stored is not None
        return stored

    async def set(self, name: str, value: str) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(self._db.upsert(server_state, ["name"], ["value"]),
                               {"name": name, "value": value})
