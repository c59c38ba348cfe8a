"""`kith migrate-db`: an installation's SQLite store, with every kind of row, copied to
PostgreSQL while kith runs on it, interrupted once, resumed and verified; then kith
serves from PostgreSQL with the same answers, and the SQLite file was never written."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from kith.config import DbConfig
from kith.store import AssociationRow, ReplicationPeerRow, StoreError, migrate_db
from kith.store.database import database_url
from kith.store.schema import metadata, threepid_associations
from kith.threepid import lookup_hash, now_ms
from tests.conftest import KithFactory, RunningKith, SmtpSink, wait_for

pytestmark = pytest.mark.postgres

V2 = "/_matrix/identity/v2"


class Interrupted(Exception):
    pass


async def call(kith: RunningKith, method: str, path: str, body: Any = None,
               token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with kith.http.request(method, kith.base + path, json=body,
                                 headers=headers) as resp:
        return resp.status, await resp.json()


async def fill(kith: RunningKith, smtp: SmtpSink) -> str:
    """Every kind of row, through the API where a client would make it; returns a token."""
    store = kith.server.store
    assert store is not None
    token = await kith.register("alice")
    await store.accounts.accept_urls("@alice:hs.test", ["https://terms.test/v1"], "1.0")
    for i in range(7):
        await kith.bind(f"user{i}@example.com", f"@user{i}:hs.test")
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "user0@example.com",
            "mxid": "@user0:hs.test"}) as resp:
        assert resp.status == 200
    status, body = await call(kith, "POST", f"{V2}/validate/email/requestToken", {
        "client_secret": "s3cret", "email": "carol@example.com", "send_attempt": 1}, token)
    assert status == 200, body
    for room in ("!one:hs.test", "!two:hs.test", "!three:hs.test"):
        status, body = await call(kith, "POST", f"{V2}/store-invite", {
            "medium": "email", "address": f"{room[1:4]}@example.com", "room_id": room,
            "sender": "@alice:hs.test"}, token)
        assert status == 200, body
    await kith.bind("one@example.com", "@one:hs.test")  # an onbind delivery
    await wait_for("the onbind", lambda: kith.homeserver.onbinds)
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    ts = now_ms()
    await store.associations.write([AssociationRow(
        "ldap", "email", "dir@example.com", "@dir:hs.test", ts, ts, 2**62,
        lookup_hash("email", "dir@example.com", pepper))])
    await store.associations.write_replicated([AssociationRow(
        "local", "email", "far@example.com", "@far:peer.test", ts, ts, 2**62,
        lookup_hash("email", "far@example.com", pepper), "peer.test", 41)])
    await store.peers.import_peers([ReplicationPeerRow(
        "peer.test", 4434, "https://peer.test:4434", True, None, {"ed25519": "a" * 43})])
    await store.peers.acknowledged("peer.test", 3, ts)
    return token


async def table_rows(db: DbConfig) -> dict[str, set[tuple[Any, ...]]]:
    """Every row of every table, as the store's column types read them."""
    engine = create_async_engine(database_url(db))
    try:
        async with engine.connect() as conn:
            return {t.name: {tuple(r) for r in await conn.execute(select(t))}
                    for t in metadata.sorted_tables}
    finally:
        await engine.dispose()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_migrate_db_copies_resumes_and_verifies(
        postgresql_url: str, kith_factory: KithFactory, smtp: SmtpSink,
        tmp_path: Path) -> None:
    email = {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}
    old = await kith_factory({"email": email}, name="old")
    token = await fill(old, smtp)
    db_file = Path(old.config.db.file).resolve()
    sqlite, target = DbConfig(file=str(db_file), url=""), DbConfig(file="", url=postgresql_url)
    source_rows = await table_rows(sqlite)
    empty = [name for name, rows in source_rows.items() if not rows]
    assert not empty, f"tables without a row to migrate: {empty}"
    sources = {(r[1], r[4] is None, r[9] is not None)
               for r in source_rows["threepid_associations"]}
    assert sources == {("local", False, False), ("local", True, False),
                       ("ldap", False, False), ("local", False, True)}

    # A first run, while kith serves from the file, is interrupted after one chunk.
    chunks: list[int] = []

    def interrupt(table: str, rows: int) -> None:
        chunks.append(rows)
        raise Interrupted

    with pytest.raises(Interrupted):
        await migrate_db.migrate(str(db_file), postgresql_url, progress=interrupt,
                                 chunk_rows=3)
    partial = (await table_rows(target))["threepid_associations"]
    assert 0 < len(partial) < len(source_rows["threepid_associations"])

    # kith goes on writing: a copied row is rewritten (new id), a new one added.
    async with old.http.post(f"{old.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "user1@example.com",
            "mxid": "@user1:hs.test"}) as resp:
        assert resp.status == 200
    await old.bind("late@example.com", "@late:hs.test")
    await old.server.stop()
    before = file_digest(db_file)

    # The resumed run (the command an operator types) copies the rest and verifies.
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "kith", "--config", old.config.path, "migrate-db",
        postgresql_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    assert f"db.url = {postgresql_url}" in done.stdout
    assert "verified" in done.stdout
    copied = [line for line in done.stdout.splitlines()
              if "threepid_associations:" in line and "rows copied" in line]
    assert copied and int(copied[-1].split()[1]) < len(source_rows["threepid_associations"])
    assert file_digest(db_file) == before  # the SQLite file was only read

    # Every table holds what the SQLite store holds, ids included; a run with nothing
    # new to copy finds it so.
    final = await table_rows(sqlite)
    assert await table_rows(target) == final
    again = await migrate_db.migrate(str(db_file), postgresql_url)
    assert again.ok and again.source_checksum == again.target_checksum

    # kith on PostgreSQL: the same pepper, key, token and answers; new ids come after.
    new = await kith_factory({"email": email, "db": {"db.url": postgresql_url},
                              "crypto": {"ed25519.signingkey": old.config.crypto.signing_key}},
                             name="new")
    assert new.server.services is not None
    assert new.server.services.lookup.pepper == old.server.services.lookup.pepper
    status, body = await call(new, "GET", f"{V2}/account", token=token)
    assert (status, body) == (200, {"user_id": "@alice:hs.test"})
    addresses = [f"user{i}@example.com" for i in range(7)] + [
        "one@example.com", "far@example.com", "late@example.com", "two@example.com"]
    found = await new.lookup(token, "none", [f"{a} email" for a in addresses])
    assert found == {f"user{i}@example.com email": f"@user{i}:hs.test" for i in range(2, 7)} | {
        "one@example.com email": "@one:hs.test", "far@example.com email": "@far:peer.test",
        "late@example.com email": "@late:hs.test"}
    assert new.server.store is not None
    largest = max(r[0] for r in final["threepid_associations"])
    await new.bind("newer@example.com", "@newer:hs.test")
    row = await new.server.store.associations.get("local", "email", "newer@example.com")
    engine = create_async_engine(database_url(target))
    try:
        async with engine.connect() as conn:
            new_id = (await conn.execute(select(threepid_associations.c.id).where(
                threepid_associations.c.address == "newer@example.com"))).scalar()
            invite_id = (await conn.execute(text(
                "SELECT nextval(pg_get_serial_sequence('invite_tokens', 'id'))"))).scalar()
    finally:
        await engine.dispose()
    assert row is not None and new_id is not None and new_id > largest
    assert invite_id is not None and invite_id > max(
        r[0] for r in source_rows["invite_tokens"])


async def test_migrate_db_refuses_another_installations_store(
        postgresql_url: str, kith_factory: KithFactory) -> None:
    old = await kith_factory(name="old")
    await old.bind("mine@example.com", "@mine:hs.test")
    other = await kith_factory({"db": {"db.url": postgresql_url}}, name="other")
    await other.bind("theirs@example.com", "@theirs:hs.test")
    await other.server.stop()
    with pytest.raises(StoreError, match="--from-scratch"):
        await migrate_db.migrate(old.config.db.file, postgresql_url)
    result = await migrate_db.migrate(old.config.db.file, postgresql_url, from_scratch=True)
    assert result.ok
    rows = await table_rows(DbConfig(file="", url=postgresql_url))
    assert {r[3] for r in rows["threepid_associations"]} == {"mine@example.com"}
