"""import-sydent takes over pending 3PID invites and their ephemeral keys."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from kith.config import DbConfig
from kith.services.sydent_import import import_sydent_db
from kith.store import Store
from tests.test_sydent_import_unit import make_sydent_db

INVITE_SCHEMA = """
CREATE TABLE invite_tokens (id integer primary key, medium varchar(16), address varchar(256),
  room_id varchar(256), sender varchar(256), token varchar(256), received_ts bigint,
  sent_ts bigint);
CREATE TABLE ephemeral_public_keys (id integer primary key, public_key varchar(256),
  verify_count bigint default 0, persistence_ts bigint);
"""


async def test_invites_and_ephemeral_keys_are_imported(tmp_path: Path) -> None:
    now_ms = int(time.time() * 1000)
    sydent_db = tmp_path / "sydent.db"
    make_sydent_db(sydent_db, now_ms)
    with sqlite3.connect(sydent_db) as conn:
        conn.executescript(INVITE_SCHEMA)
        conn.executemany("INSERT INTO invite_tokens VALUES (?,?,?,?,?,?,?,?)", [
            (1, "email", "Bob@Example.com", "!r:hs.test", "@alice:hs.test", "tokA", 100, None),
            (2, "email", "sent@example.com", "!r:hs.test", "@alice:hs.test", "tokB", 100,
             200)])
        conn.execute("INSERT INTO ephemeral_public_keys VALUES (1, 'pkA', 3, 100)")
    store = await Store.open(DbConfig(file=str(tmp_path / "kith.db")))
    try:
        await store.state.get_or_create("lookup_pepper", "kithpepper")
        for _ in range(2):  # idempotent
            report = await import_sydent_db(store, str(sydent_db), "sydent.test", now_ms)
            assert report.imported["invite tokens"] == 2
            assert report.imported["ephemeral invite keys"] == 1
        pending = await store.invites.get("tokA")
        assert pending is not None and pending.address == "bob@example.com"
        assert (pending.received_ts, pending.sent_ts) == (100_000, None)
        sent = await store.invites.get("tokB")
        assert sent is not None and sent.sent_ts == 200_000
        assert await store.invites.pending_threepids() == [("email", "bob@example.com")]
        assert await store.invites.count_ephemeral_key_check("pkA")
    finally:
        await store.close()
