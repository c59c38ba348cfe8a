"""The store on SQLite and on PostgreSQL: migrations, associations, group commit,
accounts and server state."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, inspect, text

from kith.config import DbConfig
from kith.store import AssociationRow, Store
from kith.store.database import MIGRATIONS, DatabaseKind, inspect_sqlite
from kith.store.schema import metadata, server_state
from kith.store.sessions import ValidationSessionRow
from tests.conftest import wait_for

HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()
TABLES = {"threepid_associations", "accounts", "account_tokens", "accepted_terms_urls",
          "server_state", "alembic_version"}


def binding(address: str, mxid: str | None = "@alice:hs.test", *, ts: int = 1_000,
            source: str = "local", medium: str = "email") -> AssociationRow:
    """A bind of `address` to `mxid`, or a tombstone when `mxid` is None."""
    return AssociationRow(source=source, medium=medium, address=address, mxid=mxid, ts=ts,
                          not_before=ts, not_after=ts + 10**10,
                          lookup_hash=hashlib.sha256(address.encode()).hexdigest())


async def ids_by_address(store: Store) -> dict[str, int]:
    """Every row's id (bindings and tombstones), keyed by address."""
    async with store.db.engine.connect() as conn:
        rows = await conn.execute(text("SELECT address, id FROM threepid_associations"))
        return {address: row_id for address, row_id in rows}


# ------------------------------------------------------------------------- migrations

async def test_migrations_create_the_schema_and_are_idempotent(db_config: DbConfig) -> None:
    first = await Store.open(db_config)
    try:
        async with first.db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            head = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        assert TABLES <= tables
        assert head == HEAD
        await first.associations.write([binding("kept@example.com")])
    finally:
        await first.close()

    second = await Store.open(db_config)  # migrating again changes nothing
    try:
        row = await second.associations.get("local", "email", "kept@example.com")
        assert row is not None and row.mxid == "@alice:hs.test"
        async with second.db.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert [v[0] for v in versions] == [HEAD]
    finally:
        await second.close()


async def test_the_migrations_build_the_tables_the_code_declares(db_config: DbConfig) -> None:
    """schema.py and the migrations describe the same database: same tables, columns and
    indexes (an index dropped from one and not the other would show here)."""
    store = await Store.open(db_config)
    try:
        async with store.db.engine.connect() as conn:
            differences = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c), metadata))
    finally:
        await store.close()
    assert differences == []


# ----------------------------------------------------------------------- associations

async def test_write_stores_binds_and_tombstones(store: Store) -> None:
    bind = binding("bob@example.com", "@bob:hs.test", ts=5)
    await store.associations.write([bind])
    assert await store.associations.get("local", "email", "bob@example.com") == bind

    tombstone = binding("bob@example.com", None, ts=6)
    await store.associations.write([tombstone])
    assert await store.associations.get("local", "email", "bob@example.com") == tombstone


async def test_get_keys_on_source_medium_and_address(store: Store) -> None:
    await store.associations.write([binding("carol@example.com", source="local")])
    assert await store.associations.get("local", "email", "nobody@example.com") is None
    assert await store.associations.get("ldap", "email", "carol@example.com") is None
    assert await store.associations.get("local", "msisdn", "carol@example.com") is None
    assert await store.associations.get("local", "email", "carol@example.com") is not None


async def test_every_write_gets_a_new_larger_id(store: Store) -> None:
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        await store.associations.write([binding(address)])
    before = await store.associations.changes_since(0)
    assert [c.lookup_hash for c in before] == [binding(a).lookup_hash for a in
                                                ("a@example.com", "b@example.com",
                                                 "c@example.com")]
    assert [c.id for c in before] == sorted(c.id for c in before)
    assert len({c.id for c in before}) == 3
    old_a, last = before[0].id, before[-1].id

    await store.associations.write([binding("a@example.com", "@other:hs.test")])
    after = await store.associations.changes_since(0)
    assert [c.mxid for c in after] == ["@alice:hs.test", "@alice:hs.test", "@other:hs.test"]
    assert after[-1].id > last
    assert old_a not in {c.id for c in after}
    assert [c.id for c in after] == sorted(c.id for c in after)

    newer = await store.associations.changes_since(last)
    assert [(c.lookup_hash, c.mxid) for c in newer] == [
        (binding("a@example.com").lookup_hash, "@other:hs.test")]
    assert await store.associations.changes_since(after[-1].id) == []


