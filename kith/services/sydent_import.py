"""Taking over a Sydent installation: its bindings, accounts, sessions and pepper.

Idempotent: running it again adds nothing twice. The Sydent database is only read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from kith.config import LOCAL
from kith.config_peers import peer_key_b64
from kith.services.accounts import hash_token
from kith.services.pepper import read_record, rotate
from kith.store import AccountRow, AssociationRow, InviteTokenRow, ReplicationPeerRow, Store
from kith.store.sessions import ValidationSessionRow
from kith.store.sydent_db import SydentData, read_sydent_db
from kith.threepid import lookup_hash, normalise_address

# Sydent lets a session be validated within 24 h of its last change: older ones are over.
SESSION_LIFETIME_MS = 24 * 60 * 60 * 1000
CHUNK = 5000


@dataclass
class ImportReport:
    imported: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{what}: {count}" for what, count in self.imported.items()] + self.notes


# Server state naming the Sydent database imported last (absolute path), so that
# `import-sydent` on a sydent.conf that kith took over still finds Sydent's file.
IMPORTED_SYDENT_DB = "imported_sydent_db"


async def import_sydent_db(store: Store, sydent_db: str, server_name: str,
                           now_ms: int,
                           peer_urls: Mapping[str, str] | None = None) -> ImportReport:
    """`peer_urls`: peer name -> `base_replication_url`, from the `[peer.<name>]`
    sections of Sydent's configuration."""
    data = await asyncio.to_thread(read_sydent_db, sydent_db, server_name)
    report = ImportReport()
    pepper = await _take_pepper(store, data, report)
    sydent_ids = await _import_associations(store, data, pepper, report)
    await _import_replicated(store, data, pepper, report)
    if report.imported["lookup pepper"]:
        # Every stored hash, and every process's index, moves to Sydent's pepper.
        await rotate(store, pepper)
    await _import_accounts(store, data, report)
    await _import_sessions(store, data, now_ms, report)
    await _import_invites(store, data, report)
    await _import_peers(store, data, peer_urls or {}, await _cursors(store, data, sydent_ids),
                        report)
    await store.state.set(IMPORTED_SYDENT_DB, data.path)
    return report


async def _take_pepper(store: Store, data: SydentData, report: ImportReport) -> str:
    """Sydent's pepper becomes ours, so that clients' cached peppers stay valid (the
    change itself is made once the associations are in)."""
    current = (await read_record(store)).current
    if data.pepper is None or data.pepper == current:  # a Sydent that never started
        report.imported["lookup pepper"] = 0
        return current
    report.imported["lookup pepper"] = 1
    return data.pepper


async def _import_associations(store: Store, data: SydentData, pepper: str,
                               report: ImportReport) -> dict[tuple[str, str], int]:
    """Sydent's own bindings, in Sydent's order, and the unbinds some active peer has not
    been sent yet (so that they still go out).  (medium, address) → Sydent's id of what
    was written."""
    unsent_after = min((p.last_sent_version or 0 for p in data.peers if p.active),
                       default=None)
    rows: list[AssociationRow] = []
    unbinds: list[AssociationRow] = []
    sydent_ids: dict[tuple[str, str], int] = {}
    skipped = 0
    for sydent_id, medium, address, mxid, ts, not_before, not_after in data.local_associations:
        normalised = normalise_address(medium, address)
        if normalised is None:
            skipped += mxid is not None
            continue
        row = AssociationRow(
            source=LOCAL, medium=medium, address=normalised, mxid=mxid, ts=ts,
            not_before=ts if not_before is None else not_before,
            not_after=ts if not_after is None else not_after,
            lookup_hash=lookup_hash(medium, normalised, pepper))
        if mxid is not None:
            rows.append(row)
        elif unsent_after is not None and sydent_id > unsent_after and await \
                store.associations.get(LOCAL, medium, normalised) is None:
            unbinds.append(row)
        else:
            continue
        sydent_ids[(medium, normalised)] = sydent_id
    # Sydent's peers know its associations by Sydent's ids: kith's ids start past them,
    # so that what kith pushes later is newer to them than what Sydent pushed.  And in
    # Sydent's order, so that a peer's cursor in Sydent's ids becomes one in kith's
    # (`_cursors`).
    await store.associations.ids_past(max((r[0] for r in data.local_associations), default=0))
    ordered = sorted(rows + unbinds, key=lambda r: sydent_ids[(r.medium, r.address)])
    for start in range(0, len(ordered), CHUNK):
        await store.associations.write(ordered[start:start + CHUNK])
    report.imported["associations"] = len(rows)
    if unbinds:
        report.imported["unbinds not yet sent to every peer"] = len(unbinds)
    if skipped:
        report.notes.append(f"skipped: {skipped} associations with an invalid address")
    return sydent_ids


