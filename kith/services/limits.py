"""Rate limits: how much mail, text and invites a requester may have kith send, and how
many addresses it may look up, counted together by every worker and every instance
sharing the database.

Each limit is a leaky bucket per key, as Sydent's: `burst` hits at once, then one per
1/rate_hz seconds.  The buckets live in the store (kith.store.ratelimits), so a limit
holds across processes.  What sends a message (requestToken, store-invite) pays a store
round trip per request, all its buckets in one transaction: a refused request counts in
none of them.  Lookups cannot afford that, so `LookupBudget` counts in memory and
adds its counts to the store once a second, deciding on the shared total it last read
plus what it counted since.  Refusals are 429 M_LIMIT_EXCEEDED with `retry_after_ms`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import math
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from kith.config import KithConfig
from kith.errors import M_LIMIT_EXCEEDED, MatrixError
from kith.store import Charge, Store

log = logging.getLogger(__name__)

LOOKUP_BUDGET_FLUSH_S = 1.0
_US = 1_000_000


def now_us() -> int:
    """Wall-clock microseconds: instances on several hosts share the buckets."""
    return time.time_ns() // 1000


class RateLimited(MatrixError):
    """Too many hits for one key: 429 M_LIMIT_EXCEEDED, with `retry_after_ms`."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(429, M_LIMIT_EXCEEDED, "Too many requests, try again later",
                         retry_after_ms=max(1, math.ceil(retry_after_s * 1000)))


class Requester(NamedTuple):
    """Who asks, as the limits key it: the client's address and, on v2, its account.
    (A tuple: one is made for every lookup.)"""

    ip: str | None
    user_id: str | None = None


@functools.lru_cache(maxsize=4096)  # parsing costs more than the rest of the budget check
def ip_key(ip: str) -> str:
    """The key of a client address: an IPv6 client is counted by its /64 (one host
    usually has all of one), an IPv4-mapped one as the IPv4 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: its name (part of every bucket's name), burst and drain rate."""

    name: str
    burst: int
    rate_hz: float
    # How long the bucket takes to drain one hit (a fraction of a microsecond for a
    # budget of millions of addresses), and how far ahead of now a full bucket runs.
    period_us: float = field(init=False, compare=False)
    window_us: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.burst < 1 or not self.rate_hz > 0:
            raise ValueError("burst must be at least 1 and rate_hz positive")
        object.__setattr__(self, "period_us", _US / self.rate_hz)
        object.__setattr__(self, "window_us", round(self.burst * _US / self.rate_hz))

    def cost_us(self, hits: int) -> int:
        """What `hits` cost the bucket, in whole microseconds (at least one)."""
        return max(1, round(hits * self.period_us))

    def bucket(self, key: str) -> str:
        """The bucket's stored name: the key is hashed, so the store keeps no address."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        return f"{self.name}:{urlsafe_b64encode(digest).rstrip(b'=').decode()}"

    def charge(self, key: str, hits: int = 1) -> Charge:
        return Charge(self.bucket(key), self.cost_us(hits), self.window_us)


class SendLimits:
    """The limits on what makes kith send something: mail and texts (Sydent's limits per
    sender, per phone number and per calling code, and kith's per recipient address and
    per client address), and requests to homeservers (account registration, per client
    address, in a bucket of its own).  One store round trip per request."""

    def __init__(self, store: Store, config: KithConfig,
                 clock: Callable[[], int] = now_us) -> None:
        email, sms, general = config.email, config.sms, config.general
        self.email_sender = Limit("email.sender", email.ratelimit_sender_burst,
                                  email.ratelimit_sender_rate_hz)
        self.email_recipient = Limit("email.recipient", email.ratelimit_recipient_burst,
                                     email.ratelimit_recipient_rate_hz)
        self.msisdn = Limit("msisdn", sms.msisdn_ratelimit_burst,
                            sms.msisdn_ratelimit_rate_hz)
        self.country = Limit("country", sms.country_ratelimit_burst,
                             sms.country_ratelimit_rate_hz)
        self.client_ip = Limit("client_ip", general.client_ip_ratelimit_burst,
                               general.client_ip_ratelimit_rate_hz)
        self.register_ip = Limit("register.ip", general.client_ip_ratelimit_burst,
                                 general.client_ip_ratelimit_rate_hz)
        self._store = store
        self._clock = clock

    async def hit(self, *hits: tuple[Limit, str | None]) -> None:
        """Count one hit for each (limit, key) with a key, or for none of them when one
        is used up: then RateLimited, saying when that one has room again."""
        charges = [limit.charge(key) for limit, key in hits if key is not None]
        refusal = await self._store.rate_limits.take(charges, self._clock())
        if refusal is not None:
            log.info("rate limit %s reached", refusal.charge.bucket.partition(":")[0])
            raise RateLimited(refusal.retry_after_us / _US)

    async def purge(self) -> int:
        """Forget the buckets of every limit that are empty by now; how many went."""
        return await self._store.rate_limits.purge(self._clock())


@dataclass(slots=True)
class _View:
    """This process's view of one bucket: when it will be empty (the shared bucket as of
    the last flush, plus what was counted here since), and what was counted here since."""

    tat_us: float = 0
    pending: int = 0
    bucket: str = ""  # its name in the store, once a flush needed it


@dataclass(slots=True)
class _Ledger:
    """One budget's views, by key."""

    limit: Limit
    views: dict[str, _View] = field(default_factory=dict)


