"""The store's side of replication, on SQLite and PostgreSQL: associations from peers
(newest wins, idempotent, one transaction), the server's own changes for the pusher,
and each peer's push state."""

from __future__ import annotations

import dataclasses

import pytest

from kith.store import AssociationRow, PushState, ReplicationPeerRow, Store
from tests.store.test_store import binding, ids_by_address


def from_peer(address: str, mxid: str | None, *, ts: int, origin: str = "peer.test",
              origin_id: int) -> AssociationRow:
    return dataclasses.replace(binding(address, mxid, ts=ts), origin_server=origin,
                               origin_id=origin_id)


async def stored(store: Store, address: str) -> AssociationRow | None:
    return await store.associations.get("local", "email", address)


async def test_a_replicated_association_is_stored_with_its_origin(store: Store) -> None:
    row = from_peer("a@example.com", "@a:hs.test", ts=10, origin_id=7)
    await store.associations.write_replicated([row])
    assert await stored(store, "a@example.com") == row
    assert await store.associations.own_changes(0, 100) == []  # not ours: never pushed on


async def test_the_same_push_twice_changes_nothing(store: Store) -> None:
    rows = [from_peer("a@example.com", "@a:hs.test", ts=10, origin_id=7),
            from_peer("b@example.com", "@b:hs.test", ts=11, origin_id=8)]
    await store.associations.write_replicated(rows)
    ids = await ids_by_address(store)
    await store.associations.write_replicated(rows)
    assert await ids_by_address(store) == ids  # no new id: the index sees no change


async def test_newest_ts_wins_between_peers_and_the_servers_own(store: Store) -> None:
    await store.associations.write([binding("a@example.com", "@own:hs.test", ts=100)])
    # Older than our binding: ignored.
    await store.associations.write_replicated(
        [from_peer("a@example.com", "@old:hs.test", ts=50, origin_id=1)])
    assert (await stored(store, "a@example.com")).mxid == "@own:hs.test"  # type: ignore[union-attr]
    # Newer: replaces it, and a tie stays with what is stored.
    newer = from_peer("a@example.com", "@new:hs.test", ts=200, origin_id=2)
    await store.associations.write_replicated([newer])
    assert await stored(store, "a@example.com") == newer
    await store.associations.write_replicated(
        [from_peer("a@example.com", "@tie:hs.test", ts=200, origin="other.test", origin_id=9)])
    assert await stored(store, "a@example.com") == newer
    # Our own later bind always replaces a peer's.
    await store.associations.write([binding("a@example.com", "@own:hs.test", ts=300)])
    assert (await stored(store, "a@example.com")).origin_server is None  # type: ignore[union-attr]


async def test_a_tombstone_hides_older_associations_and_is_kept(store: Store) -> None:
    await store.associations.write([binding("a@example.com", "@own:hs.test", ts=100)])
    tombstone = from_peer("a@example.com", None, ts=150, origin_id=3)
    await store.associations.write_replicated([tombstone])
    assert await stored(store, "a@example.com") == tombstone
    # A bind from before the unbind, arriving late (a resent push), stays hidden.
    await store.associations.write_replicated(
        [from_peer("a@example.com", "@a:hs.test", ts=120, origin="other.test", origin_id=1)])
    assert await stored(store, "a@example.com") == tombstone


async def test_one_peers_order_is_its_ids_not_its_clock(store: Store) -> None:
    bind = from_peer("a@example.com", "@a:hs.test", ts=500, origin_id=1)
    unbind = from_peer("a@example.com", None, ts=400, origin_id=2)  # its clock went back
    await store.associations.write_replicated([bind, unbind])
    assert await stored(store, "a@example.com") == unbind
    await store.associations.write_replicated([bind])  # resent: older by id
    assert await stored(store, "a@example.com") == unbind


async def test_a_replicated_batch_is_one_transaction(store: Store) -> None:
    good = from_peer("a@example.com", "@a:hs.test", ts=10, origin_id=1)
    bad = dataclasses.replace(from_peer("b@example.com", "@b:hs.test", ts=10, origin_id=2),
                              lookup_hash=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(Exception):  # noqa: B017, PT011 - the database's own error
        await store.associations.write_replicated([good, bad])
    assert await stored(store, "a@example.com") is None


async def test_own_changes_are_the_servers_own_binds_and_unbinds_in_order(
        store: Store) -> None:
    await store.associations.write([binding("a@example.com", ts=1)])
    await store.associations.write([binding("synced@example.com", source="ldap")])
    await store.associations.write_replicated(
        [from_peer("p@example.com", "@p:hs.test", ts=5, origin_id=1)])
    await store.associations.write([binding("b@example.com", ts=2)])
    await store.associations.write([binding("a@example.com", None, ts=3)])
    changes = await store.associations.own_changes(0, 100)
    assert [(c.address, c.mxid) for c in changes] == [("b@example.com", "@alice:hs.test"),
                                                       ("a@example.com", None)]
    assert [c.id for c in changes] == sorted(c.id for c in changes)
    assert await store.associations.own_changes(changes[0].id, 100) == changes[1:]
    assert await store.associations.own_changes(0, 1) == changes[:1]
    assert await store.associations.own_backlog(0) == (2, 2)
    assert await store.associations.own_backlog(changes[0].id) == (1, 3)
    assert await store.associations.own_backlog(changes[1].id) == (0, None)
    assert await store.associations.own_ids() == {("email", "b@example.com"): changes[0].id,
                                                  ("email", "a@example.com"): changes[1].id}


async def test_push_state_of_a_peer(store: Store) -> None:
    await store.peers.import_peers([ReplicationPeerRow("imported.test", 1001, None, True, 4)])
    await store.peers.track(["configured.test", "imported.test"])
    states = await store.peers.push_states()
    assert states == {"configured.test": PushState(), "imported.test": PushState(4)}

    await store.peers.acknowledged("configured.test", 10, now_ms=1_000)
    await store.peers.failed("configured.test", "HTTP 500", now_ms=2_000)
    await store.peers.acknowledged("configured.test", 8, now_ms=3_000)  # never backwards
    assert (await store.peers.push_states())["configured.test"] == PushState(
        10, 3_000, "HTTP 500", 2_000)
    assert (await store.peers.all())[0].active  # a tracked peer counts as active


async def test_ids_can_be_moved_past_another_servers(store: Store) -> None:
    await store.associations.ids_past(5000)  # on an empty table
    await store.associations.write([binding("a@example.com")])
    first = (await ids_by_address(store))["a@example.com"]
    assert first > 5000
    await store.associations.ids_past(10)  # never backwards
    await store.associations.write([binding("b@example.com")])
    assert (await ids_by_address(store))["b@example.com"] > first
    await store.associations.ids_past(first + 1000)
    await store.associations.write([binding("a@example.com", None)])
    assert (await ids_by_address(store))["a@example.com"] > first + 1000
