"""Who the replication peers are: the `[peer.<name>]` sections, and the peers taken over
from Sydent's database, put together once at start.

A peer's name is its server name: the name its associations are signed with, and the
common name of the certificate it connects with.  A section overrides what the database
says of the same peer; a database peer Sydent had marked inactive is no peer.  A peer
whose key is known nowhere is left out, with a warning (Sydent does the same).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from signedjson.key import decode_verify_key_bytes
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from kith.config import KithConfig, PeerConfig
from kith.config_peers import ED25519, peer_key_b64
from kith.store import ReplicationPeerRow, Store

log = logging.getLogger(__name__)

PUSH_PATH = "_matrix/identity/replicate/v1/push"
# Where a peer listens when nothing says: kith's and Sydent's replication.https.port.
DEFAULT_PORT = 4434
# Sydent's default for a database peer with neither a URL nor a port.
SYDENT_DEFAULT_PORT = 1001


@dataclass(frozen=True)
class Peer:
    name: str
    # The URL its pushes go to, and its base (what the logs name).
    push_url: str
    base_url: str
    verify_key: VerifyKey

    @property
    def key_id(self) -> str:
        return f"{self.verify_key.alg}:{self.verify_key.version}"


class ReplicationPeers:
    """The peers, by name."""

    def __init__(self, peers: list[Peer]) -> None:
        self._by_name = {peer.name: peer for peer in peers}

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Peer | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    @classmethod
    async def load(cls, config: KithConfig, store: Store) -> ReplicationPeers:
        stored = {row.name: row for row in await store.peers.all()}
        configured = {peer.name: peer for peer in config.peers}
        peers = []
        for name in sorted(set(stored) | set(configured)):
            peer = _peer(name, configured.get(name), stored.get(name))
            if peer is not None:
                peers.append(peer)
        return cls(peers)


def _peer(name: str, section: PeerConfig | None, row: ReplicationPeerRow | None) -> Peer | None:
    if section is None and row is not None and not row.active:
        return None
    url = (section.base_replication_url if section else "") or _stored_url(name, row)
    key, version = "", "0"
    if section is not None and section.public_key:
        key, version = section.public_key, section.key_version
    elif row is not None and row.keys.get(ED25519):
        key = peer_key_b64(row.keys[ED25519]) or ""
    if not key:
        log.warning("replication peer %s: no public key (set public_key in [peer.%s]); "
                    "it is neither pushed to nor accepted from", name, name)
        return None
    base = url if url.endswith("/") else url + "/"
    verify_key = decode_verify_key_bytes(f"{ED25519}:{version}", decode_base64(key))
    return Peer(name=name, push_url=base + PUSH_PATH, base_url=base, verify_key=verify_key)


def _stored_url(name: str, row: ReplicationPeerRow | None) -> str:
    if row is None:
        return f"https://{name}:{DEFAULT_PORT}/"
    if row.base_replication_url:
        return row.base_replication_url
    return f"https://{name}:{row.port or SYDENT_DEFAULT_PORT}/"
