"""Sydent's replication wire format: the signed association, both ways.

A push is `{"sgAssocs": {"<origin id>": <signed association>, ...}}`, the origin id being
the association's id on the server that made it (for kith: the row id, its change
cursor).  An association is `{medium, address, mxid, ts, not_before, not_after}` signed
by its origin under its server name; an unbind travels as a tombstone, with `mxid`,
`not_before` and `not_after` null.  Other fields (Sydent sometimes leaves a stale
`invites` list in) are covered by the signature and otherwise ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from signedjson.sign import SignatureVerifyException, verify_signed_json

from kith.replication.peers import Peer
from kith.services.bindings import VALIDITY_MS
from kith.services.keys import ServerKeys
from kith.store import OwnChange
from kith.threepid import is_valid_mxid, normalise_address


def signed_association(change: OwnChange, keys: ServerKeys) -> dict[str, Any]:
    """One of our own changes as a peer receives it, signed now."""
    bound = change.mxid is not None
    return keys.sign({
        "medium": change.medium, "address": change.address, "mxid": change.mxid,
        "ts": change.ts,
        "not_before": change.not_before if bound else None,
        "not_after": change.not_after if bound else None,
    })


class Unverified(Exception):
    """An association that is not the peer's, or not one at all: the push is refused."""


@dataclass(frozen=True, slots=True)
class ReceivedAssociation:
    """A verified association from a peer, its address normalised; mxid None for an
    unbind."""

    origin_id: int
    medium: str
    address: str
    mxid: str | None
    ts: int
    not_before: int
    not_after: int


def verify(peer: Peer, origin_id: int, signed: Any) -> ReceivedAssociation | None:
    """The association, checked: signed by `peer` with its key, with the fields of an
    association (else `Unverified`).  None for one signed by the peer but that kith
    cannot store (an address or user ID that could never be looked up): the peer meant
    it, and refusing the push would stop its stream for good, so it is skipped."""
    if not isinstance(signed, dict):
        raise Unverified("not an object")
    try:
        verify_signed_json(signed, peer.name, peer.verify_key)
    except SignatureVerifyException as exc:
        raise Unverified(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any shape canonical JSON cannot encode
        raise Unverified(f"cannot be checked: {type(exc).__name__}") from None
    medium, address, mxid = (signed.get(k) for k in ("medium", "address", "mxid"))
    ts = _int(signed.get("ts"))
    if not (isinstance(medium, str) and isinstance(address, str) and ts is not None
            and (mxid is None or isinstance(mxid, str))):
        raise Unverified("medium, address, mxid or ts missing or of the wrong type")
    times = [signed.get("not_before"), signed.get("not_after")]
    not_before, not_after = (_int(value) for value in times)
    if any(value is not None and _int(value) is None for value in times):
        raise Unverified("not_before or not_after of the wrong type")
    normalised = normalise_address(medium, address)
    if normalised is None or (mxid is not None and not is_valid_mxid(mxid)):
        return None
    if mxid is None:
        not_before = not_after = ts
    return ReceivedAssociation(
        origin_id=origin_id, medium=medium, address=normalised, mxid=mxid, ts=ts,
        not_before=ts if not_before is None else not_before,
        not_after=ts + VALIDITY_MS if not_after is None else not_after)


def _int(value: Any) -> int | None:
    """`value` if it is a JSON integer a BIGINT column holds, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and -2**63 < value < 2**63:
        return value
    return None
