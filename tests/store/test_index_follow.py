"""The lookup index following the store: rows this process wrote and indexed itself are
stepped over, not read back, and never at the cost of another writer's row."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from kith.config import DbConfig
from kith.services.index import AssociationIndex
from kith.services.pepper import LookupPeppers
from kith.store import AssociationRow, Store
from kith.threepid import lookup_hash


class Process:
    """A Store and its index, as one worker or instance has them."""

    def __init__(self, store: Store, index: AssociationIndex, peppers: LookupPeppers) -> None:
        self.store, self.index, self.peppers = store, index, peppers

    async def bind(self, address: str, mxid: str) -> range | None:
        """As BindingService does: the row, then the index with the id the row took."""
        hashed = self.index.peppered_hash("email", address)
        ids = await self.store.associations.write([AssociationRow(
            "local", "email", address, mxid, 1, 1, 2, hashed.value)])
        self.index.set("email", address, mxid, hashed=hashed,
                       row_id=ids[0] if ids else None)
        return ids

    def answer(self, address: str) -> str | None:
        return self.index.source("local").get(
            lookup_hash("email", address, self.index.pepper))


@pytest.fixture
async def processes(db_config: DbConfig) -> AsyncIterator[list[Process]]:
    started = []
    for _ in range(2):
        store = await Store.open(db_config)
        index = AssociationIndex(store)
        peppers = LookupPeppers(store, index)
        await peppers.load()
        started.append(Process(store, index, peppers))
    yield started
    for process in started:
        await process.peppers.close()
        await process.store.close()


async def test_own_rows_are_stepped_over_without_reading_them(
        processes: list[Process]) -> None:
    a, _ = processes
    ids = [await a.bind(f"own{i}@example.org", f"@own{i}:hs.test") for i in range(5)]
    if a.store.db.dialect == "postgresql":  # ids are not known there: all is read
        assert ids == [None] * 5
        return
    assert all(ids)
    last = ids[-1][-1]  # type: ignore[index]
    # Gone from the store: only a catch-up that steps over it, unread, passes it.
    async with a.store.db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM threepid_associations WHERE id = :id"),
                           {"id": last})
    await a.index.catch_up()
    assert a.index.last_id == last
    assert a.answer("own4@example.org") == "@own4:hs.test"


async def test_another_writers_earlier_row_is_read_with_the_own_rows_after_it(
        processes: list[Process]) -> None:
    a, b = processes
    await b.bind("both@example.org", "@b:hs.test")  # before a's, unseen by a
    await b.bind("b@example.org", "@b:hs.test")
    await a.bind("both@example.org", "@a:hs.test")
    await a.bind("other@example.org", "@other:hs.test")
    await a.index.catch_up()
    assert a.answer("both@example.org") == "@a:hs.test"  # b's older row did not win
    assert a.answer("other@example.org") == "@other:hs.test"
    assert a.answer("b@example.org") == "@b:hs.test"
    await b.index.catch_up()
    assert b.answer("both@example.org") == "@a:hs.test"
    assert a.index.last_id == b.index.last_id == await a.store.associations.max_id()
