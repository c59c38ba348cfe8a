"""Answering lookups: the in-memory index of lookup hashes, and the lookup rules.

Every lookup is answered from memory (a dict probe per address), never from a scan:
the index is built from the store at start, updated on every local write, and tails
the store's change cursor so writes by other processes and instances appear too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from kith.errors import M_INVALID_PEPPER, M_TOO_LARGE, MatrixError, invalid_param
from kith.services.coherence import ChangeCounter
from kith.services.threepid import MEDIUMS, lookup_hash, normalise_address
from kith.store import IndexChange, Store

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "none")


class AssociationIndex:
    """lookup hash → mxid for every live binding.

    `changes` is bumped after every local write; when another process bumps it, the next
    `refresh()` reads what changed from the store, so a bind acknowledged by any worker
    is visible to the lookups of every worker at once.
    """

    def __init__(self, store: Store, changes: ChangeCounter | None = None) -> None:
        self._store = store
        self._changes = changes or ChangeCounter()
        self._seen_changes = self._changes.value()
        self._mxid_by_hash: dict[str, str] = {}
        self.last_id = 0

    def __len__(self) -> int:
        return len(self._mxid_by_hash)

    def get(self, hash_: str) -> str | None:
        return self._mxid_by_hash.get(hash_)

    def set(self, hash_: str, mxid: str | None) -> None:
        """Record a committed local write (and tell the other processes)."""
        self._apply_one(hash_, mxid)
        self._changes.bump()
        self._seen_changes += 1

    def _apply_one(self, hash_: str, mxid: str | None) -> None:
        if mxid is None:
            self._mxid_by_hash.pop(hash_, None)
        else:
            self._mxid_by_hash[hash_] = mxid

    def apply(self, changes: Iterable[IndexChange]) -> None:
        for change in changes:
            self._apply_one(change.lookup_hash, change.mxid)
            if change.id > self.last_id:
                self.last_id = change.id

    async def load(self) -> None:
        """Fill the index from the store, then catch up on what changed meanwhile."""
        store = self._store
        self._seen_changes = self._changes.value()
        start = await store.associations.max_id()
        async for chunk in store.associations.stream_bound():
            for change in chunk:
                self._mxid_by_hash[change.lookup_hash] = change.mxid  # type: ignore[assignment]
        self.last_id = start
        await self.catch_up()

    async def catch_up(self) -> None:
        while True:
            changes = await self._store.associations.changes_since(self.last_id)
            if not changes:
                return
            self.apply(changes)

    async def refresh(self) -> None:
        """Catch up if another process of this server wrote since we last looked."""
        current = self._changes.value()
        if current != self._seen_changes:
            self._seen_changes = current
            await self.catch_up()

    async def follow(self, interval_s: float) -> None:
        """Apply changes by other writers (CLI, other instances) every `interval_s` s."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.catch_up()
            except Exception:
                log.warning("could not read association changes", exc_info=True)


class LookupService:
    def __init__(self, index: AssociationIndex, pepper: str, address_lookup_limit: int) -> None:
        self.index = index
        self.pepper = pepper
        self.limit = address_lookup_limit

    def hash_details(self) -> dict[str, object]:
        return {"algorithms": list(ALGORITHMS), "lookup_pepper": self.pepper}

    async def lookup(self, algorithm: str, pepper: str,
                     addresses: Sequence[str]) -> dict[str, str]:
        if algorithm not in ALGORITHMS:
            raise invalid_param(f"Unsupported algorithm: {algorithm!r}")
        if pepper != self.pepper:
            raise MatrixError(400, M_INVALID_PEPPER,
                              "Unknown or invalid pepper - has it been rotated?",
                              algorithm=algorithm, lookup_pepper=self.pepper)
        if len(addresses) > self.limit:
            raise MatrixError(400, M_TOO_LARGE,
                              f"More than the maximum of {self.limit} addresses in one lookup")
        await self.index.refresh()
        get = self.index.get
        mappings: dict[str, str] = {}
        if algorithm == "sha256":
            for address in addresses:
                mxid = get(address)
                if mxid is not None:
                    mappings[address] = mxid
            return mappings
        for query in addresses:
            hash_ = self._plain_to_hash(query)
            if hash_ is not None:
                mxid = get(hash_)
                if mxid is not None:
                    mappings[query] = mxid
        return mappings

    def _plain_to_hash(self, query: str) -> str | None:
        """"<address> <medium>" → the lookup hash of the normalised address."""
        address, _, medium = query.rpartition(" ")
        if medium not in MEDIUMS:
            return None
        normalised = normalise_address(medium, address)
        if normalised is None:
            return None
        return lookup_hash(medium, normalised, self.pepper)
