"""Erasure: everything the store holds about one user or one address, removed in one
transaction (`kith forget`).

Associations are not deleted but tombstoned (mxid NULL, a new id), exactly as an unbind
writes them: the in-memory lookup index of every process follows the store by id, and
the replication pusher sends the server's own tombstones to its peers.  A tombstone of
an association replicated from a peer keeps that peer's origin, so it is never pushed
(the peer owns it) and the peer's next change of that address still wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    delete,
    false,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from kith.store.associations import AssociationRow
from kith.store.database import Database
from kith.store.schema import (
    accepted_terms_urls,
    account_tokens,
    accounts,
    invite_tokens,
    onbind_deliveries,
    threepid_associations,
    threepid_validation_sessions,
)

Threepid = tuple[str, str]  # (medium, normalised address)


@dataclass(frozen=True, slots=True)
class ForgottenAssociation:
    source: str
    medium: str
    address: str
    mxid: str
    origin_server: str | None
    origin_id: int | None
    lookup_hash: str


@dataclass(slots=True)
class ErasureReport:
    """What one erasure removed (or, in a dry run, would remove)."""

    associations: list[ForgottenAssociation] = field(default_factory=list)
    sessions: int = 0
    invites_to: int = 0
    invites_from: int = 0
    onbind_deliveries: int = 0
    account: bool = False
    tokens: int = 0
    terms_acceptances: int = 0

    @property
    def empty(self) -> bool:
        return not (self.associations or self.sessions or self.invites_to
                    or self.invites_from or self.onbind_deliveries or self.account
                    or self.tokens or self.terms_acceptances)


a = threepid_associations
sessions = threepid_validation_sessions
invites = invite_tokens
deliveries = onbind_deliveries


class ErasureStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        key = ["source", "medium", "address"]
        self._tombstone = db.replace_with_new_id(a, key, AssociationRow.__slots__)

    async def forget(self, mxid: str | None, threepids: Sequence[Threepid], now_ms: int,
                     *, dry_run: bool = False) -> ErasureReport:
        """Remove what is held about user `mxid` (if given) and about `threepids`: the
        associations of either (tombstoned at `now_ms`), the validation sessions and the
        pending invites of every address involved, invites the user sent, onbind
        deliveries for the user or its addresses, and the user's account, access tokens
        and terms acceptances.  All in one transaction; `dry_run` rolls it back."""
        report = ErasureReport()
        async with self._db.writer.transaction(commit=not dry_run) as conn:
            live = await self._live_associations(conn, mxid, threepids)
            report.associations = live
            addresses = sorted({*threepids, *((f.medium, f.address) for f in live)})
            if live:
                await conn.execute(self._tombstone, [_tombstone(f, now_ms).as_params()
                                                     for f in live])
            report.sessions = await _delete(conn, sessions, _of(sessions, addresses))
            report.invites_to = await _delete(conn, invites, and_(
                _of(invites, addresses), invites.c.sent_ts.is_(None)))
            if mxid is not None:
                report.invites_from = await _delete(conn, invites, and_(
                    invites.c.sender == mxid, ~_of(invites, addresses)))
            report.onbind_deliveries = await self._forget_deliveries(conn, mxid, addresses)
            if mxid is not None:
                report.tokens = await _delete(conn, account_tokens,
                                              account_tokens.c.user_id == mxid)
                report.terms_acceptances = await _delete(
                    conn, accepted_terms_urls, accepted_terms_urls.c.user_id == mxid)
                report.account = await _delete(conn, accounts,
                                               accounts.c.user_id == mxid) > 0
        return report

    @staticmethod
    async def _live_associations(conn: AsyncConnection, mxid: str | None,
                                 threepids: Sequence[Threepid]) -> list[ForgottenAssociation]:
        wanted = or_(a.c.mxid == mxid if mxid is not None else false(),
                     _of(a, threepids))
        query = select(
            a.c.source, a.c.medium, a.c.address, a.c.mxid, a.c.origin_server,
            a.c.origin_id, a.c.lookup_hash).where(a.c.mxid.is_not(None), wanted).order_by(a.c.id)
        return [ForgottenAssociation(*row) for row in await conn.execute(query)]

    @staticmethod
    async def _forget_deliveries(conn: AsyncConnection, mxid: str | None,
                                 addresses: Sequence[Threepid]) -> int:
        """Onbind deliveries for the user, or carrying one of the addresses (the body is
        the signed association: its medium and address say whose it is)."""
        rows = await conn.execute(select(deliveries.c.id, deliveries.c.mxid,
                                         deliveries.c.body))
        wanted = set(addresses)
        ids = [int(i) for i, to, body in rows
               if to == mxid or _threepid_of(body) in wanted]
        if ids:
            await conn.execute(delete(deliveries).where(deliveries.c.id.in_(ids)))
        return len(ids)


def _of(table: Table, threepids: Sequence[Threepid]) -> ColumnElement[bool]:
    """`table`'s rows whose (medium, address) is one of `threepids`."""
    if not threepids:
        return false()
    return tuple_(table.c.medium, table.c.address).in_(list(threepids))


async def _delete(conn: AsyncConnection, table: Table, where: ColumnElement[bool]) -> int:
    """Delete `table`'s rows where `where` holds; how many there were."""
    count = (await conn.execute(
        select(func.count()).select_from(table).where(where))).scalar()
    if count:
        await conn.execute(delete(table).where(where))
    return int(count or 0)


def _tombstone(forgotten: ForgottenAssociation, now_ms: int) -> AssociationRow:
    """The tombstone an unbind writes; a peer's association keeps its origin."""
    return AssociationRow(
        source=forgotten.source, medium=forgotten.medium, address=forgotten.address,
        mxid=None, ts=now_ms, not_before=now_ms, not_after=now_ms,
        lookup_hash=forgotten.lookup_hash, origin_server=forgotten.origin_server,
        origin_id=forgotten.origin_id)


def _threepid_of(body: str) -> Threepid | None:
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(decoded, dict):
        return None
    medium, address = decoded.get("medium"), decoded.get("address")
    if isinstance(medium, str) and isinstance(address, str):
        return medium, address
    return None
