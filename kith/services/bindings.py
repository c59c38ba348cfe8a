"""Binding and unbinding 3PIDs to Matrix user IDs, and the signed association."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kith.errors import M_INVALID_PARAM, MatrixError
from kith.services.keys import ServerKeys
from kith.services.lookup import AssociationIndex
from kith.services.threepid import MEDIUMS, is_valid_mxid, lookup_hash, normalise_address
from kith.store import AssociationRow, Store

LOCAL = "local"
# Associations are valid for a century (as Sydent): they last until unbound.
VALIDITY_MS = 100 * 365 * 24 * 60 * 60 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def check_threepid(medium: str, address: str) -> str:
    """The normalised address, or a 400 naming what is wrong."""
    if medium not in MEDIUMS:
        raise MatrixError(400, M_INVALID_PARAM, f"Unsupported medium: {medium!r}")
    normalised = normalise_address(medium, address)
    if normalised is None:
        raise MatrixError(400, M_INVALID_PARAM, f"Invalid {medium} address")
    return normalised


def check_mxid(mxid: str) -> None:
    if not is_valid_mxid(mxid):
        raise MatrixError(400, M_INVALID_PARAM, "Invalid Matrix user ID")


class BindingService:
    def __init__(
        self,
        store: Store,
        index: AssociationIndex,
        keys: ServerKeys,
        pepper: str,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._index = index
        self._keys = keys
        self._pepper = pepper
        self._clock = clock

    async def bind(self, medium: str, address: str, mxid: str) -> dict[str, Any]:
        """Store the association durably, make it visible to lookups, return it signed."""
        address = check_threepid(medium, address)
        check_mxid(mxid)
        ts = self._clock()
        row = AssociationRow(
            source=LOCAL, medium=medium, address=address, mxid=mxid, ts=ts,
            not_before=ts, not_after=ts + VALIDITY_MS,
            lookup_hash=lookup_hash(medium, address, self._pepper),
        )
        await self._store.associations.write([row])
        self._index.set(row.lookup_hash, mxid)
        return self._keys.sign({
            "address": address, "medium": medium, "mxid": mxid,
            "not_before": row.not_before, "not_after": row.not_after, "ts": ts,
        })

    async def unbind(self, medium: str, address: str, mxid: str) -> bool:
        """Remove the association if `address` is bound to `mxid`; True if it was."""
        address = check_threepid(medium, address)
        check_mxid(mxid)
        current = await self._store.associations.get(LOCAL, medium, address)
        if current is None or current.mxid != mxid:
            return False
        ts = self._clock()
        tombstone = AssociationRow(
            source=LOCAL, medium=medium, address=address, mxid=None, ts=ts,
            not_before=ts, not_after=ts, lookup_hash=current.lookup_hash,
        )
        await self._store.associations.write([tombstone])
        self._index.set(tombstone.lookup_hash, None)
        return True
