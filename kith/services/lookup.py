"""Answering lookups: the in-memory index of lookup hashes, and the lookup rules.

Every lookup is answered from memory (a dict probe per address), never from a scan:
the index is built from the store at start, updated on every local write, and tails
the store's change cursor so writes by other processes and instances appear too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kith.config import DEFAULT_PRECEDENCE, LDAP, LOCAL
from kith.errors import M_INVALID_PEPPER, M_TOO_LARGE, MatrixError, invalid_param
from kith.metrics import LOOKUP_ADDRESSES
from kith.services.coherence import ChangeCounter, StoreContact
from kith.services.limits import LookupBudget, Requester
from kith.services.lookup_table import LookupTable
from kith.sources.errors import LdapError
from kith.store import IndexChange, Store
from kith.threepid import Threepid, lookup_hash, normalise_address, parse_plain_query

if TYPE_CHECKING:
    from kith.sources.ldap import LdapDirectory
    from kith.sources.upstream import UpstreamIdentityServer

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "none")


class AssociationIndex:
    """lookup hash → mxid for every live association, one map per source.

    Sources are kept apart ('local' bindings, 'ldap' synced rows, ...) because the same
    address may be stored by several and the lookup rules decide which one answers.
    `changes` is bumped after every local write; when another process bumps it, the next
    `refresh()` reads what changed from the store, so a bind acknowledged by any worker
    is visible to the lookups of every worker at once.
    """

    def __init__(self, store: Store, changes: ChangeCounter | None = None,
                 order: Sequence[str] = (LDAP, LOCAL)) -> None:
        self._store = store
        self._changes = changes or ChangeCounter()
        self._seen_changes = self._changes.value()
        self._order = tuple(order)
        self._by_source = {source: LookupTable() for source in self._order}
        self.last_id = 0
        self.contact = StoreContact()

    def __len__(self) -> int:
        return sum(len(mxids) for mxids in self._by_source.values())

    def source(self, source: str) -> LookupTable:
        """The map of one source (read only, for probing in a chosen order)."""
        table = self._by_source.get(source)
        if table is None:
            table = self._by_source[source] = LookupTable()
        return table

    def get(self, hash_: str, source: str | None = None) -> str | None:
        """The mxid of `hash_` in `source`, or in the first source (index order) having it."""
        if source is not None:
            return self.source(source).get(hash_)
        for mxids in self._by_source.values():
            mxid = mxids.get(hash_)
            if mxid is not None:
                return mxid
        return None

    def set(self, hash_: str, mxid: str | None, source: str = LOCAL) -> None:
        """Record a committed local write (and tell the other processes)."""
        self.source(source).set(hash_, mxid)
        self._changes.bump()
        self._seen_changes += 1

    def set_many(self, source: str, entries: Iterable[tuple[str, str | None]]) -> None:
        """Record many committed writes of one source, telling the other processes once."""
        self.source(source).update(entries)
        self._changes.bump()
        self._seen_changes += 1

    async def written(self) -> None:
        """Take in writes this process committed without `set`ting them (associations
        replicated from a peer, which keep a row only if newer): read them from the store,
        and tell the other processes."""
        await self.catch_up()
        self._changes.bump()
        self._seen_changes += 1

    def apply(self, changes: Iterable[IndexChange]) -> None:
        by_source: dict[str, list[tuple[str, str | None]]] = {}
        for change in changes:
            by_source.setdefault(change.source, []).append((change.lookup_hash, change.mxid))
            if change.id > self.last_id:
                self.last_id = change.id
        for source, entries in by_source.items():
            self.source(source).update(entries)

    async def load(self) -> None:
        """Fill the index from the store, then catch up on what changed meanwhile."""
        store = self._store
        self._seen_changes = self._changes.value()
        start = await store.associations.max_id()
        for source, count in (await store.associations.count_bound()).items():
            self.source(source).reserve(count)
        async for chunk in store.associations.stream_bound():
            self.source(chunk.source).update(zip(chunk.lookup_hashes, chunk.mxids,
                                                 strict=True))
        self.last_id = start
        await self.catch_up()

    async def catch_up(self) -> None:
        self.contact.reading()
        try:
            while True:
                changes = await self._store.associations.changes_since(self.last_id)
                if not changes:
                    break
                self.apply(changes)
        except Exception as exc:
            self.contact.failed(exc)
            raise
        self.contact.succeeded()

    async def refresh(self) -> None:
        """Catch up if another process of this server wrote since we last looked; 503
        M_UNKNOWN if the index may be missing other instances' writes (`StoreContact`)."""
        self.contact.check()
        current = self._changes.value()
        if current != self._seen_changes:
            self._seen_changes = current
            await self.catch_up()

    async def follow(self, interval_s: float) -> None:
        """Apply changes by other writers (CLI, other instances) every `interval_s` s."""
        self.contact.following()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.catch_up()
            except Exception:
                log.debug("could not read association changes", exc_info=True)