async def test_changes_since_includes_tombstones_and_honours_limit(store: Store) -> None:
    await store.associations.write([binding(f"u{i}@example.com") for i in range(5)])
    await store.associations.write([binding("u0@example.com", None)])
    changes = await store.associations.changes_since(0)
    assert len(changes) == 5 and changes[-1].mxid is None
    first_two = await store.associations.changes_since(0, limit=2)
    assert first_two == changes[:2]


async def test_ids_go_past_32_bits(store: Store) -> None:
    await store.associations.write([binding("first@example.com")])
    big = 3_000_000_000
    async with store.db.engine.begin() as conn:
        if store.db.dialect == "postgresql":
            await conn.execute(text(
                "SELECT setval(pg_get_serial_sequence('threepid_associations', 'id'), :n)"),
                {"n": big})
        else:
            await conn.execute(text(
                "UPDATE sqlite_sequence SET seq = :n WHERE name = 'threepid_associations'"),
                {"n": big})
    await store.associations.write([binding("second@example.com")])
    await store.associations.write([binding("first@example.com", "@moved:hs.test")])
    ids = await ids_by_address(store)  # PostgreSQL sequences may skip values: ids only grow
    assert big < ids["second@example.com"] < ids["first@example.com"]
    assert await store.associations.max_id() == ids["first@example.com"]
    assert [c.id for c in await store.associations.changes_since(big)] == [
        ids["second@example.com"], ids["first@example.com"]]


async def test_stream_bound_yields_only_live_bindings(store: Store) -> None:
    await store.associations.write([binding(f"live{i}@example.com", f"@u{i}:hs.test")
                                    for i in range(5)])
    await store.associations.write([binding("gone@example.com"),
                                    binding("live4@example.com", None)])
    await store.associations.write([binding("gone@example.com", None)])
    await store.associations.write([binding("synced@example.com", "@s:hs.test",
                                            source="ldap")])
    chunks = [chunk async for chunk in store.associations.stream_bound(batch=2)]
    assert all(1 <= len(chunk.lookup_hashes) == len(chunk.mxids) <= 2 for chunk in chunks)
    bound = {(chunk.source, h): m for chunk in chunks
             for h, m in zip(chunk.lookup_hashes, chunk.mxids, strict=True)}
    assert bound == {
        **{("local", binding(f"live{i}@example.com").lookup_hash): f"@u{i}:hs.test"
           for i in range(4)},
        ("ldap", binding("synced@example.com").lookup_hash): "@s:hs.test"}


async def test_rehash_rewrites_every_live_row_up_to_the_id_it_is_given(store: Store) -> None:
    await store.associations.write([binding(f"u{i}@example.com", f"@u{i}:hs.test")
                                    for i in range(7)])
    await store.associations.write([binding("u6@example.com", None)])  # a tombstone
    upto = await store.associations.max_id()
    await store.associations.write([binding("late@example.com", "@late:hs.test")])

    def new_hash(medium: str, address: str) -> str:
        return f"new:{medium}:{address}"

    progress: list[tuple[int, int]] = []
    assert await store.associations.rehash(
        new_hash, upto, batch=2, progress=lambda *report: progress.append(report)) == 6
    ids = await ids_by_address(store)
    assert progress == [(2, ids["u1@example.com"]), (4, ids["u3@example.com"]),
                        (6, ids["u5@example.com"])]
    stored = {address: row.lookup_hash for address in
              [*(f"u{i}@example.com" for i in range(7)), "late@example.com"]
              if (row := await store.associations.get("local", "email", address))}
    assert stored == {**{f"u{i}@example.com": new_hash("email", f"u{i}@example.com")
                         for i in range(6)},
                      "u6@example.com": binding("u6@example.com").lookup_hash,
                      "late@example.com": binding("late@example.com").lookup_hash}


