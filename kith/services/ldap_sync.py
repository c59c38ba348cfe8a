"""Keeping a copy of the directory's 3PIDs in the store, for sha256 lookups.

A hashed lookup cannot be asked of LDAP (the directory does not know our pepper), so
the directory's addresses are written into threepid_associations with source 'ldap'
and their lookup hashes, and the association index serves them like local bindings.

A full sync reads every entry with a mapped attribute (paged) and writes the
difference: new or moved addresses, and tombstones for addresses gone from the
directory.  An incremental sync reads only entries changed since the last one seen
(modifyTimestamp / whenChanged, minus a margin for clock and replication lag).
Writes go in large batches: a 100k-entry directory syncs in seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from kith.config import LDAP
from kith.metrics import LDAP_LAST_SYNC
from kith.services.coherence import Turn
from kith.sources.ldap import DirectoryEntry, LdapDirectory, pick_owners
from kith.store import AssociationRow, Store
from kith.threepid import Threepid

if TYPE_CHECKING:
    from kith.services.index import AssociationIndex

log = logging.getLogger(__name__)

WRITE_BATCH = 5000
# The store's lock held by the one instance that syncs for all sharing the database.
SYNC_LOCK = "ldap-sync"
CHANGE_MARGIN_S = 60.0
# As local bindings: valid until the directory drops them.
VALIDITY_MS = 100 * 365 * 24 * 60 * 60 * 1000


# server_state: how the last syncs went, for `kith status` (JSON of SyncState).
SYNC_STATE = "ldap_sync"


class SyncState(msgspec.Struct, omit_defaults=True):
    """What the instance that syncs last saw (times in ms since the epoch)."""

    last_success_ts: int | None = None
    last_full_ts: int | None = None
    entries: int | None = None
    last_error: str | None = None
    last_error_ts: int | None = None


async def load_sync_state(store: Store) -> SyncState | None:
    """The last syncs' state as stored (None: the directory was never synced here)."""
    text = await store.state.get(SYNC_STATE)
    if text is None:
        return None
    try:
        return msgspec.json.decode(text, type=SyncState)
    except msgspec.DecodeError:
        return None


@dataclass(frozen=True)
class SyncResult:
    entries: int
    written: int
    removed: int


