"""Pushing this server's own binds and unbinds to every peer, in order, none lost.

Each peer has a cursor in the store: the id of the last own change it acknowledged.  A
peer's loop reads the next changes after it (at most `BATCH`, in id order), signs them
now, POSTs them, and moves the cursor only once the peer answered 2xx.  So a restart or
an outage resumes where the peer left off; a push whose answer was lost is sent again,
which a receiver stores once (same origin, same id).  One push at a time per peer keeps
its stream in order.  A failing peer is tried again after 1, 2, 4 ... s, up to
`replication.max_retry_interval`; the others are not held up.

Only the server's own changes go out (the store keeps them apart): what came from a peer,
and rows synced from a directory, which every node syncs for itself, are never pushed.
Of several workers one pushes (the server picks it); of several instances on one
PostgreSQL database, the one holding the store's lock `replication-push`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import msgspec

from kith.metrics import REPLICATION_PUSHED
from kith.replication.peers import Peer, ReplicationPeers
from kith.replication.wire import signed_association
from kith.services.coherence import Turn
from kith.services.keys import ServerKeys
from kith.store import OwnChange, Store
from kith.threepid import now_ms

log = logging.getLogger(__name__)

BATCH = 100  # as Sydent: a Sydent peer expects no more in one push
PUSH_LOCK = "replication-push"
# New own changes are looked for this often (a bind in this process wakes the pusher
# at once).
POLL_INTERVAL_S = 1.0
TIMEOUT_S = 30.0
FIRST_RETRY_S = 1.0
_ERROR_BODY_BYTES = 300


@dataclass(frozen=True)
class Batch:
    """Own changes ready to push: the id of the last one, how many, the request body."""

    last_id: int
    count: int
    body: bytes


async def _cancel(task: asyncio.Task[Batch] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class PushFailed(Exception):
    """A push the peer did not accept (the message says why, for the operator)."""


class ReplicationPusher:
    def __init__(self, store: Store, keys: ServerKeys, peers: ReplicationPeers,
                 client_tls: ssl.SSLContext, *, max_retry_interval_s: float,
                 poll_interval_s: float = POLL_INTERVAL_S,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self._keys = keys
        self._peers = peers
        self._tls = client_tls
        self.max_retry_interval_s = max_retry_interval_s
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._wakeups = {peer.name: asyncio.Event() for peer in peers}
        self.turn = Turn(store.locks, PUSH_LOCK, "pushes to the replication peers")

    def wake(self) -> None:
        """Own changes were written: push them now rather than at the next poll."""
        for event in self._wakeups.values():
            event.set()

    async def run(self) -> None:
        """Push to every peer until cancelled (once this instance's turn has come)."""
        held = await self.turn.wait(POLL_INTERVAL_S * 10)
        try:
            log.info("replication: process %d pushes to %d peers", os.getpid(), len(self._peers))
            await self.store.peers.track(self._peers.names)
            connector = aiohttp.TCPConnector(ssl=self._tls, limit_per_host=1)
            async with aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                    headers={"User-Agent": "kith"}) as session:
                await asyncio.gather(*(self._follow(session, peer) for peer in self._peers))
        finally:
            self.turn.held = False
            await held.release()

    async def _follow(self, session: aiohttp.ClientSession, peer: Peer) -> None:
        wakeup = self._wakeups[peer.name]
        failures = 0
        cursor: int | None = None
        # While a batch is on its way, the next one is read and signed: the peer,
        # checking what it receives, is the slower side.
        ahead: asyncio.Task[Batch] | None = None
        try:
            while True:
                wakeup.clear()
                try:
                    if cursor is None:
                        cursor = await self._cursor(peer)
                    batch = await ahead if ahead is not None else await self.prepare(cursor)
                    ahead = None
                    if batch.count:
                        ahead = asyncio.create_task(self.prepare(batch.last_id))
                        await self.send(session, peer, batch)
                        cursor = batch.last_id
                except (PushFailed, aiohttp.ClientError, TimeoutError, OSError) as exc:
                    await _cancel(ahead)
                    ahead = None
                    failures += 1
                    delay = min(self.max_retry_interval_s,
                                FIRST_RETRY_S * 2 ** min(failures - 1, 20))
                    await self._failed(peer, _describe(exc), failures, delay)
                    await asyncio.sleep(delay)
                    continue
                except Exception:  # noqa: BLE001 - e.g. the store; the next poll tries again
                    await _cancel(ahead)
                    ahead = None
                    log.warning("replication: pushing to %s failed", peer.name, exc_info=True)
                    await asyncio.sleep(self.poll_interval_s)
                    continue
                if failures:
                    log.warning("replication: %s accepts pushes again (after %d failed "
                                "tries)", peer.name, failures)
                    failures = 0
                if not batch.count:  # all sent: wait for more
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wakeup.wait(), self.poll_interval_s)
        finally:
            await _cancel(ahead)

    async def _cursor(self, peer: Peer) -> int:
        state = (await self.store.peers.push_states()).get(peer.name)
        return (state.last_sent_version if state else None) or 0

    async def prepare(self, after: int) -> Batch:
        """The next own changes after `after`, signed now, as a push body."""
        changes = await self.store.associations.own_changes(after, BATCH)
        if not changes:
            return Batch(after, 0, b"")
        body = await asyncio.to_thread(self._body, changes)
        return Batch(changes[-1].id, len(changes), body)

    async def send(self, session: aiohttp.ClientSession, peer: Peer, batch: Batch) -> None:
        """Push `batch`, and move the peer's cursor past it once it took it (any 2xx, as
        Sydent); PushFailed if it did not."""
        started = time.monotonic()
        async with session.post(peer.push_url, data=batch.body,
                                headers={"Content-Type": "application/json"}) as response:
            if not 200 <= response.status < 300:
                text = (await response.content.read(_ERROR_BODY_BYTES)).decode(
                    "utf-8", "replace")
                raise PushFailed(f"HTTP {response.status}: {' '.join(text.split())}")
        await self.store.peers.acknowledged(peer.name, batch.last_id, self._clock())
        REPLICATION_PUSHED.labels(peer.name).inc(batch.count)
        log.debug("replication: %s took %d changes up to id %d in %.3f s", peer.name,
                  batch.count, batch.last_id, time.monotonic() - started)

    def _body(self, changes: list[OwnChange]) -> bytes:
        # Signing is CPU work (kept off the event loop by the caller).
        return msgspec.json.encode({"sgAssocs": {
            str(change.id): signed_association(change, self._keys) for change in changes}})

    async def _failed(self, peer: Peer, error: str, failures: int, delay: float) -> None:
        # Said loudly once per outage; while it lasts, quietly.
        level = logging.WARNING if failures == 1 else logging.INFO
        log.log(level, "replication: push to %s (%s) failed: %s; trying again in %.0f s",
                peer.name, peer.base_url, error, delay)
        try:
            await self.store.peers.failed(peer.name, error, self._clock())
        except Exception as exc:  # noqa: BLE001 - the store may be what failed
            log.debug("replication: cannot record the failure: %s", exc)


def _describe(exc: BaseException) -> str:
    """What went wrong, for the log and `kith peers`: never a certificate or key."""
    if isinstance(exc, PushFailed):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
        return f"TLS: the peer's certificate was refused ({reason})"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError) \
            and "alert" in str(exc).lower():
        return "TLS: the peer refused our certificate"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT_S:.0f} s"
    return f"{type(exc).__name__}: {exc}"
