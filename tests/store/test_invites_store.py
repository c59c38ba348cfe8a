"""The invite store on SQLite and on PostgreSQL: tokens, ephemeral keys, the onbind queue."""

from __future__ import annotations

import asyncio
from typing import Any

from kith.store import InviteTokenRow, Store
from kith.store.invites import DONE, GAVE_UP, PENDING


def invite(token: str, address: str = "bob@example.com", ts: int = 1_000) -> InviteTokenRow:
    return InviteTokenRow(medium="email", address=address, room_id="!r:hs.test",
                          sender="@alice:hs.test", token=token, received_ts=ts)


def body(invites: list[InviteTokenRow]) -> dict[str, Any]:
    return {"mxid": "@bob:hs.test", "invites": [{"token": i.token} for i in invites]}


async def queue(store: Store, now: int = 5_000,
                address: str = "bob@example.com") -> dict[str, Any] | None:
    return await store.invites.queue_onbind("email", address, "hs.test", "@bob:hs.test",
                                            now, body)


async def test_invites_and_ephemeral_keys(store: Store) -> None:
    await store.invites.add(invite("t1"), "pk1")
    assert await store.invites.get("t1") == invite("t1")
    assert await store.invites.get("t2") is None
    assert await store.invites.has_pending("email", "bob@example.com")
    assert not await store.invites.has_pending("email", "carol@example.com")
    assert await store.invites.count_ephemeral_key_check("pk1")
    assert not await store.invites.count_ephemeral_key_check("pk2")
    await store.invites.remove("t1", "pk1")
    assert await store.invites.get("t1") is None
    assert not await store.invites.count_ephemeral_key_check("pk1")


async def test_old_invites_and_keys_are_deleted(store: Store) -> None:
    await store.invites.add(invite("old", ts=1_000), "pk-old")
    await store.invites.add(invite("new", ts=9_000), "pk-new")
    # Imported from a Sydent too old to record when: age unknown, kept.
    await store.invites.import_rows([invite("unknown", ts=0)], [("pk-unknown", 0, 0)])
    assert await store.invites.delete_older_than(5_000) == 2
    assert await store.invites.get("old") is None
    assert not await store.invites.count_ephemeral_key_check("pk-old")
    for token, key in (("new", "pk-new"), ("unknown", "pk-unknown")):
        assert await store.invites.get(token) is not None
        assert await store.invites.count_ephemeral_key_check(key)
    assert await store.invites.delete_older_than(5_000) == 0


async def test_queue_onbind_takes_each_invite_once(store: Store) -> None:
    await store.invites.add(invite("t1", ts=2), "pk1")
    await store.invites.add(invite("t2", ts=1), "pk2")
    await store.invites.add(invite("t3", address="carol@example.com"), "pk3")
    assert sorted(await store.invites.pending_threepids()) == [
        ("email", "bob@example.com"), ("email", "carol@example.com")]
    first, second = await asyncio.gather(queue(store), queue(store))
    taken = [b for b in (first, second) if b is not None]
    assert taken == [{"mxid": "@bob:hs.test", "invites": [{"token": "t2"}, {"token": "t1"}]}]
    assert await queue(store) is None
    assert not await store.invites.has_pending("email", "bob@example.com")
    row = await store.invites.get("t1")
    assert row is not None and row.sent_ts == 5_000
    assert await store.invites.pending_threepids() == [("email", "carol@example.com")]
    assert [(d.destination, state) for d, state in await store.invites.deliveries()] == [
        ("hs.test", PENDING)]


async def test_claims_are_exclusive_and_leased(store: Store) -> None:
    await store.invites.add(invite("t1"), "pk1")
    await queue(store, now=1_000)
    assert await store.invites.due_deliveries(999, 10) == []
    (delivery_id,) = await store.invites.due_deliveries(1_000, 10)
    claims = await asyncio.gather(*(store.invites.claim(delivery_id, 1_000, 60_000)
                                    for _ in range(5)))
    won = [c for c in claims if c is not None]
    assert len(won) == 1
    assert await store.invites.due_deliveries(2_000, 10) == []      # leased
    assert await store.invites.next_due_ts(2_000) == 61_000          # the lease's end
    assert await store.invites.due_deliveries(61_001, 10) == [delivery_id]  # lease over
    await store.invites.failed(won[0], next_attempt_ts=3_000, error="HTTP 500")
    assert await store.invites.next_due_ts(2_000) == 3_000
    await store.invites.retry_now(2_000)
    assert await store.invites.next_due_ts(2_000) == 2_000
    again = await store.invites.claim(delivery_id, 2_000, 60_000)
    assert again is not None and again.attempts == 1
    await store.invites.delivered(again, 2_500, delete_tokens=True)
    assert await store.invites.get("t1") is None
    assert [(d.attempts, state) for d, state in await store.invites.deliveries()] == [
        (2, DONE)]
    assert await store.invites.next_due_ts(2_500) is None
    assert await store.invites.claim(delivery_id, 99_999, 60_000) is None


