"""Changing the lookup pepper in a store shared by several processes (each one a Store,
an AssociationIndex and its LookupPeppers, as a worker or instance has)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import kith.services.pepper as pepper_module
from kith.config import DbConfig
from kith.services.index import AssociationIndex
from kith.services.pepper import (
    LookupPeppers,
    PepperRotation,
    RotationBusy,
    finish_interrupted,
    pepper_upkeep,
    read_record,
    rotate,
    rotate_when_due,
)
from kith.store import AssociationRow, Store
from kith.threepid import lookup_hash
from tests.conftest import wait_for


@dataclass
class Process:
    store: Store
    index: AssociationIndex
    peppers: LookupPeppers

    async def bind(self, address: str, mxid: str | None) -> None:
        """As BindingService does: stored hash by this process's pepper, then the index."""
        await self.store.associations.write([AssociationRow(
            "local", "email", address, mxid, 1, 1, 2, self.index.hash("email", address))])
        self.index.set("email", address, mxid)

    async def answer(self, pepper: str, address: str) -> str | None:
        assert await self.peppers.accepts(pepper)
        await self.index.catch_up()
        return self.index.source("local", pepper).get(lookup_hash("email", address, pepper))


@pytest.fixture
async def processes(db_config: DbConfig) -> AsyncIterator[list[Process]]:
    started: list[Process] = []

    async def start() -> Process:
        store = await Store.open(db_config)
        index = AssociationIndex(store)
        peppers = LookupPeppers(store, index)
        await peppers.load()
        process = Process(store, index, peppers)
        started.append(process)
        return process

    first = await start()
    for i in range(50):
        await first.bind(f"u{i}@example.org", f"@u{i}:hs.test")
    await start()
    yield started
    for process in started:
        await process.peppers.close()
        await process.store.close()


async def test_a_rotation_switches_every_process_with_no_wrong_answer(
        processes: list[Process]) -> None:
    a, b = processes
    old = a.index.pepper
    assert b.index.pepper == old
    rotation = await PepperRotation.begin(a.store)
    assert rotation is not None
    new = rotation.pepper
    # Both peppers answer in both processes once they looked at the store; the old one
    # is still announced.
    for p in (a, b):
        await p.peppers.sync()
        for pepper in (old, new):
            assert await p.answer(pepper, "u7@example.org") == "@u7:hs.test"
        assert p.index.pepper == old
    # Writes meanwhile, by either process, reach both indexes of both processes.
    await b.bind("late@example.org", "@late:hs.test")
    await a.bind("u3@example.org", None)
    for p in (a, b):
        for pepper in (old, new):
            assert await p.answer(pepper, "late@example.org") == "@late:hs.test"
            assert await p.answer(pepper, "u3@example.org") is None
    assert await rotation.complete() >= 50
    record = await read_record(a.store)
    assert (record.current, record.next) == (new, None)
    # b has not looked yet: it still announces and answers the old pepper, and it
    # answers a client that already has the new one.
    assert b.index.pepper == old
    assert await b.answer(old, "u9@example.org") == "@u9:hs.test"
    assert await b.answer(new, "u9@example.org") == "@u9:hs.test"
    for p in (a, b):
        await p.peppers.sync()
        assert p.index.pepper == new
        assert not await p.peppers.accepts(old)
        assert len(p.index) == 50  # 50 bound, u3 unbound, late bound
    # Stored hashes were rewritten: a process starting now loads them as they are.
    stored = await a.store.associations.get("local", "email", "u1@example.org")
    assert stored is not None and stored.lookup_hash == lookup_hash(
        "email", "u1@example.org", new)


async def test_a_process_starting_after_a_stale_write_hashes_it_itself(
        processes: list[Process], db_config: DbConfig) -> None:
    a, b = processes
    old = a.index.pepper
    assert await rotate(a.store)
    new = (await read_record(a.store)).current
    # b has not seen the change yet and writes with the old pepper's hash.
    await b.bind("stale@example.org", "@stale:hs.test")
    stored = await b.store.associations.get("local", "email", "stale@example.org")
    assert stored is not None and stored.lookup_hash == lookup_hash(
        "email", "stale@example.org", old)
    store = await Store.open(db_config)
    try:
        index = AssociationIndex(store)
        peppers = LookupPeppers(store, index)
        await peppers.load()
        assert index.pepper == new
        assert index.source("local").get(
            lookup_hash("email", "stale@example.org", new)) == "@stale:hs.test"
        assert index.source("local").get(
            lookup_hash("email", "u2@example.org", new)) == "@u2:hs.test"
        assert len(index) == 51
    finally:
        await store.close()


