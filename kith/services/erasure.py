"""Forgetting a user or an address (`kith forget`): the right to erasure.

The store removes everything in one transaction (kith.store.erasure); this layer checks
the input, and afterwards makes the running views follow at once: this process's lookup
index and token cache, the other workers' (through the shared change counters), and the
replication pusher, which sends the tombstones of the server's own associations to its
peers.  Other processes and instances follow the store within a second anyway
(`AssociationIndex.follow`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kith.services.accounts import AccountService
from kith.services.index import AssociationIndex
from kith.store import Store
from kith.store.erasure import ErasureReport, ErasureStore
from kith.threepid import check_mxid, check_threepid, now_ms


class ErasureService:
    def __init__(self, store: Store, index: AssociationIndex, accounts: AccountService,
                 on_change: Sequence[Callable[[], None]] = (),
                 clock: Callable[[], int] = now_ms) -> None:
        self._erasure = ErasureStore(store.db)
        self._index = index
        self._accounts = accounts
        self._on_change = on_change
        self._clock = clock

    async def forget_user(self, mxid: str, *, dry_run: bool = False) -> ErasureReport:
        """Everything held about `mxid` and about the addresses bound to it."""
        check_mxid(mxid)
        return await self._forget(mxid, [], dry_run)

    async def forget_address(self, medium: str, address: str, *,
                             dry_run: bool = False) -> ErasureReport:
        """Everything held about one address (its binding, whoever it names)."""
        return await self._forget(None, [(medium, check_threepid(medium, address))],
                                  dry_run)

    async def _forget(self, mxid: str | None, threepids: list[tuple[str, str]],
                      dry_run: bool) -> ErasureReport:
        report = await self._erasure.forget(mxid, threepids, self._clock(),
                                            dry_run=dry_run)
        if dry_run or report.empty:
            return report
        if report.associations:
            await self._index.written()
            for listener in self._on_change:
                listener()
        if report.tokens:
            self._accounts.forget_cached_tokens()
        return report
