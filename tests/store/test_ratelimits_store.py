"""Rate-limit buckets in the store, on SQLite and PostgreSQL: atomic, all or nothing,
and shared by every connection (so by every worker and instance)."""

from __future__ import annotations

import asyncio

from kith.config import DbConfig
from kith.store import Charge, Refusal, Store

S = 1_000_000  # µs
T0 = 1_700_000_000 * S


async def test_a_bucket_takes_its_burst_then_refuses(store: Store) -> None:
    charge = Charge("mail:alice", cost_us=10 * S, window_us=30 * S)  # burst 3, 1 per 10 s
    for _ in range(3):
        assert await store.rate_limits.take([charge], T0) is None
    assert await store.rate_limits.take([charge], T0) == Refusal(charge, 10 * S)
    # Refused hits are not counted: 9.9 s later one is still 0.1 s away.
    assert await store.rate_limits.take([charge], T0 + 9_900_000) == Refusal(charge, 100_000)
    assert await store.rate_limits.take([charge], T0 + 10 * S) is None
    assert await store.rate_limits.time_of("mail:alice") == T0 + 40 * S
    # A long idle bucket starts afresh, with its whole burst.
    for _ in range(3):
        assert await store.rate_limits.take([charge], T0 + 1000 * S) is None
    assert await store.rate_limits.take([charge], T0 + 1000 * S) is not None


async def test_several_buckets_are_charged_all_or_none(store: Store) -> None:
    full = Charge("ip:1", cost_us=S, window_us=S)  # burst 1
    other = Charge("recipient:bob", cost_us=S, window_us=5 * S)
    assert await store.rate_limits.take([full], T0) is None
    refusal = await store.rate_limits.take([other, full], T0)
    assert refusal == Refusal(full, S)
    # `other` was charged inside the refused transaction: rolled back with it.
    assert await store.rate_limits.time_of("recipient:bob") is None
    assert await store.rate_limits.take([other], T0) is None
    assert await store.rate_limits.time_of("recipient:bob") == T0 + S


async def test_add_charges_whatever_the_level_and_answers_the_time(store: Store) -> None:
    times = await store.rate_limits.add({"lookup:a": 5 * S, "lookup:b": S}, T0)
    assert times == {"lookup:a": T0 + 5 * S, "lookup:b": T0 + S}
    times = await store.rate_limits.add({"lookup:a": 100 * S}, T0 + S)
    assert times == {"lookup:a": T0 + 105 * S}  # over any window: counted elsewhere
    assert await store.rate_limits.add({}, T0) == {}


async def test_purge_forgets_only_empty_buckets(store: Store) -> None:
    await store.rate_limits.add({f"old:{i}": S for i in range(50)}, T0)
    await store.rate_limits.add({"busy": 3600 * S}, T0)
    assert await store.rate_limits.purge(T0 + 2 * S) == 50
    assert await store.rate_limits.time_of("old:0") is None
    assert await store.rate_limits.time_of("busy") == T0 + 3600 * S
    assert await store.rate_limits.purge(T0 + 2 * S) == 0


async def test_concurrent_hits_from_two_connections_pools_never_exceed_the_burst(
        db_config: DbConfig) -> None:
    """Two stores on one database are two processes' pools: 40 hits racing for a burst
    of 7 get exactly 7 through."""
    first = await Store.open(db_config)
    second = await Store.open(db_config)
    try:
        charge = Charge("mail:race", cost_us=3600 * S, window_us=7 * 3600 * S)
        answers = await asyncio.gather(*(
            (first if i % 2 else second).rate_limits.take([charge], T0) for i in range(40)))
        assert sum(answer is None for answer in answers) == 7
    finally:
        await first.close()
        await second.close()