async def test_a_process_starting_mid_rotation_indexes_both(
        processes: list[Process], db_config: DbConfig) -> None:
    a, _ = processes
    old = a.index.pepper
    rotation = await PepperRotation.begin(a.store)
    assert rotation is not None
    store = await Store.open(db_config)
    index = AssociationIndex(store)
    peppers = LookupPeppers(store, index)
    try:
        await peppers.load()
        assert index.pepper == old
        for pepper in (old, rotation.pepper):
            assert await peppers.accepts(pepper)
            assert index.source("local", pepper).get(
                lookup_hash("email", "u5@example.org", pepper)) == "@u5:hs.test"
        await rotation.complete()
        await peppers.sync()
        assert index.pepper == rotation.pepper
    finally:
        await peppers.close()
        await store.close()


async def test_one_rotation_at_a_time(processes: list[Process]) -> None:
    a, b = processes
    rotation = await PepperRotation.begin(a.store)
    assert rotation is not None
    with pytest.raises(RotationBusy):
        await rotate(b.store, wait_s=0.3)
    await rotation.complete()
    assert await rotate(b.store, wait_s=0.3)  # let go once done
    current = (await read_record(b.store)).current
    assert not await rotate(b.store, current)  # to the pepper it already is: nothing


async def test_a_rotation_says_how_far_its_rewrite_got(
        processes: list[Process], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    a, _ = processes
    lines: list[str] = []
    assert await rotate(a.store, say=lines.append)
    assert lines == []  # done within PROGRESS_EVERY_S: nothing to say
    monkeypatch.setattr(pepper_module, "PROGRESS_EVERY_S", 0.0)
    assert await rotate(a.store, say=lines.append)
    assert lines == ["rewriting the stored lookup hashes: 50 rewritten, about 100% of the way"]
    with caplog.at_level(logging.INFO, logger="kith.services.pepper"):
        assert await rotate(a.store)  # nobody to tell: the log
    assert "rewriting the stored lookup hashes: 50 rewritten" in caplog.text


BEGIN_AND_DIE = """
import asyncio, os, sys
from kith.config import DbConfig
from kith.services.pepper import PepperRotation
from kith.store import Store

async def main():
    store = await Store.open(DbConfig(file=sys.argv[1], url=sys.argv[2]))
    await PepperRotation.begin(store)
    os._exit(0)  # as a `kith rotate-pepper` killed halfway: the next pepper stays named

asyncio.run(main())
"""


async def test_a_change_left_unfinished_is_finished_by_a_server(
        processes: list[Process], db_config: DbConfig) -> None:
    a, b = processes
    old = a.index.pepper
    died = subprocess.run([sys.executable, "-c", BEGIN_AND_DIE, db_config.file, db_config.url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert died.returncode == 0, died.stderr
    new = (await read_record(a.store)).next
    assert new is not None and new != old
    live = await PepperRotation.begin(a.store, new)  # while a live process makes it...
    assert live is not None
    assert await finish_interrupted(b.store) == 0  # ...it is left to that process
    await live.complete()
    assert await finish_interrupted(b.store) == 0  # nothing unfinished

    died = subprocess.run([sys.executable, "-c", BEGIN_AND_DIE, db_config.file, db_config.url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert died.returncode == 0, died.stderr
    unfinished = (await read_record(a.store)).next
    assert unfinished is not None
    assert await pepper_upkeep(b.store, None) == 1
    record = await read_record(a.store)
    assert (record.current, record.next) == (unfinished, None)
    for p in (a, b):
        assert await p.answer(unfinished, "u7@example.org") == "@u7:hs.test"
        await p.peppers.sync()
        assert p.index.pepper == unfinished
        assert not await p.peppers.accepts(old)


async def test_a_periodic_rotation_is_made_once_per_period(processes: list[Process]) -> None:
    a, b = processes
    assert await rotate_when_due(a.store, 3600) == 0  # the first period starts now
    before = await read_record(a.store)
    assert before.rotated_at is not None
    assert await rotate_when_due(b.store, 3600) == 0
    assert (await read_record(b.store)).current == before.current
    # A short period: one of the two rotates, then neither until it is over again.
    rotated = await wait_for("a rotation", lambda: rotate_when_due(a.store, 0.2), 10)
    assert rotated == 1
    assert await rotate_when_due(b.store, 3600) == 0
    after = await read_record(a.store)
    assert after.current != before.current and after.rotated_at is not None


async def test_a_write_hashed_before_the_pepper_changed_is_indexed_under_each_pepper(
        processes: list[Process]) -> None:
    a, _ = processes
    old = a.index.pepper
    hashed = a.index.peppered_hash("email", "late@example.org")  # before the commit
    rotation = await PepperRotation.begin(a.store)
    assert rotation is not None
    await a.peppers.sync()
    await wait_for("the new pepper indexed", lambda: a.index.holds(rotation.pepper))
    a.index.set("email", "late@example.org", "@late:hs.test", hashed=hashed)
    for pepper in (old, rotation.pepper):
        assert a.index.source("local", pepper).get(
            lookup_hash("email", "late@example.org", pepper)) == "@late:hs.test"
    await rotation.complete()
