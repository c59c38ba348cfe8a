"""Small named values the server keeps for itself (the lookup pepper, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
        await self.set_many({name: value})

    async def get_many(self, names: Iterable[str]) -> dict[str, str]:
        """The stored values of `names` (those that have one), read together."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(server_state.c.name, server_state.c.value)
                .where(server_state.c.name.in_(list(names))))
            return {name: value for name, value in result}

    async def set_many(self, values: Mapping[str, str]) -> None:
        """Store several values in one transaction: readers see all of them or none."""
        async with self._db.engine.begin() as conn:
            await conn.execute(self._db.upsert(server_state, ["name"], ["value"]),
                               [{"name": n, "value": v} for n, v in values.items()])
