"""One process's part of the mesh: its peers, the listener's app, the pusher."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from kith.config import KithConfig
from kith.replication.listener import replication_app, tls_contexts
from kith.replication.peers import ReplicationPeers
from kith.replication.pusher import ReplicationPusher
from kith.replication.receiver import ReplicationReceiver
from kith.replication.status import keep_gauges
from kith.services import Services
from kith.store import Store

log = logging.getLogger(__name__)


@dataclass
class ReplicationNode:
    peers: ReplicationPeers
    app: web.Application
    server_tls: ssl.SSLContext
    pusher: ReplicationPusher

    @classmethod
    async def build(cls, config: KithConfig, store: Store,
                    services: Services) -> ReplicationNode | None:
        """None when replication is off (no `replication.https.certfile`)."""
        http = config.http
        if not http.replication_certfile:
            if config.peers:
                log.warning("[peer.*] sections are set but [http] replication.https.certfile "
                            "is not: this server does not replicate")
            return None
        server_tls, client_tls = await asyncio.to_thread(tls_contexts, http)
        peers = await ReplicationPeers.load(config, store)
        receiver = ReplicationReceiver(store, services.index, services.bindings)
        pusher = ReplicationPusher(store, services.keys, peers, client_tls,
                                   max_retry_interval_s=http.replication_max_retry_interval_s)
        services.bindings.on_change.append(pusher.wake)
        log.info("replication: %d peers: %s", len(peers), ", ".join(peers.names) or "none")
        return cls(peers, replication_app(peers, receiver), server_tls, pusher)

    def start(self, *, pushing: bool) -> list[asyncio.Task[None]]:
        """The background work: the gauges, and the pushes if this process is the one
        that pushes (`pushing`)."""
        tasks = [asyncio.create_task(keep_gauges(self.pusher.store, self.peers),
                                     name="kith-replication-gauges")]
        if pushing:
            tasks.append(asyncio.create_task(self.pusher.run(), name="kith-replication-push"))
        return tasks