class LdapSync:
    def __init__(self, directory: LdapDirectory, store: Store, index: AssociationIndex,
                 clock: Callable[[], float] = time.time,
                 change_margin_s: float = CHANGE_MARGIN_S) -> None:
        self._directory = directory
        self._change_margin_s = change_margin_s
        self._store = store
        self._index = index
        self._clock = clock
        self._known: dict[Threepid, str] = {}  # → mxid
        self._cursor: str | None = None
        self._last_full = 0.0
        self._lock = asyncio.Lock()
        self._turn = Turn(store.locks, SYNC_LOCK,
                          "syncs the LDAP directory into the shared database")
        self._state = SyncState()

    @property
    def syncing(self) -> bool:
        """True while this instance is the one that syncs (see `run`)."""
        return self._turn.held

    @property
    def turns_refused(self) -> int:
        """Times another instance held the sync lock."""
        return self._turn.refused

    @property
    def last_full(self) -> float:
        """When the last full sync ended, by the sync's clock (0: none yet)."""
        return self._last_full

    async def full(self) -> SyncResult:
        """Make the stored 'ldap' rows exactly what the directory holds now."""
        async with self._lock:
            started = time.monotonic()
            entries = await self._directory.entries()
            wanted = pick_owners(entries)
            self._known = {Threepid(medium, address): mxid
                           for medium, address, mxid, _hash
                           in await self._store.associations.live_rows(LDAP)}
            gone = [t for t in self._known if t not in wanted]
            written, removed = await self._write(wanted.items(), gone)
            self._advance(entries)
            self._last_full = self._clock()
            log.info("LDAP full sync: %d entries, %d addresses written, %d removed in %.1f s",
                     len(entries), written, removed, time.monotonic() - started)
            return SyncResult(len(entries), written, removed)

    async def incremental(self) -> SyncResult:
        """Apply the entries changed since the last sync (a full sync if none was done)."""
        if self._cursor is None:
            return await self.full()
        async with self._lock:
            since = self._directory.changed_cursor(self._cursor, self._change_margin_s)
            entries = await self._directory.entries(since)
            wanted = pick_owners(entries)
            changed_mxids = {entry.mxid for entry in entries}
            gone = [t for t, mxid in self._known.items()
                    if mxid in changed_mxids and t not in wanted]
            written, removed = await self._write(wanted.items(), gone)
            self._advance(entries)
            if written or removed:
                log.info("LDAP sync: %d changed entries, %d addresses written, %d removed",
                         len(entries), written, removed)
            return SyncResult(len(entries), written, removed)

    async def run(self) -> None:
        """Sync at start, then every sync_interval (fully every full_sync_interval).

        Instances sharing one PostgreSQL database sync one at a time: the one holding
        the database's sync lock does it for all, and the others take over (with a full
        sync) when it stops."""
        interval_s = self._directory.config.sync_interval_s
        full_interval_s = self._directory.config.full_sync_interval_s
        held = await self._turn.wait(interval_s)
        try:
            while True:
                try:
                    full = self._cursor is None or \
                        self._clock() - self._last_full >= full_interval_s
                    result = await (self.full() if full else self.incremental())
                except Exception as exc:  # noqa: BLE001 - a dead directory must not stop kith
                    log.warning("LDAP sync failed: %s", exc)
                    await self._record(error=str(exc) or type(exc).__name__)
                else:
                    await self._record(full=full, entries=result.entries)
                await asyncio.sleep(interval_s)
        finally:
            self._turn.held = False
            await held.release()

    async def _record(self, *, full: bool = False, entries: int | None = None,
                      error: str | None = None) -> None:
        """Keep how this sync went in the store (for `kith status`) and the gauge."""
        now = int(self._clock() * 1000)
        if error is not None:
            self._state.last_error, self._state.last_error_ts = error[:500], now
        else:
            self._state.last_success_ts = now
            LDAP_LAST_SYNC.set(now / 1000)
            if full:
                self._state.last_full_ts, self._state.entries = now, entries
        try:
            await self._store.state.set(SYNC_STATE,
                                        msgspec.json.encode(self._state).decode())
        except Exception as exc:  # noqa: BLE001 - only the status report misses it
            log.warning("cannot record the LDAP sync state: %s", exc)

    def _advance(self, entries: Iterable[DirectoryEntry]) -> None:
        latest = max((e.changed for e in entries if e.changed), default=None)
        if latest is not None and (self._cursor is None or latest > self._cursor):
            self._cursor = latest

    async def _write(self, wanted: Iterable[tuple[Threepid, str]],
                     gone: list[Threepid]) -> tuple[int, int]:
        ts = int(self._clock() * 1000)
        rows: list[AssociationRow] = []
        for threepid, mxid in wanted:
            if self._known.get(threepid) == mxid:
                continue
            rows.append(AssociationRow(LDAP, threepid.medium, threepid.address, mxid, ts, ts,
                                       ts + VALIDITY_MS,
                                       self._index.hash(threepid.medium, threepid.address)))
        written = len(rows)
        for threepid in gone:
            rows.append(AssociationRow(LDAP, threepid.medium, threepid.address, None, ts, ts,
                                       ts, self._index.hash(threepid.medium, threepid.address)))
        for start in range(0, len(rows), WRITE_BATCH):
            batch = rows[start:start + WRITE_BATCH]
            await self._store.associations.write(batch)
            self._index.set_many(LDAP, [(row.medium, row.address, row.mxid) for row in batch])
            for row in batch:
                threepid = Threepid(row.medium, row.address)
                if row.mxid is None:
                    self._known.pop(threepid, None)
                else:
                    self._known[threepid] = row.mxid
        return written, len(gone)
