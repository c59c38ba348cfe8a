"""The rate limits (kith.services.limits) on a real store, driven by an injected clock:
Sydent's leaky bucket, shared through the database, and the lookup budget counted in
memory and flushed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kith.config import DbConfig, KithConfig, load_config
from kith.errors import M_LIMIT_EXCEEDED
from kith.services.limits import (
    Limit,
    LookupBudget,
    RateLimited,
    Requester,
    SendLimits,
    ip_key,
)
from kith.store import Store
from tests.conftest import write_config

S = 1_000_000  # µs


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * S

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * S)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(DbConfig(file=str(tmp_path / "kith.db")))
    yield opened
    await opened.close()


def config(tmp_path: Path, **email: object) -> KithConfig:
    return load_config(str(write_config(tmp_path, {"email": email})), env={})


async def test_burst_then_refused_with_retry_after(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    limits = SendLimits(store, config(tmp_path, **{"email.ratelimit_sender.burst": 3,
                                                  "email.ratelimit_sender.rate_hz": 0.1}),
                        clock)
    for _ in range(3):
        await limits.hit((limits.email_sender, "@alice:hs.test"))
    with pytest.raises(RateLimited) as raised:
        await limits.hit((limits.email_sender, "@alice:hs.test"))
    assert (raised.value.status, raised.value.errcode) == (429, M_LIMIT_EXCEEDED)
    assert raised.value.to_json()["retry_after_ms"] == 10_000
    await limits.hit((limits.email_sender, "@bob:hs.test"))  # a bucket per key
    await limits.hit((limits.email_recipient, "@alice:hs.test"))  # and per limit


async def test_drains_one_per_period_and_refusals_count_nothing(
        tmp_path: Path, store: Store) -> None:
    clock = Clock()
    limits = SendLimits(store, config(tmp_path, **{"email.ratelimit_recipient.burst": 2,
                                                  "email.ratelimit_recipient.rate_hz": 0.1}),
                        clock)
    hit = (limits.email_recipient, "bob@example.com")
    await limits.hit(hit)
    await limits.hit(hit)
    clock.advance(9.9)
    for _ in range(20):
        with pytest.raises(RateLimited) as raised:
            await limits.hit(hit)
        assert raised.value.retry_after_s == pytest.approx(0.1)
    clock.advance(0.1)  # one period: one hit drained
    await limits.hit(hit)
    with pytest.raises(RateLimited):
        await limits.hit(hit)
    clock.advance(25)  # 2.5 periods: two more
    await limits.hit(hit)
    await limits.hit(hit)
    with pytest.raises(RateLimited):
        await limits.hit(hit)


async def test_a_request_refused_by_one_limit_counts_in_none(
        tmp_path: Path, store: Store) -> None:
    clock = Clock()
    limits = SendLimits(store, config(tmp_path, **{"email.ratelimit_recipient.burst": 1}),
                        clock)
    await limits.hit((limits.email_recipient, "bob@example.com"))
    for _ in range(10):
        with pytest.raises(RateLimited):
            await limits.hit((limits.email_sender, "@alice:hs.test"),
                             (limits.email_recipient, "bob@example.com"))
    # Alice's sender bucket (burst 5) was never charged by the refused requests.
    for n in range(5):
        await limits.hit((limits.email_sender, "@alice:hs.test"),
                         (limits.email_recipient, f"x{n}@example.com"))
    # A key of None (no client address known) is not counted at all.
    await limits.hit((limits.client_ip, None))


async def test_the_store_keeps_no_address_and_forgets_drained_buckets(
        tmp_path: Path, store: Store) -> None:
    clock = Clock()
    limits = SendLimits(store, config(tmp_path), clock)  # 1 per 300 s per recipient
    for n in range(30):
        await limits.hit((limits.email_recipient, f"old{n}@example.com"))
    clock.advance(200)
    await limits.hit((limits.email_recipient, "busy@example.com"))
    async with store.db.engine.connect() as conn:
        from sqlalchemy import text
        names = [name for (name,) in await conn.execute(text("SELECT bucket FROM rate_limits"))]
    assert len(names) == 31 and not any("example" in name for name in names)
    clock.advance(150)  # the old buckets drained (300 s); the busy one has 150 s to go
    assert await limits.purge() == 30
    with pytest.raises(RateLimited):
        for _ in range(5):
            await limits.hit((limits.email_recipient, "busy@example.com"))


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Limit("x", burst=0, rate_hz=1)
    with pytest.raises(ValueError):
        Limit("x", burst=1, rate_hz=0)


def test_clients_are_keyed_by_address_and_ipv6_by_64() -> None:
    assert ip_key("192.0.2.7") == "192.0.2.7"
    assert ip_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::2") == \
        "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("not an address") == "not an address"


# ----------------------------------------------------------------------- lookup budget

ALICE = Requester(ip="192.0.2.1", user_id="@alice:hs.test")


async def test_lookup_budget_refuses_past_the_minute_and_refills(store: Store) -> None:
    clock = Clock()
    budget = LookupBudget(store, per_account=100, per_ip=1000, clock=clock)
    for _ in range(10):
        budget.spend(10, ALICE)
    with pytest.raises(RateLimited) as raised:
        budget.spend(1, ALICE)
    assert raised.value.retry_after_s == pytest.approx(0.6)  # 100 a minute: one per 0.6 s
    budget.spend(1, Requester(ip="192.0.2.1", user_id="@bob:hs.test"))  # per account
    clock.advance(6)  # ten addresses' worth
    budget.spend(10, ALICE)
    with pytest.raises(RateLimited):
        budget.spend(1, ALICE)
    clock.advance(60)
    budget.spend(100, ALICE)  # the whole budget again after a quiet minute


async def test_lookup_budget_per_address_holds_for_every_account(store: Store) -> None:
    clock = Clock()
    budget = LookupBudget(store, per_account=100, per_ip=150, clock=clock)
    budget.spend(100, ALICE)
    with pytest.raises(RateLimited):
        budget.spend(100, Requester(ip="192.0.2.1", user_id="@bob:hs.test"))
    # Refused by the address's budget: bob's own was not charged.
    budget.spend(100, Requester(ip="192.0.2.2", user_id="@bob:hs.test"))
    budget.spend(50, Requester(ip="192.0.2.1"))  # v1: no account, the address only
    with pytest.raises(RateLimited):
        budget.spend(1, Requester(ip="192.0.2.1"))


async def test_lookup_budgets_of_two_processes_share_the_store(tmp_path: Path) -> None:
    """Two budgets on two stores of one database are two workers: once both flushed,
    each refuses what the other spent; before, each saw at most its own (the slack)."""
    clock = Clock()
    db = DbConfig(file=str(tmp_path / "shared.db"))
    first, second = await Store.open(db), await Store.open(db)
    try:
        a = LookupBudget(first, per_account=100, per_ip=10_000, clock=clock)
        b = LookupBudget(second, per_account=100, per_ip=10_000, clock=clock)
        a.spend(60, ALICE)
        b.spend(60, ALICE)  # unseen by b yet: within the slack of one budget per process
        await a.flush()
        await b.flush()  # b learns the shared total: 120 of 100
        with pytest.raises(RateLimited) as raised:
            b.spend(1, ALICE)
        assert raised.value.retry_after_s == pytest.approx(12.6)  # 21 addresses × 0.6 s
        await a.flush()  # a reads the total at its next flush, even with nothing to add
        clock.advance(5)
        with pytest.raises(RateLimited):
            a.spend(1, ALICE)
        clock.advance(8)  # past the 12.6 s
        a.spend(1, ALICE)
    finally:
        await first.close()
        await second.close()
