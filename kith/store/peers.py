"""Replication peers: those taken over from Sydent with their keys, and every peer's push
state (what it acknowledged, when a push last worked or failed)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import or_, select, update

from kith.store.database import Database
from kith.store.schema import replication_peer_keys as peer_keys
from kith.store.schema import replication_peers as peers


@dataclass(frozen=True, slots=True)
class ReplicationPeerRow:
    name: str
    port: int | None
    base_replication_url: str | None
    active: bool
    last_sent_version: int | None = None
    # alg -> key (unpadded standard base64)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PushState:
    """Where pushing to one peer stands (times in ms; None: never)."""

    last_sent_version: int | None = None
    last_success_ts: int | None = None
    last_error: str | None = None
    last_error_ts: int | None = None


class ReplicationPeerStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert_peer = db.insert_or_ignore(peers)
        self._insert_key = db.insert_or_ignore(peer_keys)

    async def import_peers(self, rows: list[ReplicationPeerRow]) -> None:
        """Add the peers and keys that are not there yet (idempotent; an existing peer
        or (peer, alg) key is left as it is)."""
        keys = [{"name": r.name, "alg": alg, "key": key}
                for r in rows for alg, key in r.keys.items()]
        async with self._db.engine.begin() as conn:
            if rows:
                await conn.execute(self._insert_peer, [
                    {"name": r.name, "port": r.port,
                     "base_replication_url": r.base_replication_url, "active": r.active,
                     "last_sent_version": r.last_sent_version} for r in rows])
            if keys:
                await conn.execute(self._insert_key, keys)

    async def all(self) -> list[ReplicationPeerRow]:
        """Every peer with its keys, by name."""
        async with self._db.engine.connect() as conn:
            key_rows = await conn.execute(
                select(peer_keys.c.name, peer_keys.c.alg, peer_keys.c.key))
            keys: dict[str, dict[str, str]] = {}
            for name, alg, key in key_rows:
                keys.setdefault(name, {})[alg] = key
            rows = await conn.execute(
                select(peers.c.name, peers.c.port, peers.c.base_replication_url,
                       peers.c.active, peers.c.last_sent_version).order_by(peers.c.name))
            return [ReplicationPeerRow(name, port, url, bool(active), last, keys.get(name, {}))
                    for name, port, url, active, last in rows]

    # ------------------------------------------------------------------- push state

    async def track(self, names: Iterable[str]) -> None:
        """Make sure each peer has a row to keep its push state in (a configured peer
        starts with none: nothing acknowledged yet)."""
        rows = [{"name": name, "port": None, "base_replication_url": None, "active": True,
                 "last_sent_version": None} for name in names]
        if rows:
            async with self._db.engine.begin() as conn:
                await conn.execute(self._insert_peer, rows)

    async def push_states(self) -> dict[str, PushState]:
        async with self._db.engine.connect() as conn:
            rows = await conn.execute(select(
                peers.c.name, peers.c.last_sent_version, peers.c.last_success_ts,
                peers.c.last_error, peers.c.last_error_ts))
            return {name: PushState(*state) for name, *state in rows}

    async def acknowledged(self, name: str, last_id: int, now_ms: int) -> None:
        """The peer accepted every own change up to `last_id`.  The cursor only moves
        forward, whoever else pushed meanwhile."""
        async with self._db.engine.begin() as conn:
            await conn.execute(update(peers).where(
                peers.c.name == name,
                or_(peers.c.last_sent_version.is_(None), peers.c.last_sent_version < last_id),
            ).values(last_sent_version=last_id))
            await conn.execute(update(peers).where(peers.c.name == name)
                               .values(last_success_ts=now_ms))

    async def failed(self, name: str, error: str, now_ms: int) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(update(peers).where(peers.c.name == name)
                               .values(last_error=error[:1000], last_error_ts=now_ms))
