"""Reading an existing Sydent database (sydent.db, schema version 5), never writing it.

The file (and its WAL or rollback journal, if any) is copied to a temporary directory and
the copy is read, so nothing about the Sydent installation changes, even its access times'
neighbours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The schema version (`PRAGMA user_version`) of Sydent 2.6.1's database; a newer Sydent
# may have changed what kith reads.
SYDENT_SCHEMA_VERSION = 5
# Tables only Sydent has (kith's are named differently), both there since Sydent's first
# schema: together they tell a Sydent database from any other.
SYDENT_TABLES = frozenset({"local_threepid_associations", "global_threepid_associations"})


def sydent_schema_problem(tables: set[str], user_version: int) -> str | None:
    """Why a database with these tables and `PRAGMA user_version` is not one kith can take
    over from Sydent, or None if it is."""
    if not SYDENT_TABLES <= tables:
        return "not a Sydent database"
    if user_version > SYDENT_SCHEMA_VERSION:
        return (f"a Sydent database of a newer schema (version {user_version}) than kith "
                f"knows ({SYDENT_SCHEMA_VERSION})")
    return None


@dataclass
class SydentPeer:
    name: str  # the peer's server name and certificate CN
    port: int | None
    active: bool
    keys: dict[str, str] = field(default_factory=dict)  # alg -> key as Sydent stored it
    # The id of Sydent's last local association the peer acknowledged (None: none).
    last_sent_version: int | None = None


# (id, medium, address, mxid, ts, not_before, not_after): a row of Sydent's local table,
# a tombstone when mxid is None (then not_before and not_after may be None too).
LocalRow = tuple[int, str, str, str | None, int, int | None, int | None]
# (origin server, origin id, medium, address, mxid, ts, not_before, not_after): a row of
# Sydent's global table that a peer replicated to it.
PeerRow = tuple[str, int, str, str, str | None, int, int | None, int | None]


@dataclass
class SydentData:
    path: str = ""  # the Sydent database read, absolute
    pepper: str | None = None
    # Sydent's own binds and unbinds, in id order
    local_associations: list[LocalRow] = field(default_factory=list)
    # the associations peers replicated to it
    peer_associations: list[PeerRow] = field(default_factory=list)
    accounts: list[tuple[str, int, str | None]] = field(default_factory=list)
    tokens: list[tuple[str, str]] = field(default_factory=list)  # (token, user_id)
    accepted_urls: list[tuple[str, str]] = field(default_factory=list)
    # (sid, medium, address, client_secret, validated, mtime, token, send_attempt)
    sessions: list[tuple[int, str, str, str, bool, int, str, int]] = field(
        default_factory=list)
    # (medium, address, room_id, sender, token, received_ts_s, sent_ts_s)
    invite_tokens: list[tuple[str, str, str, str, str, int | None, int | None]] = field(
        default_factory=list)
    ephemeral_public_keys: list[tuple[str, int, int | None]] = field(default_factory=list)
    peers: list[SydentPeer] = field(default_factory=list)


@contextlib.contextmanager
def _copy_of(path: str) -> Iterator[sqlite3.Connection]:
    with tempfile.TemporaryDirectory(prefix="kith-sydent-import-") as tmp:
        copy = Path(tmp) / "sydent.db"
        shutil.copyfile(path, copy)
        # A leftover rollback journal is rolled back in the copy, as SQLite would.
        for suffix in ("-wal", "-journal"):
            if Path(path + suffix).exists():
                shutil.copyfile(path + suffix, str(copy) + suffix)
        conn = sqlite3.connect(copy)
        try:
            yield conn
        finally:
            conn.close()


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _rows(conn: sqlite3.Connection, tables: set[str], table: str, sql: str,
          params: tuple[Any, ...] = ()) -> list[Any]:
    return conn.execute(sql, params).fetchall() if table in tables else []


def read_sydent_db(path: str, server_name: str) -> SydentData:
    """Everything kith takes over from a Sydent database (blocking; run in a thread)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Sydent database at {path}")
    data = SydentData(path=os.path.abspath(path))
    with _copy_of(path) as conn:
        tables = _tables(conn)
        problem = sydent_schema_problem(tables, conn.execute("PRAGMA user_version").fetchone()[0])
        if problem:
            raise ValueError(f"{path} is {problem}")
        pepper = _rows(conn, tables, "hashing_metadata",
                       "SELECT lookup_pepper FROM hashing_metadata")
        data.pepper = pepper[0][0] if pepper else None
        data.local_associations = _rows(
            conn, tables, "local_threepid_associations",
            "SELECT id, medium, address, mxid, ts, notBefore, notAfter "
            "FROM local_threepid_associations WHERE medium IS NOT NULL AND address IS NOT NULL "
            "AND ts IS NOT NULL ORDER BY id")
        data.peer_associations = _rows(
            conn, tables, "global_threepid_associations",
            "SELECT originServer, originId, medium, address, mxid, ts, notBefore, notAfter "
            "FROM global_threepid_associations WHERE originServer != ? AND originId IS NOT NULL "
            "AND medium IS NOT NULL AND address IS NOT NULL AND ts IS NOT NULL "
            "ORDER BY ts, originId", (server_name,))
        data.accounts = _rows(conn, tables, "accounts",
                              "SELECT user_id, created_ts, consent_version FROM accounts")
        data.tokens = _rows(conn, tables, "tokens", "SELECT token, user_id FROM tokens")
        data.accepted_urls = _rows(conn, tables, "accepted_terms_urls",
                                   "SELECT user_id, url FROM accepted_terms_urls")
        data.sessions = [
            (int(sid), medium, address, secret, bool(validated), int(mtime), token,
             int(attempt) if attempt is not None else -1)
            for sid, medium, address, secret, validated, mtime, token, attempt in _rows(
                conn, tables, "threepid_token_auths",
                "SELECT s.id, s.medium, s.address, s.clientSecret, s.validated, s.mtime, "
                "t.token, t.sendAttemptNumber FROM threepid_validation_sessions s "
                "JOIN threepid_token_auths t ON t.validationSession = s.id")]
        data.invite_tokens = _rows(
            conn, tables, "invite_tokens",
            "SELECT medium, address, room_id, sender, token, received_ts, sent_ts "
            "FROM invite_tokens")
        data.ephemeral_public_keys = _rows(
            conn, tables, "ephemeral_public_keys",
            "SELECT public_key, verify_count, persistence_ts FROM ephemeral_public_keys")
        keys: dict[str, dict[str, str]] = {}
        for name, alg, key in _rows(conn, tables, "peer_pubkeys",
                                    "SELECT peername, alg, key FROM peer_pubkeys ORDER BY id"):
            if name and alg and key:
                keys.setdefault(name, {})[alg] = key
        data.peers = [
            SydentPeer(name, int(port) if port is not None else None,
                       bool(active) if active is not None else True, keys.get(name, {}),
                       int(last) if last is not None else None)
            for name, port, active, last in _rows(
                conn, tables, "peers",
                "SELECT name, port, active, lastSentVersion FROM peers ORDER BY id")
            if name]
    return data
