"""import-sydent on a database in Sydent's schema: accounts, tokens, terms, edge cases."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from kith.config import DbConfig
from kith.config_peers import peer_key_b64
from kith.services.accounts import hash_token
from kith.services.sydent_import import import_sydent_db
from kith.store import ReplicationPeerRow, Store
from kith.threepid import lookup_hash

SCHEMA = """
CREATE TABLE local_threepid_associations (id integer primary key autoincrement,
  medium varchar(16) not null, address varchar(256) not null, mxid varchar(256),
  ts integer not null, notBefore bigint not null, notAfter bigint not null,
  lookup_hash varchar);
CREATE TABLE global_threepid_associations (id integer primary key autoincrement,
  medium varchar(16), address varchar(256), mxid varchar(256), ts integer,
  notBefore bigint, notAfter integer, originServer varchar(255), originId integer,
  sgAssoc text, lookup_hash varchar);
CREATE TABLE threepid_validation_sessions (id integer primary key, medium varchar(16),
  address varchar(256), clientSecret varchar(32), validated int default 0, mtime bigint);
CREATE TABLE threepid_token_auths (id integer primary key, validationSession integer,
  token varchar(32), sendAttemptNumber integer);
CREATE TABLE accounts (user_id text primary key, created_ts bigint,
  consent_version text);
CREATE TABLE tokens (token varchar(64) primary key, user_id text);
CREATE TABLE accepted_terms_urls (user_id text, url text);
CREATE TABLE hashing_metadata (id integer primary key, lookup_pepper text);
CREATE TABLE peers (id integer primary key, name varchar(255), port integer,
  lastSentVersion integer, lastPokeSucceededAt integer, active integer);
CREATE TABLE peer_pubkeys (id integer primary key, peername varchar(255),
  alg varchar(16), key text);