class LookupBudget:
    """Addresses per minute, per account and per client address, counted in memory and
    shared through the store every second (`run`).

    Slack: a process decides on the shared total as of its last flush plus its own
    count, so what the others accepted since (up to two flush intervals: theirs and
    its own) is unseen.  With P processes (workers × instances) a client spending its
    whole budget at once on each of them gets up to P budgets, once; within two seconds
    every process sees the shared total and refuses until it drains.  Over minutes the
    budget holds, since every accepted address is charged to the shared bucket.
    """

    def __init__(self, store: Store, per_account: int, per_ip: int,
                 clock: Callable[[], int] = now_us,
                 flush_interval_s: float = LOOKUP_BUDGET_FLUSH_S) -> None:
        self.per_account = Limit("lookup.account", per_account, per_account / 60)
        self.per_ip = Limit("lookup.ip", per_ip, per_ip / 60)
        self._accounts = _Ledger(self.per_account)
        self._ips = _Ledger(self.per_ip)
        self._store = store
        self._clock = clock
        self._flush_interval_s = flush_interval_s
        self._failing = False

    def spend(self, addresses: int, requester: Requester) -> None:
        """Count `addresses` against the requester's budgets, or refuse (RateLimited)
        counting nothing.  The hot path: two dict probes and some arithmetic."""
        now = self._clock()
        ip, user_id = requester
        account = by_ip = None
        if user_id is not None:
            account, account_tat = self._check(self._accounts, user_id, addresses, now)
        if ip is not None:
            by_ip, ip_tat = self._check(self._ips, ip, addresses, now)
        if account is not None:
            account.tat_us = account_tat
            account.pending += addresses
        if by_ip is not None:
            by_ip.tat_us = ip_tat
            by_ip.pending += addresses

    @staticmethod
    def _check(ledger: _Ledger, key: str, addresses: int, now: int) -> tuple[_View, float]:
        """The key's view and its time with `addresses` more, or RateLimited."""
        view = ledger.views.get(key)
        if view is None:
            view = ledger.views[key] = _View()
        limit = ledger.limit
        tat = (view.tat_us if view.tat_us > now else now) + addresses * limit.period_us
        if tat - now > limit.window_us:
            raise RateLimited((tat - now - limit.window_us) / _US)
        return view, tat

    async def flush(self) -> None:
        """Add what was counted here to the shared buckets and read their totals."""
        now = self._clock()
        for ledger in (self._accounts, self._ips):
            await self._flush(ledger, now)

    async def _flush(self, ledger: _Ledger, now: int) -> None:
        limit = ledger.limit
        for key, view in ledger.views.items():
            if not view.bucket:
                view.bucket = limit.bucket(key)
        due = {view.bucket: view.pending for view in ledger.views.values() if view.pending}
        if due:
            added = await self._store.rate_limits.add(
                {bucket: limit.cost_us(count) for bucket, count in due.items()}, now)
            self._settle(ledger, added, due)
        # What the other processes spent on the keys asked for here.
        idle = [view.bucket for view in ledger.views.values() if view.bucket not in due]
        self._settle(ledger, await self._store.rate_limits.times_of(idle), {})

    def _settle(self, ledger: _Ledger, times: dict[str, int], shared: dict[str, int]) -> None:
        """Take the store's times for the views of `times`' buckets, less the counts
        just `shared`; drop the views of empty buckets."""
        now = self._clock()
        for key, view in list(ledger.views.items()):
            if view.bucket not in times and view.bucket not in shared:
                if view.bucket and not view.pending and view.tat_us <= now:
                    del ledger.views[key]
                continue
            # What was counted while the store was asked is still to be shared.
            view.pending -= shared.get(view.bucket, 0)
            view.tat_us = max(times.get(view.bucket, 0), now) \
                + view.pending * ledger.limit.period_us
            if view.tat_us <= now:
                del ledger.views[key]

    async def run(self) -> None:
        """Flush every `flush_interval_s` until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(self._flush_interval_s)
                await self._flush_logged()
        finally:
            await self._flush_logged()

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - counts stay pending; next second tries again
            if not self._failing:
                log.warning("could not share lookup counts; counting on locally",
                            exc_info=True)
            self._failing = True
        else:
            self._failing = False
