"""3PID invites: invite tokens, ephemeral public keys, and the durable onbind queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import and_, delete, func, insert, or_, select, update

from kith.store.database import Database
from kith.store.schema import ephemeral_public_keys as keys
from kith.store.schema import invite_tokens as tokens
from kith.store.schema import onbind_deliveries as deliveries

PENDING = "pending"
DONE = "done"
GAVE_UP = "gave_up"


@dataclass(frozen=True, slots=True)
class InviteTokenRow:
    medium: str
    address: str
    room_id: str
    sender: str
    token: str
    received_ts: int
    sent_ts: int | None = None


@dataclass(frozen=True, slots=True)
class OnbindDelivery:
    """One queued onbind callback: `body` is the signed association, as JSON text."""

    id: int
    destination: str
    mxid: str
    body: str
    created_ts: int
    attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """An onbind delivery as an operator sees it (`kith onbind`)."""

    id: int
    destination: str
    mxid: str
    state: str
    attempts: int
    created_ts: int
    next_attempt_ts: int
    finished_ts: int | None
    last_error: str | None


_TOKEN_COLUMNS = [tokens.c[name] for name in InviteTokenRow.__slots__]
_DELIVERY_COLUMNS = [deliveries.c[name] for name in OnbindDelivery.__slots__]


class InviteStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ invite tokens

    async def add(self, invite: InviteTokenRow, ephemeral_public_key: str) -> None:
        """Store an invite and its ephemeral public key together."""
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(tokens).values(
                {name: getattr(invite, name) for name in InviteTokenRow.__slots__}))
            await conn.execute(insert(keys).values(
                public_key=ephemeral_public_key, verify_count=0,
                persistence_ts=invite.received_ts))

    async def remove(self, token: str, ephemeral_public_key: str) -> None:
        """Forget an invite whose mail could not be sent."""
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(tokens).where(tokens.c.token == token))
            await conn.execute(delete(keys).where(keys.c.public_key == ephemeral_public_key))

    async def get(self, token: str) -> InviteTokenRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(
                select(*_TOKEN_COLUMNS).where(tokens.c.token == token))).first()
        return InviteTokenRow(*row) if row else None

    async def has_pending(self, medium: str, address: str) -> bool:
        """Whether invites for the address wait for a bind (the cheap check of every bind)."""
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(
                select(tokens.c.id).where(tokens.c.medium == medium,
                                          tokens.c.address == address,
                                          tokens.c.sent_ts.is_(None)).limit(1))).first()
        return row is not None

    async def pending_threepids(self) -> list[tuple[str, str]]:
        """(medium, address) of every address with invites not yet sent."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(tokens.c.medium, tokens.c.address)
                .where(tokens.c.sent_ts.is_(None)).distinct())
            return [(medium, address) for medium, address in result]

    async def queue_onbind(
        self, medium: str, address: str, destination: str, mxid: str, now_ms: int,
        build_body: Callable[[list[InviteTokenRow]], dict[str, Any]],
    ) -> dict[str, Any] | None:
        """Take the address's pending invites (marking them sent) and queue the onbind
        body `build_body` makes of them, in one transaction; None if there were none.

        UPDATE ... RETURNING takes exactly the rows it marks, so two binds racing for
        the same invites never both queue them.
        """
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(tokens)
                .where(tokens.c.medium == medium, tokens.c.address == address,
                       tokens.c.sent_ts.is_(None))
                .values(sent_ts=now_ms)
                .returning(*_TOKEN_COLUMNS))
            taken = sorted((InviteTokenRow(*row) for row in result),
                           key=lambda invite: (invite.received_ts, invite.token))
            if not taken:
                return None
            body = build_body(taken)
            await conn.execute(insert(deliveries).values(
                destination=destination, mxid=mxid,
                body=msgspec.json.encode(body).decode(), created_ts=now_ms, attempts=0,
                next_attempt_ts=now_ms, claimed_until=None, state=PENDING))
        return body

    async def import_rows(self, invites: list[InviteTokenRow],
                          public_keys: list[tuple[str, int, int]]) -> None:
        """Add invites and (public_key, verify_count, persistence_ts) keys not held yet
        (taking over another server's; running it again adds nothing twice)."""
        async with self._db.engine.begin() as conn:
            if invites:
                await conn.execute(self._db.insert_or_ignore(tokens, ["token"]), [
                    {name: getattr(i, name) for name in InviteTokenRow.__slots__}
                    for i in invites])
            if public_keys:
                await conn.execute(self._db.insert_or_ignore(keys, ["public_key"]), [
                    {"public_key": k, "verify_count": n, "persistence_ts": ts}
                    for k, n, ts in public_keys])

    async def delete_older_than(self, stored_before_ms: int) -> int:
        """Delete the invites stored before the given time, and the ephemeral keys made
        before it (a key is made with its invite); how many rows went.  Rows of unknown
        age (time 0: imported from a Sydent too old to record it) are kept."""
        async with self._db.engine.begin() as conn:
            invites = await conn.execute(delete(tokens).where(
                tokens.c.received_ts > 0, tokens.c.received_ts < stored_before_ms))
            ephemeral = await conn.execute(delete(keys).where(
                keys.c.persistence_ts > 0, keys.c.persistence_ts < stored_before_ms))
        return int(invites.rowcount or 0) + int(ephemeral.rowcount or 0)

    # ----------------------------------------------------------------- ephemeral keys

    async def count_ephemeral_key_check(self, public_key: str) -> bool:
        """True (and one more verification counted) if the key was issued here."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(keys).where(keys.c.public_key == public_key)
                .values(verify_count=keys.c.verify_count + 1))
        return bool(result.rowcount)

    # ---------------------------------------------------------------- onbind deliveries

    async def due_deliveries(self, now_ms: int, limit: int) -> list[int]:
        """Ids of pending deliveries due now and not claimed by a live sender."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(deliveries.c.id).where(*self._claimable(now_ms))
                .order_by(deliveries.c.next_attempt_ts, deliveries.c.id).limit(limit))
            return [int(row_id) for (row_id,) in result]

    async def claim(self, delivery_id: int, now_ms: int,
                    lease_ms: int) -> OnbindDelivery | None:
        """The delivery, if this caller claimed it (one conditional UPDATE: of several
        workers or instances exactly one wins it); None if someone else has it."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, *self._claimable(now_ms))
                .values(claimed_until=now_ms + lease_ms))
            if result.rowcount != 1:
                return None
            row = (await conn.execute(select(*_DELIVERY_COLUMNS)
                                      .where(deliveries.c.id == delivery_id))).first()
        return OnbindDelivery(*row) if row else None

    @staticmethod
    def _claimable(now_ms: int) -> list[Any]:
        return [deliveries.c.state == PENDING, deliveries.c.next_attempt_ts <= now_ms,
                or_(deliveries.c.claimed_until.is_(None),
                    deliveries.c.claimed_until < now_ms)]

    async def next_due_ts(self, now_ms: int) -> int | None:
        """When a pending delivery next becomes claimable: its next attempt, or the end
        of the lease another sender holds on it."""
        async with self._db.engine.connect() as conn:
            unclaimed = (await conn.execute(
                select(func.min(deliveries.c.next_attempt_ts))
                .where(deliveries.c.state == PENDING,
                       or_(deliveries.c.claimed_until.is_(None),
                           deliveries.c.claimed_until < now_ms)))).scalar()
            leased = (await conn.execute(
                select(func.min(deliveries.c.claimed_until))
                .where(deliveries.c.state == PENDING,
                       deliveries.c.claimed_until >= now_ms))).scalar()
        due = [int(value) for value in (unclaimed, leased) if value is not None]
        return min(due) if due else None

    async def delivered(self, delivery: OnbindDelivery, now_ms: int,
                        delete_tokens: bool) -> None:
        """Mark the delivery done; delete its invite tokens if configured (as Sydent)."""
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(deliveries).where(deliveries.c.id == delivery.id)
                .values(state=DONE, finished_ts=now_ms, claimed_until=None,
                        attempts=delivery.attempts + 1, last_error=None))
            invited = _invite_tokens_of(delivery.body)
            if delete_tokens and invited:
                await conn.execute(delete(tokens).where(tokens.c.token.in_(invited)))

    async def failed(self, delivery: OnbindDelivery, next_attempt_ts: int,
                     error: str) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(deliveries).where(deliveries.c.id == delivery.id)
                .values(attempts=delivery.attempts + 1, next_attempt_ts=next_attempt_ts,
                        claimed_until=None, last_error=error[:500]))

    async def gave_up(self, delivery: OnbindDelivery, now_ms: int, error: str) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(deliveries).where(deliveries.c.id == delivery.id)
                .values(state=GAVE_UP, finished_ts=now_ms, claimed_until=None,
                        attempts=delivery.attempts + 1, last_error=error[:500]))

    async def release(self, delivery_ids: list[int]) -> None:
        """Give back claims of a sender that stops before finishing them."""
        if not delivery_ids:
            return
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(delivery_ids), deliveries.c.state == PENDING)
                .values(claimed_until=None))

    async def retry_now(self, now_ms: int) -> int:
        """Make every pending, unclaimed delivery due now (at start: a restart is the
        moment an operator expects stuck deliveries to be tried again); how many."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(deliveries.c.state == PENDING, deliveries.c.next_attempt_ts > now_ms,
                       or_(deliveries.c.claimed_until.is_(None),
                           deliveries.c.claimed_until < now_ms))
                .values(next_attempt_ts=now_ms))
            return result.rowcount or 0

    async def revive(self, now_ms: int) -> int:
        """Give every delivery that gave up one more attempt, now; how many.  (Its age
        is kept, so a delivery that fails again gives up again at once.)"""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(deliveries).where(deliveries.c.state == GAVE_UP)
                .values(state=PENDING, next_attempt_ts=now_ms, finished_ts=None,
                        claimed_until=None))
            return result.rowcount or 0

    async def report(self) -> list[DeliveryReport]:
        """Every delivery still kept (finished ones are pruned after a while), oldest first."""
        columns = [deliveries.c[name] for name in DeliveryReport.__slots__]
        async with self._db.engine.connect() as conn:
            result = await conn.execute(select(*columns).order_by(deliveries.c.id))
            return [DeliveryReport(*row) for row in result]

    async def prune(self, finished_before_ms: int) -> None:
        """Forget deliveries that finished (done or given up) before the given time."""
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(deliveries).where(
                deliveries.c.state != PENDING,
                deliveries.c.finished_ts < finished_before_ms))

    async def counts(self) -> QueueCounts:
        async with self._db.engine.connect() as conn:
            invites = (await conn.execute(select(func.count()).select_from(tokens).where(
                tokens.c.sent_ts.is_(None)))).scalar()
            result = await conn.execute(
                select(deliveries.c.state, func.count()).group_by(deliveries.c.state))
            states = {str(state): int(n) for state, n in result}
            oldest = (await conn.execute(select(func.min(deliveries.c.created_ts)).where(
                deliveries.c.state == PENDING))).scalar()
        return QueueCounts(int(invites or 0), states, None if oldest is None else int(oldest))

    async def deliveries(self, state: str | None = None) -> list[tuple[OnbindDelivery, str]]:
        """Every delivery with its state (for the CLI and tests)."""
        async with self._db.engine.connect() as conn:
            query = select(*_DELIVERY_COLUMNS, deliveries.c.state).order_by(deliveries.c.id)
            if state is not None:
                query = query.where(and_(deliveries.c.state == state))
            result = await conn.execute(query)
            return [(OnbindDelivery(*row[:-1]), str(row[-1])) for row in result]


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """The invites and the onbind queue at a glance."""

    invites_pending: int
    onbind: dict[str, int]  # state → deliveries
    oldest_pending_ts: int | None  # created_ts of the oldest pending delivery


def _invite_tokens_of(body: str) -> list[str]:
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return []
    invites = decoded.get("invites") if isinstance(decoded, dict) else None
    if not isinstance(invites, list):
        return []
    return [invite["token"] for invite in invites
            if isinstance(invite, dict) and isinstance(invite.get("token"), str)]