@pytest.mark.postgres
async def test_rehash_goes_on_after_losing_a_deadlock(postgresql_url: str) -> None:
    """Another transaction holds a row the rewrite's batch needs and then waits for one
    the batch holds: PostgreSQL aborts the rewrite's transaction (it waited first), and
    the rewrite runs the batch again."""
    store = await Store.open(DbConfig(url=postgresql_url))
    try:
        await store.associations.write([binding(f"u{i}@example.com", f"@u{i}:hs.test")
                                        for i in range(4)])
        ids = await ids_by_address(store)
        upto = await store.associations.max_id()

        async def rewrite_waits() -> bool:
            async with store.db.engine.connect() as conn:
                return bool((await conn.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"))).scalar())

        async with store.db.engine.connect() as other:
            await other.execute(text("SELECT id FROM threepid_associations WHERE id = :id "
                                     "FOR UPDATE"), {"id": ids["u3@example.com"]})
            rewrite = asyncio.create_task(store.associations.rehash(
                lambda medium, address: f"new:{address}", upto))
            await wait_for("the rewrite to wait for the held row", rewrite_waits)
            await other.execute(text("UPDATE threepid_associations SET ts = ts + 1 "
                                     "WHERE id = :id"), {"id": ids["u0@example.com"]})
            await other.commit()
        assert await asyncio.wait_for(rewrite, 30) == 4
        for i in range(4):
            row = await store.associations.get("local", "email", f"u{i}@example.com")
            assert row is not None and row.lookup_hash == f"new:u{i}@example.com"
    finally:
        await store.close()


async def test_stream_bound_on_an_empty_store(store: Store) -> None:
    assert [chunk async for chunk in store.associations.stream_bound()] == []


async def test_max_id(store: Store) -> None:
    assert await store.associations.max_id() == 0
    await store.associations.write([binding("x@example.com"), binding("y@example.com")])
    ids = await ids_by_address(store)
    assert await store.associations.max_id() == max(ids.values())
    await store.associations.write([binding("x@example.com", None)])
    newest = (await ids_by_address(store))["x@example.com"]
    assert newest > max(ids.values())
    assert await store.associations.max_id() == newest


# ----------------------------------------------------------------------- group commit

async def test_group_commit_500_concurrent_writes_are_all_durable(
        store: Store, db_config: DbConfig) -> None:
    rows = [binding(f"user{i}@example.com", f"@user{i}:hs.test", ts=i) for i in range(500)]
    await asyncio.gather(*(store.associations.write([r]) for r in rows))

    changes = await store.associations.changes_since(0, limit=1000)
    assert len(changes) == 500 and len({c.id for c in changes}) == 500

    other = await Store.open(db_config)  # what another process would read
    try:
        for r in rows:
            assert await other.associations.get("local", "email", r.address) == r
    finally:
        await other.close()


async def test_group_commit_one_failing_write_does_not_fail_the_others(store: Store) -> None:
    good = [binding(f"ok{i}@example.com", f"@ok{i}:hs.test") for i in range(20)]
    bad = AssociationRow(source="local", medium="email", address="bad@example.com",
                         mxid="@bad:hs.test", ts=1, not_before=1, not_after=2,
                         lookup_hash=None)  # type: ignore[arg-type]  # NOT NULL
    results = await asyncio.gather(
        *(store.associations.write([r]) for r in good[:10]),
        store.associations.write([bad]),
        *(store.associations.write([r]) for r in good[10:]),
        return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [10]
    for r in good:
        assert await store.associations.get("local", "email", r.address) == r
    assert await store.associations.get("local", "email", "bad@example.com") is None


async def test_group_commit_a_failing_statement_does_not_fail_the_batch(store: Store) -> None:
    await store.state.get_or_create("taken", "v")
    duplicate = insert(server_state)  # a plain insert: the primary key is taken
    good = [binding(f"n{i}@example.com") for i in range(10)]
    results = await asyncio.gather(
        store.associations.write(good[:5]),
        store.db.writer.execute(duplicate, [{"name": "taken", "value": "w"}]),
        store.associations.write(good[5:]),
        return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [1]
    assert len(await store.associations.changes_since(0)) == 10
    assert await store.state.get("taken") == "v"


async def test_group_commit_rewrites_of_one_address_in_a_batch_keep_the_last(
        store: Store) -> None:
    writes = [binding("same@example.com", f"@v{i}:hs.test", ts=i) for i in range(10)]
    await asyncio.gather(*(store.associations.write([w]) for w in writes))
    assert await store.associations.get("local", "email", "same@example.com") == writes[-1]
    assert [c.mxid for c in await store.associations.changes_since(0)] == ["@v9:hs.test"]


async def test_group_commit_says_which_ids_the_rows_of_a_write_took(store: Store) -> None:
    """On SQLite a write learns its rows' ids (the index then need not read them back);
    concurrent writes share a transaction, so each must get its own rows' ids."""
    writes = [[binding(f"i{i}-{j}@example.com") for j in range(i % 3 + 1)] for i in range(20)]
    writes.append([binding("i3-0@example.com", "@again:hs.test")])  # replaces a row
    results = await asyncio.gather(
        *(store.associations.write(rows) for rows in writes[:10]),
        store.db.writer.execute(  # another statement in the batch
            store.db.upsert(server_state, ["name"], ["value"]), [{"name": "b", "value": "v"}]),
        *(store.associations.write(rows) for rows in writes[10:]))
    ids = [r for i, r in enumerate(results) if i != 10]
    if store.db.dialect == "postgresql":
        assert ids == [None] * len(writes)
        return
    stored = {(c.address, c.mxid): c.id for c in await store.associations.changes_since(0)}
    ranges = [r for r in ids if isinstance(r, range)]
    assert len(ranges) == len(ids)
    taken = [i for rows in ranges for i in rows]
    assert len(set(taken)) == len(taken) == sum(len(rows) for rows in writes)
    for rows, row_ids in zip(writes, ranges, strict=True):
        assert len(row_ids) == len(rows)
        for row, row_id in zip(rows, row_ids, strict=True):
            if (row.address, row.mxid) in stored:
                assert stored[row.address, row.mxid] == row_id
    assert len(stored) == sum(len(rows) for rows in writes) - 1  # one replaced


# --------------------------------------------------------------------------- accounts

async def test_create_with_token_and_look_up_by_token_hash(store: Store) -> None:
    accounts = store.accounts
    await accounts.create_with_token("@alice:hs.test", "hash-1", 1000)
    await accounts.create_with_token("@alice:hs.test", "hash-2", 2000)  # a second token
    await accounts.create_with_token("@bob:hs.test", "hash-3", 3000)

    alice = await accounts.by_token_hash("hash-1")
    assert alice is not None
    assert (alice.user_id, alice.created_ts, alice.consent_version) == (
        "@alice:hs.test", 1000, None)
    assert await accounts.by_token_hash("hash-2") == alice
    bob = await accounts.by_token_hash("hash-3")
    assert bob is not None and bob.user_id == "@bob:hs.test"
    assert await accounts.by_token_hash("unknown") is None


async def test_create_with_a_taken_token_hash_fails(store: Store) -> None:
    await store.accounts.create_with_token("@alice:hs.test", "hash-1", 1000)
    with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError
        await store.accounts.create_with_token("@bob:hs.test", "hash-1", 2000)
    assert await store.accounts.by_token_hash("hash-1") is not None


async def test_delete_token(store: Store) -> None:
    await store.accounts.create_with_token("@alice:hs.test", "hash-1", 1000)
    await store.accounts.create_with_token("@alice:hs.test", "hash-2", 1000)
    await store.accounts.delete_token("hash-1")
    assert await store.accounts.by_token_hash("hash-1") is None
    assert await store.accounts.by_token_hash("hash-2") is not None
    await store.accounts.delete_token("hash-1")  # deleting again is harmless


async def test_accept_urls_is_idempotent_and_records_consent(store: Store) -> None:
    accounts = store.accounts
    await accounts.create_with_token("@alice:hs.test", "hash-1", 1000)
    assert await accounts.accepted_urls("@alice:hs.test") == set()

    await accounts.accept_urls("@alice:hs.test", ["https://a/1", "https://a/2"], None)
    await accounts.accept_urls("@alice:hs.test", ["https://a/2", "https://a/3"], None)
    await accounts.accept_urls("@alice:hs.test", ["https://a/1", "https://a/1"], None)
    assert await accounts.accepted_urls("@alice:hs.test") == {
        "https://a/1", "https://a/2", "https://a/3"}
    assert await accounts.accepted_urls("@bob:hs.test") == set()
    alice = await accounts.by_token_hash("hash-1")
    assert alice is not None and alice.consent_version is None

    await accounts.accept_urls("@alice:hs.test", [], "1.0")
    alice = await accounts.by_token_hash("hash-1")
    assert alice is not None and alice.consent_version == "1.0"
    await accounts.accept_urls("@alice:hs.test", ["https://a/4"], "2.0")
    alice = await accounts.by_token_hash("hash-1")
    assert alice is not None and alice.consent_version == "2.0"
    assert "https://a/4" in await accounts.accepted_urls("@alice:hs.test")


# ----------------------------------------------------------------------- server state

async def test_server_state_get_or_create_first_writer_wins(store: Store) -> None:
    state = store.state
    assert await state.get("lookup_pepper") is None
    assert await state.get_or_create("lookup_pepper", "first") == "first"
    assert await state.get_or_create("lookup_pepper", "second") == "first"
    assert await state.get("lookup_pepper") == "first"

    values = await asyncio.gather(*(state.get_or_create("race", f"v{i}") for i in range(10)))
    assert len(set(values)) == 1 and values[0] in {f"v{i}" for i in range(10)}
    assert await state.get("race") == values[0]


# ------------------------------------------------------------------ several processes

OPEN_AT = """
import asyncio, sys, time
from kith.config import DbConfig
from kith.store import Store

async def main() -> None:
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
    store = await Store.open(DbConfig(file=sys.argv[1], url=sys.argv[2]))
    await store.close()

asyncio.run(main())
"""


async def test_processes_starting_together_on_a_fresh_database_all_migrate(
        db_config: DbConfig) -> None:
    start_at = str(time.time() + 2.5)  # after every interpreter has imported kith
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", OPEN_AT, db_config.file, db_config.url, start_at,
        stderr=asyncio.subprocess.PIPE) for _ in range(4)]
    errors = [(await p.communicate())[1].decode(errors="replace")[-400:] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors


async def test_a_follower_misses_no_write_of_concurrent_writers(db_config: DbConfig) -> None:
    """Two writers (as two processes would) and one reader following `changes_since`:
    an id must never become visible after a larger one was read."""
    writers = [await Store.open(db_config) for _ in range(2)]
    follower = await Store.open(db_config)
    seen: set[int] = set()
    done = asyncio.Event()

    async def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            for change in await follower.associations.changes_since(cursor):
                seen.add(change.id)
                cursor = change.id
            if finished:
                return
            await asyncio.sleep(0)

    async def write(store: Store, name: str) -> None:
        for round_ in range(40):
            await asyncio.gather(*(store.associations.write([binding(f"{name}{round_}.{i}@x")])
                                   for i in range(10)))

    try:
        reader = asyncio.create_task(follow())
        await asyncio.gather(write(writers[0], "a"), write(writers[1], "b"))
        done.set()
        await reader
        all_ids = set((await ids_by_address(follower)).values())
        assert len(all_ids) == 800
        assert all_ids - seen == set()
    finally:
        for store in [*writers, follower]:
            await store.close()


async def test_sessions_older_than_a_time_are_deleted(store: Store) -> None:
    def session(n: int, mtime: int) -> ValidationSessionRow:
        return ValidationSessionRow(
            id=100 + n, medium="email", address=f"user{n}@example.com", client_secret="s",
            validated_at=None, mtime=mtime, next_link=None, send_attempt=1,
            token="t" * 32, failed_attempts=0)

    old = [await store.sessions.create(session(n, 1000 + n)) for n in range(3)]
    kept = await store.sessions.create(session(3, 5000))
    assert await store.sessions.delete_older_than(5000) == 3
    assert [await store.sessions.get(row.id) for row in old] == [None] * 3
    assert await store.sessions.get(kept.id) == kept
    assert await store.sessions.delete_older_than(5000) == 0


def _read_in_another_process(path: str) -> list[str]:
    """The addresses another process (the CLI, say) reads from a SQLite store."""
    out = subprocess.run(
        [sys.executable, "-c", "import sqlite3, sys; print('\\n'.join(a for (a,) in "
         "sqlite3.connect(sys.argv[1]).execute('SELECT address FROM threepid_associations "
         "ORDER BY id')))", path], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


async def test_another_process_opening_the_sqlite_file_loses_no_later_write(
        tmp_path: Path) -> None:
    # A process that closes its last connection to a WAL database checkpoints it and
    # deletes the WAL if it finds no other process holding the database open.  The store
    # must keep holding it (its SQLite locks) all along, or its later commits go to a WAL
    # no other process sees, and are lost if it is killed.
    path = str(tmp_path / "kith.db")
    store = await Store.open(DbConfig(file=path))
    try:
        await store.associations.write([binding("first@example.com")])
        assert _read_in_another_process(path) == ["first@example.com"]
        await store.associations.write([binding("second@example.com")])
        assert _read_in_another_process(path) == ["first@example.com", "second@example.com"]
    finally:
        await store.close()


async def test_a_database_a_server_is_writing_is_read_through_its_wal(tmp_path: Path) -> None:
    # What an offline command (kith status, forget, rotate-pepper, ...) sees of the store
    # of a running server: the schema and rows still in the WAL count.
    path = str(tmp_path / "kith.db")
    store = await Store.open(DbConfig(file=path))
    try:
        await store.associations.write([binding("first@example.com")])
        assert os.path.getsize(f"{path}-wal") > 0
        assert inspect_sqlite(path) == DatabaseKind.KITH
        other = await Store.open(DbConfig(file=path))
        try:
            assert await other.associations.max_id() == await store.associations.max_id()
        finally:
            await other.close()
    finally:
        await store.close()