async def _import_replicated(store: Store, data: SydentData, pepper: str,
                             report: ImportReport) -> None:
    """The associations peers replicated to Sydent, with their origin and id, so that
    the peers' pushes carry on where they were (what they resend is stored once)."""
    rows = []
    for origin, origin_id, medium, address, mxid, ts, not_before, not_after \
            in data.peer_associations:
        normalised = normalise_address(medium, address)
        if normalised is None:
            continue
        rows.append(AssociationRow(
            source=LOCAL, medium=medium, address=normalised, mxid=mxid, ts=ts,
            not_before=ts if not_before is None else not_before,
            not_after=ts if not_after is None else not_after,
            lookup_hash=lookup_hash(medium, normalised, pepper),
            origin_server=origin, origin_id=origin_id))
    for start in range(0, len(rows), CHUNK):
        await store.associations.write_replicated(rows[start:start + CHUNK])
    report.imported["associations replicated from peers"] = len(rows)


async def _cursors(store: Store, data: SydentData,
                   sydent_ids: dict[tuple[str, str], int]) -> dict[str, int | None]:
    """Each peer's cursor in kith's ids: the last kith row made from a Sydent row the
    peer had acknowledged, so that kith does not push it all again."""
    kith_ids = sorted((sydent_ids[key], kith_id)
                      for key, kith_id in (await store.associations.own_ids()).items()
                      if key in sydent_ids)
    cursors: dict[str, int | None] = {}
    for peer in data.peers:
        sent = [kith_id for sydent_id, kith_id in kith_ids
                if peer.last_sent_version is not None and sydent_id <= peer.last_sent_version]
        cursors[peer.name] = max(sent, default=None)
    return cursors


async def _import_accounts(store: Store, data: SydentData, report: ImportReport) -> None:
    await store.accounts.import_accounts(
        [AccountRow(user_id, created_ts, consent) for user_id, created_ts, consent
         in data.accounts],
        # Sydent kept tokens in clear; kith keeps only their hashes.
        [(hash_token(token), user_id) for token, user_id in data.tokens],
        list(data.accepted_urls))
    report.imported["accounts"] = len(data.accounts)
    report.imported["access tokens"] = len(data.tokens)
    report.imported["accepted terms URLs"] = len(data.accepted_urls)


async def _import_sessions(store: Store, data: SydentData, now_ms: int,
                           report: ImportReport) -> None:
    rows = []
    for sid, medium, address, secret, validated, mtime, token, attempt in data.sessions:
        normalised = normalise_address(medium, address)
        if normalised is None or now_ms - mtime >= SESSION_LIFETIME_MS:
            continue
        rows.append(ValidationSessionRow(
            id=sid, medium=medium, address=normalised, client_secret=secret,
            validated_at=mtime if validated else None, mtime=mtime, next_link=None,
            send_attempt=attempt, token=token, failed_attempts=0))
    await store.sessions.insert_many(rows)
    report.imported["open validation sessions"] = len(rows)


async def _import_invites(store: Store, data: SydentData, report: ImportReport) -> None:
    """Pending 3PID invites and their ephemeral keys (Sydent's times are seconds).

    Invites whose address is bound already are delivered by the onbind sweep at start."""
    invites = []
    for medium, address, room_id, sender, token, received_s, sent_s in data.invite_tokens:
        normalised = normalise_address(medium, address)
        if normalised is None or not token:
            continue
        invites.append(InviteTokenRow(
            medium=medium, address=normalised, room_id=room_id, sender=sender, token=token,
            received_ts=int(received_s or 0) * 1000,
            sent_ts=int(sent_s) * 1000 if sent_s is not None else None))
    keys = [(key, int(count or 0), int(ts or 0) * 1000)
            for key, count, ts in data.ephemeral_public_keys if key]
    await store.invites.import_rows(invites, keys)
    report.imported["invite tokens"] = len(invites)
    report.imported["ephemeral invite keys"] = len(keys)


async def _import_peers(store: Store, data: SydentData, peer_urls: Mapping[str, str],
                        cursors: Mapping[str, int | None], report: ImportReport) -> None:
    """Sydent's replication peers and their keys, each with its cursor in kith's ids
    (a peer kith knows already is left as it is)."""
    rows = []
    for peer in data.peers:
        keys: dict[str, str] = {}
        for alg, key in peer.keys.items():
            converted = peer_key_b64(key)
            if converted is None:
                report.notes.append(f"skipped: {alg} key of peer {peer.name} (not base64 "
                                    "or hex)")
            else:
                keys[alg] = converted
        url = (peer_urls.get(peer.name) or "").strip() or None
        rows.append(ReplicationPeerRow(name=peer.name, port=peer.port,
                                       base_replication_url=url, active=peer.active,
                                       last_sent_version=cursors.get(peer.name), keys=keys))
    await store.peers.import_peers(rows)
    report.imported["replication peers"] = len(rows)
