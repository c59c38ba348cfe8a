"""What a kith holds and how its queues and peers are doing: for `kith status` and for
the gauges every scrape refreshes.  Read from the store, so it is the same whichever
worker or instance asks, and works with no server running."""

from __future__ import annotations

from dataclasses import dataclass

from kith.config import KithConfig
from kith.metrics import BINDINGS, ONBIND_OLDEST_PENDING, ONBIND_QUEUE
from kith.replication.peers import ReplicationPeers
from kith.replication.status import PeerStatus, peer_statuses
from kith.services import lookup_table
from kith.services import pepper as pepper_keys
from kith.services.ldap_sync import SyncState, load_sync_state
from kith.store import Store
from kith.store.invites import GAVE_UP, PENDING, QueueCounts


@dataclass(frozen=True)
class ServerStatus:
    # "local" (bound here), "peer <name>" (replicated from that peer), "ldap" (synced)
    bindings: dict[str, int]
    sessions_waiting: int
    sessions_validated: int
    invites_pending: int
    onbind: dict[str, int]  # state (pending, done, gave_up) → deliveries
    onbind_oldest_pending_age_s: float | None
    peers: list[PeerStatus]
    ldap_configured: bool
    ldap_sync: SyncState | None
    # A change of the lookup pepper was begun and not finished (under way, or
    # interrupted until a server finishes it): every process holds an index for each
    # pepper meanwhile.
    pepper_change_unfinished: bool
    # When the periodic change of the pepper (`lookup_pepper.rotation`) is next due.
    pepper_change_due_ts: int | None
    # Whether this installation's lookup index has its compiled probe (kith/_probe.c),
    # or was installed without a C compiler and answers big indexes with numpy.
    compiled_probe: bool


def binding_sources(counts: dict[tuple[str, str | None], int]) -> dict[str, int]:
    named: dict[str, int] = {}
    for (source, origin), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        key = source if origin is None else f"peer {origin}"
        named[key] = named.get(key, 0) + n
    return named


def oldest_age_s(queue: QueueCounts, now_ms: int) -> float | None:
    if queue.oldest_pending_ts is None:
        return None
    return max(0, now_ms - queue.oldest_pending_ts) / 1000


async def server_status(config: KithConfig, store: Store, now_ms: int) -> ServerStatus:
    bindings = binding_sources(await store.associations.count_live())
    waiting, validated = await store.sessions.count()
    queue = await store.invites.counts()
    peers = await peer_statuses(store, await ReplicationPeers.load(config, store), now_ms)
    pepper = await store.state.get_many((pepper_keys.NEXT, pepper_keys.ROTATED_AT))
    period_s = config.general.lookup_pepper_rotation_s
    rotated_at = pepper.get(pepper_keys.ROTATED_AT)
    return ServerStatus(
        bindings=bindings, sessions_waiting=waiting, sessions_validated=validated,
        invites_pending=queue.invites_pending, onbind=queue.onbind,
        onbind_oldest_pending_age_s=oldest_age_s(queue, now_ms), peers=peers,
        ldap_configured=config.sources.ldap is not None,
        ldap_sync=await load_sync_state(store),
        pepper_change_unfinished=bool(pepper.get(pepper_keys.NEXT)),
        pepper_change_due_ts=int(rotated_at) + int(period_s * 1000)
        if period_s is not None and rotated_at else None,
        compiled_probe=lookup_table.COMPILED)


async def export_queue_gauges(store: Store, now_ms: int) -> None:
    """Set the onbind queue's gauges from the store (before a scrape is answered)."""
    queue = await store.invites.counts()
    for state in (PENDING, GAVE_UP):
        ONBIND_QUEUE.labels(state=state).set(queue.onbind.get(state, 0))
    ONBIND_OLDEST_PENDING.set(oldest_age_s(queue, now_ms) or 0)


def export_binding_gauges(sizes: dict[str, int]) -> None:
    for source, n in sizes.items():
        BINDINGS.labels(source=source).set(n)
