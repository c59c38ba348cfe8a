"""Taking in a peer's push: every association checked, then all stored, or none.

Associations are taken in the order of their origin ids.  Each is checked against the
pushing peer's key before anything is written; one that fails refuses the whole push
(400 M_VERIFICATION_FAILED with the failing ids) and nothing of it is stored, unbinds
included.  The rest is written in one transaction, each association only if it is
newer than what is stored for its address (`AssociationStore.write_replicated`), then
made visible to lookups, and invites waiting here for a newly bound address are
delivered, as if it had been bound here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from kith.config import LOCAL
from kith.errors import M_BAD_JSON, M_TOO_LARGE, MatrixError
from kith.metrics import REPLICATION_RECEIVED
from kith.replication.peers import Peer
from kith.replication.wire import ReceivedAssociation, Unverified, verify
from kith.services.bindings import BindingService
from kith.services.index import AssociationIndex
from kith.store import AssociationRow, Store

log = logging.getLogger(__name__)

M_VERIFICATION_FAILED = "M_VERIFICATION_FAILED"
# Sydent pushes at most 100 at a time, and kith too; far more in one push is not a peer
# catching up but a body meant to make the receiver work.
MAX_ASSOCIATIONS_PER_PUSH = 1000


class ReplicationReceiver:
    def __init__(self, store: Store, index: AssociationIndex, bindings: BindingService) -> None:
        self._store = store
        self._index = index
        self._bindings = bindings

    async def receive(self, peer: Peer, pushed: Mapping[str, Any]) -> int:
        """Store the push `pushed` (origin id → signed association) from `peer`; how many
        associations were stored or found stored already."""
        if len(pushed) > MAX_ASSOCIATIONS_PER_PUSH:
            raise MatrixError(400, M_TOO_LARGE, f"More than {MAX_ASSOCIATIONS_PER_PUSH} "
                                                "associations in one push")
        ordered = sorted((_origin_id(key), key) for key in pushed)
        # Checking signatures costs CPU, not I/O: in a thread, so that a big push does
        # not hold up the lookups this process answers meanwhile.
        received, failed = await asyncio.to_thread(
            _verify_all, peer, [(origin_id, key, pushed[key]) for origin_id, key in ordered])
        if failed:
            log.warning("replication: refused a push of %d associations from %s: %d do not "
                        "verify (origin ids %s)", len(pushed), peer.name, len(failed),
                        ", ".join(failed[:10]))
            raise MatrixError(400, M_VERIFICATION_FAILED,
                              "Verification failed for one or more associations",
                              failed_ids=failed)
        usable = [r for r in received if r is not None]
        if len(usable) < len(received):
            log.warning("replication: %d associations from %s skipped: their address or "
                        "Matrix ID is not valid", len(received) - len(usable), peer.name)
        await self._store.associations.write_replicated([
            AssociationRow(source=LOCAL, medium=r.medium, address=r.address, mxid=r.mxid,
                           ts=r.ts, not_before=r.not_before, not_after=r.not_after,
                           lookup_hash=self._index.hash(r.medium, r.address),
                           origin_server=peer.name, origin_id=r.origin_id)
            for r in usable])
        await self._index.written()
        REPLICATION_RECEIVED.labels(peer.name).inc(len(usable))
        log.debug("replication: %d associations from %s stored", len(usable), peer.name)
        for association in usable:
            if association.mxid is not None:
                await self._bindings.deliver_invites_of(association.medium,
                                                        association.address)
        return len(usable)


def _origin_id(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise MatrixError(400, M_BAD_JSON, "The keys of sgAssocs must be the associations' "
                                           "integer ids") from None


def _verify_all(peer: Peer, items: list[tuple[int, str, Any]],
                ) -> tuple[list[ReceivedAssociation | None], list[str]]:
    received: list[ReceivedAssociation | None] = []
    failed: list[str] = []
    for origin_id, key, signed in items:
        try:
            received.append(verify(peer, origin_id, signed))
        except Unverified as exc:
            log.debug("replication: association %s from %s: %s", key, peer.name, exc)
            failed.append(key)
    return received, failed
