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


async def test_a_start_loads_every_row_also_those_the_packing_cannot_carry(
        db_config: DbConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start reads the store in packed batches (hashes concatenated, mxids joined by
    newlines, by the database); a batch holding a stored hash of another length, an
    mxid with a newline or a hash twice is read row by row instead, so every other
    row of it is still indexed.  Small batches here: several of each kind, and sources
    mixed in them."""
    store = await Store.open(db_config)
    try:
        pepper = await store.state.get_or_create("lookup_pepper", "pepper")
        rows = []
        for i in range(300):
            source = "local" if i % 3 else "ldap"
            address = f"user{i}@example.org"
            mxid = f"@u{i}:hs.test"
            stored = lookup_hash("email", address, pepper)
            if i == 17:
                mxid = "@new\nline:hs.test"
            if i == 50:
                stored = stored[:-1]  # an imported hash of another length
            if i == 90:
                mxid = "@ü:hs.test"
            if i == 122:  # stored under the hash of the address before it, in its source
                stored = lookup_hash("email", "user121@example.org", pepper)
            rows.append(AssociationRow(source, "email", address, mxid, 1, 1, 2, stored))
        await store.associations.write(rows)
        await store.associations.write([AssociationRow(  # an unbind: not loaded
            "local", "email", "user1@example.org", None, 2, 2, 3,
            lookup_hash("email", "user1@example.org", pepper))])
        packed = store.associations.stream_bound_packed
        monkeypatch.setattr(store.associations, "stream_bound_packed",
                            lambda upto: packed(upto, batch=40))
        index = AssociationIndex(store, order=["local", "ldap"])
        peppers = LookupPeppers(store, index)
        await peppers.load()
        try:
            for i in range(300):
                source = "local" if i % 3 else "ldap"
                found = index.source(source, pepper).get(
                    lookup_hash("email", f"user{i}@example.org", pepper))
                want = {1: None, 17: "@new\nline:hs.test", 50: None, 90: "@ü:hs.test",
                        121: "@u122:hs.test", 122: None}.get(i, f"@u{i}:hs.test")
                assert found == want, i
        finally:
            await peppers.close()
    finally:
        await store.close()
