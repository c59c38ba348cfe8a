"""Answering lookups: the lookup rules, over the in-memory index of lookup hashes
(kith.services.index) and the other identity sources."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from kith.config import DEFAULT_PRECEDENCE, LDAP, LOCAL, UPSTREAM
from kith.errors import M_INVALID_PEPPER, M_TOO_LARGE, MatrixError, invalid_param
from kith.metrics import LOOKUP_ADDRESSES
from kith.services.index import AssociationIndex
from kith.services.limits import LookupBudget, Requester
from kith.services.pepper import LookupPeppers
from kith.sources.errors import LdapError
from kith.sources.upstream import PepperRejected
from kith.threepid import Threepid, lookup_hash, normalise_address, parse_plain_query

if TYPE_CHECKING:
    from kith.services.adopted_pepper import AdoptedPepper
    from kith.sources.ldap import LdapDirectory
    from kith.sources.upstream import UpstreamIdentityServer

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "none")
_encode = msgspec.json.Encoder().encode


class LookupService:
    """The lookup rules, in one place: which source answers which address.

    Sources are probed in `precedence` order (by default LDAP, then local bindings,
    then the upstream identity server) and each address is answered by the first source
    that maps it, never by two.  sha256 lookups are answered from the index (synced LDAP
    rows and local bindings) and, when kith announces the upstream's pepper
    (`adopted`), by the upstream for the hashes still unresolved; plain-text ones ask
    the directory live and, for what is still unresolved, the upstream.  A failing
    directory or upstream costs its own part of the answer only.
    """

    def __init__(self, peppers: LookupPeppers, index: AssociationIndex,
                 address_lookup_limit: int, *,
                 precedence: Sequence[str] = DEFAULT_PRECEDENCE,
                 directory: LdapDirectory | None = None,
                 upstream: UpstreamIdentityServer | None = None,
                 adopted: AdoptedPepper | None = None,
                 budget: LookupBudget | None = None) -> None:
        self.peppers = peppers
        self.index = index
        self.budget = budget
        self.limit = address_lookup_limit
        self.precedence = tuple(precedence)
        self.directory = directory
        self.upstream = upstream
        self.adopted = adopted
        # Addresses answered, per source: kith_lookup_addresses_total{source}.
        self.answered = {source: LOOKUP_ADDRESSES.labels(source) for source in self.precedence}

    @property
    def pepper(self) -> str:
        """The announced lookup pepper."""
        return self.index.pepper

    async def close(self) -> None:
        await self.peppers.close()
        if self.adopted is not None:
            await self.adopted.close()
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
        await self._admit(algorithm, pepper, addresses, requester)
        return await self._mappings(algorithm, pepper, addresses)

    async def lookup_json(self, algorithm: str, pepper: str, addresses: Sequence[str],
                          requester: Requester | None = None) -> bytes:
        """`lookup`'s mappings as a JSON object (UTF-8).  A sha256 lookup that one
        source of the index answers alone is written straight from the index, with no
        str or dict made for each address found (at 10M bindings, as much again as
        finding them)."""
        await self._admit(algorithm, pepper, addresses, requester)
        if algorithm == "sha256" and self.adopted is None:
            sources = self._hash_sources(self.precedence)
            if len(sources) == 1:
                encoded, found = self.index.source(sources[0], pepper).find_json(addresses)
                if found:
                    self.answered[sources[0]].inc(found)
                return encoded
        return _encode(await self._mappings(algorithm, pepper, addresses))

    async def _admit(self, algorithm: str, pepper: str, addresses: Sequence[str],
                     requester: Requester | None) -> None:
        """Refuse a lookup kith cannot answer, or one over the requester's budget; wait
        until the index of `pepper` is complete and current."""
        if algorithm not in ALGORITHMS:
            raise invalid_param(f"Unsupported algorithm: {algorithm!r}")
        if len(addresses) > self.limit:
            raise MatrixError(400, M_TOO_LARGE,
                              f"More than the maximum of {self.limit} addresses in one lookup")
        if requester is not None and self.budget is not None:
            # A pepper this process does not hold costs a read of the store (it may be
            # one another process has just announced): as much as one address more.
            self.budget.spend(len(addresses) + (not self.index.holds(pepper)), requester)
        if not await self.peppers.accepts(pepper):
            raise invalid_pepper(algorithm, self.pepper)
        await self.index.refresh()
        if not self.index.holds(pepper):  # dropped while this lookup waited
            raise invalid_pepper(algorithm, self.pepper)

    async def _mappings(self, algorithm: str, pepper: str,
                        addresses: Sequence[str]) -> dict[str, str]:
        if algorithm == "sha256":
            if self.adopted is None:
                return self._lookup_hashes(addresses, pepper, self.precedence)
            return await self._lookup_hashes_forwarding(addresses, pepper, self.adopted)
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

    def _lookup_hashes(self, hashes: Sequence[str], pepper: str,
                       precedence: Sequence[str]) -> dict[str, str]:
        # The hot path: one dict probe per address and source, counted once per request.
        sources = self._hash_sources(precedence)
        mappings: dict[str, str] = {}
        remaining = hashes
        for i, source in enumerate(sources):
            found = self.index.source(source, pepper).find(remaining)
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

    def _hash_sources(self, precedence: Sequence[str]) -> list[str]:
        """The sources of `precedence` the index answers sha256 lookups for: synced LDAP
        rows only while LDAP is configured; the upstream is asked elsewhere, and only
        when kith announces its pepper (`_lookup_hashes_forwarding`)."""
        return [source for source in precedence
                if source == LOCAL or (source == LDAP and self.directory is not None)]

    async def _lookup_hashes_forwarding(self, hashes: Sequence[str], pepper: str,
                                        adopted: AdoptedPepper) -> dict[str, str]:
        """sha256 lookups with the upstream's pepper: the index's sources in precedence
        order, the upstream asked for what is unresolved at its turn, in one request."""
        upstream_pepper = await adopted.pepper_for(pepper)
        if upstream_pepper is None or self.upstream is None:
            return self._lookup_hashes(hashes, pepper, self.precedence)
        if upstream_pepper != pepper:  # kith is changing to the upstream's new pepper
            raise invalid_pepper("sha256", upstream_pepper)
        turn = self.precedence.index(UPSTREAM)
        mappings = self._lookup_hashes(hashes, pepper, self.precedence[:turn])
        remaining = [h for h in hashes if h not in mappings]
        if remaining:
            try:
                found = await self.upstream.lookup_hashes(remaining, pepper)
            except PepperRejected:
                changed = await adopted.rejected(pepper)
                if changed is not None:
                    raise invalid_pepper("sha256", changed) from None
                found = {}
            if found:
                self.answered[UPSTREAM].inc(len(found))
                mappings.update(found)
                remaining = [h for h in remaining if h not in mappings]
        mappings.update(self._lookup_hashes(remaining, pepper, self.precedence[turn + 1:]))
        return mappings

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


def invalid_pepper(algorithm: str, announced: str) -> MatrixError:
    """The spec's answer to a lookup with another pepper than the announced one."""
    return MatrixError(400, M_INVALID_PEPPER, "Unknown or invalid pepper - has it been rotated?",
                       algorithm=algorithm, lookup_pepper=announced)
