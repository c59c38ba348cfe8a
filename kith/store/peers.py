"""Replication peers and their signing keys (taken over from Sydent for now)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

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
