"""Binding and unbinding 3PIDs to Matrix user IDs, and the signed association."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kith.config import LDAP, LOCAL
from kith.errors import M_FORBIDDEN, M_UNAUTHORIZED, MatrixError
from kith.metrics import BINDS, UNBINDS
from kith.services.index import AssociationIndex
from kith.services.keys import ServerKeys
from kith.services.lookup import LookupService
from kith.services.onbind import OnbindService
from kith.services.validation import ValidationService
from kith.store import AssociationRow, Store
from kith.threepid import check_mxid, check_threepid, mxid_server_name, now_ms

# Associations are valid for a century (as Sydent): they last until unbound.
VALIDITY_MS = 100 * 365 * 24 * 60 * 60 * 1000


def forbidden(message: str) -> MatrixError:
    return MatrixError(403, M_FORBIDDEN, message)


def association_json(medium: str, address: str, mxid: str, ts: int, not_before: int,
                     not_after: int) -> dict[str, Any]:
    """The association as the spec lays it out, before it is signed."""
    return {"address": address, "medium": medium, "mxid": mxid,
            "not_before": not_before, "not_after": not_after, "ts": ts}


class BindingService:
    def __init__(
        self,
        store: Store,
        index: AssociationIndex,
        keys: ServerKeys,
        clock: Callable[[], int] = now_ms,
        lookup: LookupService | None = None,
        onbind: OnbindService | None = None,
        validation: ValidationService | None = None,
    ) -> None:
        self._lookup = lookup
        self._validation = validation
        self._onbind = onbind
        self._store = store
        self._index = index
        self._keys = keys
        self._clock = clock
        # Called after every committed bind and unbind (the replication pusher's wakeup).
        self.on_change: list[Callable[[], None]] = []

    async def bind(self, medium: str, address: str, mxid: str) -> dict[str, Any]:
        """Store the association durably, make it visible to lookups, return it signed."""
        address = check_threepid(medium, address)
        check_mxid(mxid)
        await self._refuse_directory_conflict(medium, address, mxid)
        ts = self._clock()
        hashed = self._index.peppered_hash(medium, address)
        row = AssociationRow(
            source=LOCAL, medium=medium, address=address, mxid=mxid, ts=ts,
            not_before=ts, not_after=ts + VALIDITY_MS, lookup_hash=hashed.value,
        )
        ids = await self._store.associations.write([row])
        self._index.set(medium, address, mxid, hashed=hashed, row_id=ids[0] if ids else None)
        self._changed()
        BINDS.inc()
        association = association_json(medium, address, mxid, ts, row.not_before,
                                       row.not_after)
        if self._onbind is not None:
            # Pending invites ride along, and are queued for onbind before we answer.
            with_invites = await self._onbind.attach_invites(medium, address, mxid,
                                                             association)
            if with_invites is not None:
                return with_invites
        return self._keys.sign(association)

    # ------------------------------------------------ who may bind and unbind what

    async def bind_validated(self, requester: str | None, sid: str, client_secret: str,
                             mxid: str) -> dict[str, Any]:
        """Bind what session `sid` validated to `mxid`: on v2 (`requester` is the caller's
        user ID) only to the caller's own ID; on v1 (None) to any, as r0.3.0 did."""
        if requester is not None and mxid != requester:
            raise MatrixError(403, M_UNAUTHORIZED,
                              "This user is prohibited from binding to the mxid")
        validated = await self._validated_sessions.get_validated(sid, client_secret)
        return await self.bind(validated.medium, validated.address, mxid)

    async def unbind_validated(self, requester: str | None, mxid: str, medium: str,
                               address: str, sid: str | None,
                               client_secret: str | None) -> None:
        """Unbind for a caller who owns `mxid` (v2) and holds a validated session for
        exactly this 3PID."""
        if requester is not None and mxid != requester:
            raise forbidden("This user is prohibited from unbinding the mxid")
        if sid is None or client_secret is None:
            raise forbidden("Unbinding needs the sid and client_secret of a validated session")
        address = check_threepid(medium, address)
        try:
            validated = await self._validated_sessions.get_validated(sid, client_secret)
        except MatrixError as exc:
            if exc.status >= 500:
                raise
            raise forbidden(f"No validated session for this 3PID: {exc.message}") from None
        if (validated.medium, validated.address) != (medium, address):
            raise forbidden("The session did not validate this 3PID")
        await self.unbind(medium, address, mxid)

    async def unbind_for_homeserver(self, origin: str, mxid: str, medium: str,
                                    address: str) -> None:
        """Unbind at the request of homeserver `origin` (its signature checked already),
        which may act only for its own users."""
        check_mxid(mxid)
        if mxid_server_name(mxid) != origin:
            raise forbidden("Origin server name does not match the mxid's server")
        await self.unbind(medium, address, mxid)

    @property
    def _validated_sessions(self) -> ValidationService:
        if self._validation is None:
            raise RuntimeError("BindingService was built without validation sessions")
        return self._validation

    async def signed_association(self, medium: str, address: str,
                                 mxid: str) -> dict[str, Any]:
        """The association `address` → `mxid`, signed now: with the times of our own
        binding when it is ours, else valid from now (a directory's mapping)."""
        address = check_threepid(medium, address)
        return self._keys.sign(await self._association(medium, address, mxid))

    async def _association(self, medium: str, address: str, mxid: str) -> dict[str, Any]:
        """The unsigned association of a normalised address with `mxid`, as stored."""
        row = await self._store.associations.get(LOCAL, medium, address)
        if row is not None and row.mxid == mxid:
            ts, not_before, not_after = row.ts, row.not_before, row.not_after
        else:
            ts = not_before = self._clock()
            not_after = ts + VALIDITY_MS
        return association_json(medium, address, mxid, ts, not_before, not_after)

    async def _refuse_directory_conflict(self, medium: str, address: str, mxid: str) -> None:
        """The directory is trusted: an address it maps to someone else is theirs."""
        if self._lookup is None or self._lookup.directory is None:
            return
        owner = await self._lookup.resolve(medium, address)
        if owner is not None and owner[1] == LDAP and owner[0] != mxid:
            raise MatrixError(403, M_FORBIDDEN,
                              f"This {medium} address belongs to another user in the "
                              "organisation's directory")

    async def unbind(self, medium: str, address: str, mxid: str) -> bool:
        """Remove the association if `address` is bound to `mxid`; True if it was."""
        address = check_threepid(medium, address)
        check_mxid(mxid)
        current = await self._store.associations.get(LOCAL, medium, address)
        if current is None or current.mxid != mxid:
            return False
        ts = self._clock()
        hashed = self._index.peppered_hash(medium, address)
        tombstone = AssociationRow(
            source=LOCAL, medium=medium, address=address, mxid=None, ts=ts,
            not_before=ts, not_after=ts, lookup_hash=hashed.value,
        )
        ids = await self._store.associations.write([tombstone])
        self._index.set(medium, address, None, hashed=hashed, row_id=ids[0] if ids else None)
        self._changed()
        UNBINDS.inc()
        return True

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    async def deliver_pending_invites(self) -> int:
        """Queue onbind for pending invites whose address is bound already: bound by a
        directory sync, on a replication peer, or by a bind that raced the store-invite or
        crashed before it queued them.  How many addresses were queued."""
        if self._onbind is None:
            return 0
        await self._index.refresh()
        queued = 0
        for medium, address in sorted(await self._onbind.pending.reload()):
            if await self.deliver_invites_of(medium, address):
                queued += 1
        return queued

    async def deliver_invites_of(self, medium: str, address: str) -> bool:
        """Queue onbind for the invites waiting for `address` if it is bound now (here,
        by a directory, or on a replication peer); True if any were queued."""
        if self._onbind is None or not await self._onbind.pending.may_have(medium, address):
            return False
        mxid = self._bound_mxid(medium, address)
        if mxid is None:
            return False
        association = await self._association(medium, address, mxid)
        return await self._onbind.attach_invites(medium, address, mxid,
                                                 association) is not None

    def _bound_mxid(self, medium: str, address: str) -> str | None:
        hash_ = self._index.hash(medium, address)
        directory = self._lookup is not None and self._lookup.directory is not None
        for source in (self._lookup.precedence if self._lookup else (LOCAL,)):
            if source == LOCAL or (source == LDAP and directory):
                mxid = self._index.get(hash_, source)
                if mxid is not None:
                    return mxid
        return None