async def test_give_up_and_release(store: Store) -> None:
    await store.invites.add(invite("t1"), "pk1")
    await store.invites.add(invite("t2", address="carol@example.com"), "pk2")
    await queue(store, now=1_000)
    await queue(store, now=1_000, address="carol@example.com")
    first_id, second_id = await store.invites.due_deliveries(1_000, 10)
    first = await store.invites.claim(first_id, 1_000, 60_000)
    second = await store.invites.claim(second_id, 1_000, 60_000)
    assert first is not None and second is not None
    await store.invites.gave_up(first, 2_000, "HTTP 500")
    await store.invites.release([first_id, second_id])
    assert await store.invites.due_deliveries(1_000, 10) == [second_id]
    states = [state for _, state in await store.invites.deliveries()]
    assert states == [GAVE_UP, PENDING]
    assert await store.invites.get("t1") is not None  # kept: never delivered
    await store.invites.prune(2_000)  # finished at 2_000: not before
    assert len(await store.invites.deliveries()) == 2
    await store.invites.prune(2_001)
    assert [state for _, state in await store.invites.deliveries()] == [PENDING]


async def test_pending_invites_are_coherent_across_workers(store: Store) -> None:
    """Each worker keeps the pending addresses in memory; a shared counter tells the
    others when one stores an invite."""
    from kith.services.coherence import ChangeCounter
    from kith.services.onbind import PendingInvites

    shared = ChangeCounter()
    storing, binding = PendingInvites(store, shared), PendingInvites(store, shared)
    assert not await binding.may_have("email", "bob@example.com")
    await store.invites.add(invite("t1"), "pk1")
    storing.added("email", "bob@example.com")
    assert await binding.may_have("email", "bob@example.com")
    assert await storing.may_have("email", "bob@example.com")
    binding.taken("email", "bob@example.com")
    assert not await binding.may_have("email", "bob@example.com")
    # Without a shared counter (another instance), a reload (the sweep) finds it.
    other = PendingInvites(store)
    assert await other.may_have("email", "bob@example.com")
    await store.invites.add(invite("t2", address="carol@example.com"), "pk2")
    assert not await other.may_have("email", "carol@example.com")
    assert await other.reload() == {("email", "bob@example.com"),
                                    ("email", "carol@example.com")}


async def test_an_operator_retries_and_revives_deliveries(store: Store) -> None:
    await store.invites.add(invite("t1"), "pk1")
    await store.invites.add(invite("t2", address="carol@example.com"), "pk2")
    await queue(store, now=1_000)
    await queue(store, now=1_000, address="carol@example.com")
    first, second = await store.invites.due_deliveries(1_000, 10)
    failing = await store.invites.claim(first, 1_000, 60_000)
    assert failing is not None
    await store.invites.failed(failing, next_attempt_ts=50_000, error="HTTP 502")
    stuck = await store.invites.claim(second, 1_000, 60_000)
    assert stuck is not None
    await store.invites.gave_up(stuck, 2_000, "connection refused")
    assert [(d.state, d.attempts, d.finished_ts, d.last_error)
            for d in await store.invites.report()] == [
        (PENDING, 1, None, "HTTP 502"), (GAVE_UP, 1, 2_000, "connection refused")]
    assert await store.invites.retry_now(3_000) == 1
    assert await store.invites.revive(3_000) == 1
    assert await store.invites.revive(3_000) == 0
    assert [(d.state, d.next_attempt_ts, d.finished_ts) for d in await store.invites.report()] == [
        (PENDING, 3_000, None), (PENDING, 3_000, None)]
    assert await store.invites.due_deliveries(3_000, 10) == [first, second]
