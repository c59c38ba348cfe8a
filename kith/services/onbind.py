"""onbind: telling the homeserver of a newly bound MXID about the invites waiting for it.

A bind that finds pending invites queues the signed association (with its `invites`)
in the store in the same step as it is acknowledged, so a crash or restart loses no
invite.  A background deliverer POSTs each queued body to
`/_matrix/federation/v1/3pid/onbind` on the MXID's homeserver: HTTP 200 is success
(then the row is done and never sent again); anything else is retried with
exponential backoff (1 s doubling, capped) until `give_up_after_s` after the bind, when
it gives up with a warning.  Rows are claimed with a lease by one conditional UPDATE,
so several workers or instances on one database send each row once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from kith.federation.client import FederationClient
from kith.federation.errors import FederationError, HomeserverUnreachable
from kith.metrics import ONBIND_DELIVERIES
from kith.services.coherence import ChangeCounter
from kith.services.keys import ServerKeys
from kith.store import DeliveryReport, InviteTokenRow, OnbindDelivery, Store
from kith.threepid import mxid_server_name, now_ms

log = logging.getLogger(__name__)

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 600.0
# Another process's deliveries (a CLI bind, another instance) are noticed this often.
POLL_INTERVAL_S = 5.0
# Pending invites whose address became bound some other way (a directory sync, a bind on
# another instance, a bind racing the store-invite) are looked for this often.
SWEEP_INTERVAL_S = 60.0
MAX_CONCURRENT_SENDS = 8
# Finished deliveries are kept this long (what was sent when), then forgotten.
KEEP_FINISHED_MS = 30 * 24 * 60 * 60 * 1000
CLAIM_BATCH = 64


def backoff_s(attempts: int, base_s: float = BACKOFF_BASE_S,
              cap_s: float = BACKOFF_CAP_S) -> float:
    """Delay before the next try after `attempts` failed ones (1, 2, 4, ... s, capped)."""
    return float(min(cap_s, base_s * 2 ** min(max(attempts - 1, 0), 40)))


class PendingInvites:
    """The addresses with invites waiting, in memory: every bind asks, and a database
    read per bind cost three quarters of the bind throughput (measured).

    Kept coherent like the lookup index: a store-invite bumps `changes`, and a process
    that sees it moved reloads the set before answering.  Other instances' invites are
    found by the periodic sweep.
    """

    def __init__(self, store: Store, changes: ChangeCounter | None = None) -> None:
        self._store = store
        self._changes = changes or ChangeCounter()
        self._seen: int | None = None
        self._threepids: set[tuple[str, str]] = set()

    async def reload(self) -> set[tuple[str, str]]:
        seen = self._changes.value()
        self._threepids = set(await self._store.invites.pending_threepids())
        self._seen = seen
        return set(self._threepids)

    async def may_have(self, medium: str, address: str) -> bool:
        if self._seen != self._changes.value():
            await self.reload()
        return (medium, address) in self._threepids

    def added(self, medium: str, address: str) -> None:
        """An invite was stored (committed) by this process."""
        self._threepids.add((medium, address))
        self._changes.bump()
        if self._seen is not None:
            self._seen += 1

    def taken(self, medium: str, address: str) -> None:
        self._threepids.discard((medium, address))


class OnbindService:
    """Queues onbind bodies at bind time and delivers them in the background."""

    def __init__(self, store: Store, keys: ServerKeys, federation: FederationClient, *,
                 give_up_after_s: float, delete_tokens: bool, lease_s: float = 60.0,
                 changes: ChangeCounter | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self._store = store
        self.pending = PendingInvites(store, changes)
        self._keys = keys
        self._federation = federation
        self.give_up_after_s = give_up_after_s
        self.delete_tokens = delete_tokens
        self.lease_ms = int(lease_s * 1000)
        self.backoff_base_s = BACKOFF_BASE_S
        self.backoff_cap_s = BACKOFF_CAP_S
        self.poll_interval_s = POLL_INTERVAL_S
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._claimed: set[int] = set()

    # ------------------------------------------------------------------ at bind time

    async def attach_invites(self, medium: str, address: str, mxid: str,
                             association: dict[str, Any]) -> dict[str, Any] | None:
        """The association signed with its pending invites, queued for delivery; None
        when no invite waits for the address (the common case: a set probe)."""
        if not await self.pending.may_have(medium, address):
            return None

        def body(invites: list[InviteTokenRow]) -> dict[str, Any]:
            return self._keys.sign({**association, "invites": [
                self._signed_invite(invite, mxid) for invite in invites]})

        signed = await self._store.invites.queue_onbind(
            medium, address, mxid_server_name(mxid), mxid, self._clock(), body)
        self.pending.taken(medium, address)
        if signed is not None:
            log.info("queued %d invite(s) for onbind to %s", len(signed["invites"]),
                     mxid_server_name(mxid))
            self._wakeup.set()
        return signed

    def _signed_invite(self, invite: InviteTokenRow, mxid: str) -> dict[str, Any]:
        return {
            "medium": invite.medium, "address": invite.address, "room_id": invite.room_id,
            "sender": invite.sender, "token": invite.token, "mxid": mxid,
            "signed": self._keys.sign(
                {"mxid": mxid, "sender": invite.sender, "token": invite.token}),
        }

    # ------------------------------------------------------------------- the deliverer

    async def run(self, sweep: Callable[[], Awaitable[int]] | None = None) -> None:
        """Deliver forever: what is due now, then sleep until the next row is due (or a
        bind queues one).  Pending rows from before a restart are due at once."""
        try:
            try:
                await self._store.invites.retry_now(self._clock())
            except Exception:
                log.warning("onbind deliverer: cannot reset the backoff", exc_info=True)
            next_sweep = 0.0
            while True:
                self._wakeup.clear()
                if sweep is not None and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                    try:
                        await sweep()
                        await self._store.invites.prune(self._clock() - KEEP_FINISHED_MS)
                    except Exception:
                        log.warning("onbind: looking for bound invitees failed",
                                    exc_info=True)
                try:
                    await self.deliver_due()
                    delay = await self._sleep_s()
                except Exception:
                    log.warning("onbind deliverer: store error; retrying", exc_info=True)
                    delay = self.poll_interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
        finally:
            claimed, self._claimed = list(self._claimed), set()
            with contextlib.suppress(Exception):
                await self._store.invites.release(claimed)

    async def _sleep_s(self) -> float:
        now = self._clock()
        due = await self._store.invites.next_due_ts(now)
        if due is None:
            return self.poll_interval_s
        return min(self.poll_interval_s, max(0.0, (due - now) / 1000) + 0.01)

    # ------------------------------------------------------------- for the operator

    async def queue(self) -> list[DeliveryReport]:
        """Every delivery still kept, oldest first (`kith onbind`)."""
        return await self._store.invites.report()

    async def retry_all(self) -> tuple[int, int]:
        """Make the pending deliveries due now and give those that gave up one more
        attempt (`kith onbind --retry`); how many of each.  A running deliverer picks
        them up at its next poll."""
        now = self._clock()
        return await self._store.invites.retry_now(now), await self._store.invites.revive(now)

    async def deliver_due(self) -> int:
        """Send every delivery due now that this process can claim; how many it sent."""
        sent = 0
        limit = asyncio.Semaphore(MAX_CONCURRENT_SENDS)
        while True:
            now = self._clock()
            ids = await self._store.invites.due_deliveries(now, CLAIM_BATCH)
            claimed: list[OnbindDelivery] = []
            for delivery_id in ids:
                delivery = await self._store.invites.claim(delivery_id, now, self.lease_ms)
                if delivery is not None:
                    self._claimed.add(delivery.id)
                    claimed.append(delivery)
            if not claimed:
                return sent

            async def send(delivery: OnbindDelivery) -> None:
                async with limit:
                    await self._send(delivery)

            await asyncio.gather(*(send(delivery) for delivery in claimed))
            sent += len(claimed)

    async def _send(self, delivery: OnbindDelivery) -> None:
        """One attempt, and its outcome stored.  If the deliverer is stopped meanwhile,
        the claim stays in `_claimed` and is given back as `run` ends."""
        try:
            error = await self._post(delivery)
            now = self._clock()
            if error is None:
                await self._store.invites.delivered(delivery, now, self.delete_tokens)
                ONBIND_DELIVERIES.labels("delivered").inc()
                log.info("onbind delivered to %s (delivery %d, attempt %d)",
                         delivery.destination, delivery.id, delivery.attempts + 1)
            elif now - delivery.created_ts >= self.give_up_after_s * 1000:
                await self._store.invites.gave_up(delivery, now, error)
                ONBIND_DELIVERIES.labels("gave_up").inc()
                log.warning("onbind to %s for %s: giving up after %d attempts over %.0f s "
                            "(last error: %s); the invites were not delivered",
                            delivery.destination, delivery.mxid, delivery.attempts + 1,
                            (now - delivery.created_ts) / 1000, error)
            else:
                delay = backoff_s(delivery.attempts + 1, self.backoff_base_s,
                                  self.backoff_cap_s)
                await self._store.invites.failed(delivery, now + int(delay * 1000), error)
                ONBIND_DELIVERIES.labels("retry").inc()
                log.info("onbind to %s failed (%s); retrying in %.0f s",
                         delivery.destination, error, delay)
        except Exception:
            # The lease runs out and another try follows.
            log.warning("onbind delivery %d: cannot record the outcome", delivery.id,
                        exc_info=True)
            return
        self._claimed.discard(delivery.id)

    async def _post(self, delivery: OnbindDelivery) -> str | None:
        """None on HTTP 200, else what went wrong."""
        try:
            body = msgspec.json.decode(delivery.body)
            status, _ = await self._federation.request_json(
                delivery.destination, "POST", ONBIND_PATH, json_body=body)
        except HomeserverUnreachable as exc:
            if exc.status == 200:  # a 200 whose body is not JSON is still a 200
                return None
            return exc.reason
        except (FederationError, msgspec.DecodeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if status == 200 else f"HTTP {status}"