"""

PEER_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"  # unpadded standard base64
OTHER_KEY = bytes(range(100, 132))
OTHER_KEY_B64 = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM"



def make_sydent_db(path: Path, now_ms: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO hashing_metadata VALUES (0, 'SydPe')")
        conn.executemany(
            "INSERT INTO local_threepid_associations (medium, address, mxid, ts, notBefore,"
            " notAfter) VALUES (?, ?, ?, ?, ?, ?)", [
                ("email", "Alice@Example.com", "@alice:hs.test", 1000, 1000, 9000),
                ("email", "gone@example.com", None, 1000, 1000, 1000),  # a tombstone
                ("email", "not an address", "@x:hs.test", 1000, 1000, 9000),
                ("msisdn", "447700900123", "@phone:hs.test", 1000, 1000, 9000)])
        conn.execute("INSERT INTO global_threepid_associations (medium, address, mxid, ts,"
                     " originServer, originId) VALUES ('email', 'p@x.y', '@p:x.y', 1,"
                     " 'peer.test', 1)")
        conn.execute("INSERT INTO accounts VALUES ('@alice:hs.test', 1234, '1.1')")
        conn.execute("INSERT INTO tokens VALUES ('sydenttoken', '@alice:hs.test')")
        conn.execute("INSERT INTO accepted_terms_urls VALUES ('@alice:hs.test', 'https://t')")
        conn.executemany("INSERT INTO threepid_validation_sessions VALUES (?,?,?,?,?,?)", [
            (11, "email", "open@example.com", "sec", 0, now_ms - 1000),
            (12, "email", "old@example.com", "sec", 1, now_ms - 3 * 86400_000)])
        conn.executemany("INSERT INTO threepid_token_auths VALUES (?,?,?,?)", [
            (11, 11, "tok11", 1), (12, 12, "tok12", -1)])
        conn.execute("INSERT INTO peers VALUES (1, 'peer.test', 1001, 0, 0, 1)")
        conn.execute("INSERT INTO peers VALUES (2, 'old.test', NULL, 57, 0, 0)")
        conn.executemany("INSERT INTO peer_pubkeys VALUES (?, ?, ?, ?)", [
            (1, "peer.test", "ed25519", PEER_KEY_B64),
            (2, "old.test", "ed25519", OTHER_KEY.hex())])  # Sydent also accepts hex


async def test_import_sydent_database(tmp_path: Path) -> None:
    now_ms = int(time.time() * 1000)
    sydent_db = tmp_path / "sydent.db"
    make_sydent_db(sydent_db, now_ms)
    before = sydent_db.read_bytes()
    store = await Store.open(DbConfig(file=str(tmp_path / "kith.db")))
    try:
        await store.state.get_or_create("lookup_pepper", "kithpepper")
        report = await import_sydent_db(
            store, str(sydent_db), "sydent.test", now_ms,
            {"peer.test": "https://peer.test:1001/", "nowhere.test": "https://x"})
        assert report.imported["associations"] == 2
        assert report.imported["open validation sessions"] == 1
        assert any("invalid address" in n for n in report.notes)
        assert report.imported["associations replicated from peers"] == 1
        # peer.test (active) was sent nothing yet: the unbind still has to reach it.
        assert report.imported["unbinds not yet sent to every peer"] == 1
        assert report.imported["replication peers"] == 2
        assert not any("replication peers" in n for n in report.notes)
        assert await store.state.get("lookup_pepper") == "SydPe"
        alice = await store.associations.get("local", "email", "alice@example.com")
        assert alice is not None and alice.mxid == "@alice:hs.test" and alice.ts == 1000
        assert alice.lookup_hash == lookup_hash("email", "alice@example.com", "SydPe")
        gone = await store.associations.get("local", "email", "gone@example.com")
        assert gone is not None and gone.mxid is None and gone.origin_server is None
        replicated = await store.associations.get("local", "email", "p@x.y")
        assert replicated is not None and replicated.mxid == "@p:x.y"
        assert (replicated.origin_server, replicated.origin_id) == ("peer.test", 1)
        assert replicated.lookup_hash == lookup_hash("email", "p@x.y", "SydPe")
        own = await store.associations.own_ids()
        assert set(own) == {("email", "alice@example.com"), ("email", "gone@example.com"),
                            ("msisdn", "447700900123")}
        assert min(own.values()) > 4  # past Sydent's ids, which its peers know
        account = await store.accounts.by_token_hash(hash_token("sydenttoken"))
        assert account is not None and account.consent_version == "1.1"
        assert await store.accounts.accepted_urls("@alice:hs.test") == {"https://t"}
        session = await store.sessions.get(11)
        assert session is not None and session.token == "tok11" and session.send_attempt == 1
        assert await store.sessions.get(12) is None
        expected_peers = [
            # old.test had everything (Sydent's id 57): its cursor is kith's last own row.
            ReplicationPeerRow(name="old.test", port=None, base_replication_url=None,
                               active=False, last_sent_version=max(own.values()),
                               keys={"ed25519": OTHER_KEY_B64}),  # hex converted
            ReplicationPeerRow(name="peer.test", port=1001,
                               base_replication_url="https://peer.test:1001/", active=True,
                               last_sent_version=None, keys={"ed25519": PEER_KEY_B64})]
        assert await store.peers.all() == expected_peers
        # Idempotent: a second run changes nothing and fails on nothing.
        again = await import_sydent_db(store, str(sydent_db), "sydent.test", now_ms)
        assert again.imported["lookup pepper"] == 0
        assert len(await store.associations.live_threepids()) == 3
        assert again.imported["replication peers"] == 2
        assert await store.peers.all() == expected_peers
    finally:
        await store.close()
    assert sydent_db.read_bytes() == before


def test_peer_key_b64() -> None:
    assert peer_key_b64(OTHER_KEY_B64) == OTHER_KEY_B64
    assert peer_key_b64(OTHER_KEY_B64 + "=") == OTHER_KEY_B64  # padded
    assert peer_key_b64(OTHER_KEY.hex().upper()) == OTHER_KEY_B64
    assert peer_key_b64(PEER_KEY_B64) == PEER_KEY_B64
    assert peer_key_b64("not a key!") is None
    assert peer_key_b64("") is None