class LookupService:
    """The lookup rules, in one place: which source answers which address.

    Sources are probed in `precedence` order (by default LDAP, then local bindings,
    then the upstream identity server) and each address is answered by the first source
    that maps it, never by two.  sha256 lookups are answered from the index (synced LDAP
    rows and local bindings); plain-text ones ask the directory live and, for what is
    still unresolved, the upstream.  A failing directory or upstream costs its own part
    of the answer only.
    """

    def __init__(self, index: AssociationIndex, pepper: str, address_lookup_limit: int, *,
                 precedence: Sequence[str] = DEFAULT_PRECEDENCE,
                 directory: LdapDirectory | None = None,
                 upstream: UpstreamIdentityServer | None = None,
                 budget: LookupBudget | None = None) -> None:
        self.index = index
        self.budget = budget
        self.pepper = pepper
        self.limit = address_lookup_limit
        self.precedence = tuple(precedence)
        self.directory = directory
        self.upstream = upstream
        # Addresses answered, per source: kith_lookup_addresses_total{source}.
        self.answered = {source: LOOKUP_ADDRESSES.labels(source) for source in self.precedence}

    async def close(self) -> None:
        if self.directory is not None:
            await self.directory.close()
        if self.upstream is not None:
            await self.upstream.close()

    def hash_details(self) -> dict[str, object]:
        return {"algorithms": list(ALGORITHMS), "lookup_pepper": self.pepper}

    async def lookup(self, algorithm: str, pepper: str, addresses: Sequence[str],
                     requester: Requester | None = None) -> dict[str, str]:
        """The mappings of the addresses that are bound; each address asked counts
        against the requester's lookup budget (429 M_LIMIT_EXCEEDED when spent)."""
        if algorithm not in ALGORITHMS:
            raise invalid_param(f"Unsupported algorithm: {algorithm!r}")
        if pepper != self.pepper:
            raise MatrixError(400, M_INVALID_PEPPER,
                              "Unknown or invalid pepper - has it been rotated?",
                              algorithm=algorithm, lookup_pepper=self.pepper)
        if len(addresses) > self.limit:
            raise MatrixError(400, M_TOO_LARGE,
                              f"More than the maximum of {self.limit} addresses in one lookup")
        if requester is not None and self.budget is not None:
            self.budget.spend(len(addresses), requester)
        await self.index.refresh()
        if algorithm == "sha256":
            return self._lookup_hashes(addresses)
        queries: dict[Threepid, list[str]] = {}
        for query in addresses:
            threepid = parse_plain_query(query)
            if threepid is not None:
                queries.setdefault(threepid, []).append(query)
        mappings: dict[str, str] = {}
        for threepid, (mxid, _source) in (await self._resolve_many(list(queries))).items():
            for query in queries[threepid]:
                mappings[query] = mxid
        return mappings

    async def resolve(self, medium: str, address: str, *,
                      include_upstream: bool = False) -> tuple[str, str] | None:
        """(mxid, source) of an address by the lookup rules, or None.

        For store-invite (M_THREEPID_IN_USE) and bind checks: by default the upstream is
        not asked, since an address bound on another server is not in use here.
        """
        normalised = normalise_address(medium, address)
        if normalised is None:
            return None
        threepid = Threepid(medium, normalised)
        await self.index.refresh()
        found = await self._resolve_many([threepid], include_upstream=include_upstream,
                                         count=False)
        return found.get(threepid)

    def _lookup_hashes(self, hashes: Sequence[str]) -> dict[str, str]:
        # The hot path: one dict probe per address and source, counted once per request.
        sources = [source for source in self.precedence if self._serves_hashes(source)]
        mappings: dict[str, str] = {}
        remaining = hashes
        for i, source in enumerate(sources):
            found = self.index.source(source).find(remaining)
            if not found:
                continue
            self.answered[source].inc(len(found))
            if not mappings:
                mappings = found
            else:
                mappings.update(found)  # disjoint: `remaining` left out earlier answers
            if i + 1 < len(sources):
                remaining = [h for h in remaining if h not in mappings]
        return mappings

    def _serves_hashes(self, source: str) -> bool:
        # Synced LDAP rows count only while LDAP is configured; upstream hashes use
        # another pepper, so sha256 lookups are never proxied.
        return source == LOCAL or (source == LDAP and self.directory is not None)

    async def _resolve_many(self, threepids: list[Threepid], *, include_upstream: bool = True,
                            count: bool = True) -> dict[Threepid, tuple[str, str]]:
        found: dict[Threepid, tuple[str, str]] = {}
        for source in self.precedence:
            unresolved = [t for t in threepids if t not in found]
            if not unresolved:
                break
            if source == LDAP:
                answers = await self._from_directory(unresolved)
            elif source == LOCAL:
                answers = self._from_index(LOCAL, unresolved)
            elif include_upstream and self.upstream is not None:
                answers = await self.upstream.lookup(unresolved)
            else:
                continue
            for threepid, mxid in answers.items():
                found[threepid] = (mxid, source)
            if answers:
                log.debug("lookup: %d of %d addresses answered by %s",
                          len(answers), len(unresolved), source)
                if count:
                    self.answered[source].inc(len(answers))
        return found

    async def _from_directory(self, threepids: list[Threepid]) -> dict[Threepid, str]:
        if self.directory is None:
            return {}
        try:
            answers = await self.directory.lookup(threepids)
        except LdapError as exc:
            # The directory says when it fails and when it answers again, not per lookup.
            log.debug("LDAP lookup failed, answering from the last sync: %s", exc)
            return self._from_index(LDAP, threepids)
        # A search matches values as the directory stores them; the synced copy holds
        # them normalised (e.g. "+1 (415) 555-0100"), so it answers what a search missed.
        missed = [t for t in threepids if t not in answers]
        if missed:
            answers.update(self._from_index(LDAP, missed))
        return answers

    def _from_index(self, source: str, threepids: list[Threepid]) -> dict[Threepid, str]:
        mxids = self.index.source(source)
        answers: dict[Threepid, str] = {}
        for threepid in threepids:
            mxid = mxids.get(lookup_hash(threepid.medium, threepid.address, self.pepper))
            if mxid is not None:
                answers[threepid] = mxid
        return answers
