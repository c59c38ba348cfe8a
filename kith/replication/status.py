"""How far each peer is: for `kith peers` and the Prometheus gauges."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kith.metrics import (
    REPLICATION_ACKED_ID,
    REPLICATION_LAG_CHANGES,
    REPLICATION_LAG_SECONDS,
    REPLICATION_LAST_ERROR,
    REPLICATION_LAST_SUCCESS,
)
from kith.replication.peers import ReplicationPeers
from kith.store import PushState, Store
from kith.threepid import now_ms

log = logging.getLogger(__name__)

GAUGE_INTERVAL_S = 5.0


@dataclass(frozen=True)
class PeerStatus:
    name: str
    url: str
    acknowledged_id: int | None  # None: nothing yet
    # Own changes the peer has not acknowledged, and how long the oldest has waited (ms).
    behind: int
    lag_ms: int
    last_success_ts: int | None
    last_error: str | None
    last_error_ts: int | None


async def peer_statuses(store: Store, peers: ReplicationPeers, now_ms: int) -> list[PeerStatus]:
    states = await store.peers.push_states()
    statuses = []
    for peer in peers:
        state = states.get(peer.name, PushState())
        behind, oldest_ts = await store.associations.own_backlog(state.last_sent_version or 0)
        statuses.append(PeerStatus(
            name=peer.name, url=peer.base_url, acknowledged_id=state.last_sent_version,
            behind=behind, lag_ms=0 if oldest_ts is None else max(0, now_ms - oldest_ts),
            last_success_ts=state.last_success_ts, last_error=state.last_error,
            last_error_ts=state.last_error_ts))
    return statuses


def export(statuses: list[PeerStatus]) -> None:
    for s in statuses:
        REPLICATION_ACKED_ID.labels(s.name).set(s.acknowledged_id or 0)
        REPLICATION_LAG_CHANGES.labels(s.name).set(s.behind)
        REPLICATION_LAG_SECONDS.labels(s.name).set(s.lag_ms / 1000)
        REPLICATION_LAST_SUCCESS.labels(s.name).set((s.last_success_ts or 0) / 1000)
        REPLICATION_LAST_ERROR.labels(s.name).set((s.last_error_ts or 0) / 1000)


async def keep_gauges(store: Store, peers: ReplicationPeers,
                      interval_s: float = GAUGE_INTERVAL_S) -> None:
    """Every process refreshes the gauges from the store (a scrape may reach any worker,
    not only the one that pushes)."""
    while True:
        try:
            export(await peer_statuses(store, peers, now_ms()))
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.debug("replication gauges not refreshed: %s", exc)
        await asyncio.sleep(interval_s)
