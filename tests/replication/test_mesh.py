"""Two kith instances replicating both ways over mutual TLS, on SQLite and PostgreSQL:
binds and unbinds travel, a peer that was down gets everything it missed, and a pusher
killed mid-push loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from kith.config import load_config
from kith.server import KithServer
from kith.store import Store
from kith.threepid import lookup_hash
from tests.conftest import (
    KithFactory,
    KithProcessFactory,
    RunningKith,
    wait_for,
    write_config,
)
from tests.replication.conftest import Databases, MeshNode

pytestmark = pytest.mark.usefixtures("homeserver")


async def start_pair(kith_factory: KithFactory, a: MeshNode, b: MeshNode,
                     databases: Databases) -> tuple[RunningKith, RunningKith]:
    nodes = []
    for node, peer, name in ((a, b, "a"), (b, a, "b")):
        sections = node.sections(peer)
        sections.update(databases())
        nodes.append(await kith_factory(sections, name=name))
    return nodes[0], nodes[1]


async def own_bindings(store: Store, origin: str | None = None) -> dict[str, tuple[str, int]]:
    """address → (mxid, id at the origin) of the live bindings made on `origin` (None:
    the store's own server)."""
    where = "origin_server IS NULL" if origin is None else "origin_server = :origin"
    column = "id" if origin is None else "origin_id"
    async with store.db.engine.connect() as conn:
        rows = await conn.execute(text(
            f"SELECT address, mxid, {column} FROM threepid_associations "  # noqa: S608
            f"WHERE source = 'local' AND mxid IS NOT NULL AND {where}"), {"origin": origin})
        return {address: (mxid, int(i)) for address, mxid, i in rows}


async def looked_up(kith: RunningKith, token: str, address: str) -> str | None:
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    hash_ = lookup_hash("email", address, pepper)
    return (await kith.lookup(token, "sha256", [hash_])).get(hash_)


async def test_binds_and_unbinds_travel_both_ways(
        databases: Databases, kith_factory: KithFactory, node_a: MeshNode,
        node_b: MeshNode) -> None:
    a, b = await start_pair(kith_factory, node_a, node_b, databases)
    token_a, token_b = await a.register(), await b.register()

    await a.bind("alice@example.com", "@alice:hs.test")
    assert await wait_for("B to find A's bind",
                          lambda: looked_up(b, token_b, "alice@example.com")) == "@alice:hs.test"
    await b.bind("bob@example.com", "@bob:hs.test")
    assert await wait_for("A to find B's bind",
                          lambda: looked_up(a, token_a, "bob@example.com")) == "@bob:hs.test"

    async with a.http.post(f"{a.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "alice@example.com",
            "mxid": "@alice:hs.test"}) as resp:
        assert resp.status == 200
    await wait_for("the unbind to reach B",
                   lambda: _is_none(looked_up(b, token_b, "alice@example.com")))
    # What came from a peer is never pushed back: each has only its own rows to send.
    assert b.server.store is not None and a.server.store is not None
    assert await own_bindings(b.server.store, "kith-a.test") == {}
    assert [c.address for c in await b.server.store.associations.own_changes(0, 10)] == [
        "bob@example.com"]


async def _is_none(lookup: Any) -> bool:
    return await lookup is None


async def test_a_peer_that_was_down_gets_exactly_what_it_missed(
        databases: Databases, kith_factory: KithFactory, node_a: MeshNode,
        node_b: MeshNode) -> None:
    a, b = await start_pair(kith_factory, node_a, node_b, databases)
    await a.bind("early@example.com", "@early:hs.test")
    assert b.server.store is not None
    await wait_for("the first bind", lambda: _has(b.server.store, "early@example.com"))
    await b.server.stop()

    async def bind(i: int) -> None:
        await a.bind(f"user{i}@example.com", f"@user{i}:hs.test")

    await asyncio.gather(*(bind(i) for i in range(500)))
    async with a.http.post(f"{a.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "user7@example.com",
            "mxid": "@user7:hs.test"}) as resp:
        assert resp.status == 200
    assert a.server.store is not None
    expected = await own_bindings(a.server.store)
    assert len(expected) == 500  # 499 of the 500, and the first
    last_change = (await a.server.store.associations.own_changes(0, 1000))[-1]
    assert last_change.mxid is None  # the unbind

    restarted = KithServer(load_config(b.config.path, env={}))
    await restarted.start()
    try:
        assert restarted.store is not None
        store = restarted.store
        await wait_for("B to catch up", lambda: _same(store, expected), timeout_s=60)
        token = await RunningKith(restarted.config, restarted, b.http, b.homeserver).register()
        assert await looked_up(RunningKith(restarted.config, restarted, b.http, b.homeserver),
                               token, "user499@example.com") == "@user499:hs.test"
        statuses = await wait_for("A to see B caught up", lambda: _caught_up(a))
        assert statuses[0].acknowledged_id == last_change.id
    finally:
        await restarted.stop()


async def _has(store: Store | None, address: str) -> bool:
    assert store is not None
    return address in await own_bindings(store, "kith-a.test")


async def _same(store: Store, expected: dict[str, tuple[str, int]]) -> bool:
    return await own_bindings(store, "kith-a.test") == expected


async def _caught_up(kith: RunningKith) -> Any:
    from kith.replication.status import peer_statuses
    from kith.threepid import now_ms

    assert kith.server.store is not None and kith.server.replication is not None
    statuses = await peer_statuses(kith.server.store, kith.server.replication.peers, now_ms())
    return statuses if all(s.behind == 0 for s in statuses) else None


async def test_a_pusher_killed_mid_push_loses_and_duplicates_nothing(
        databases: Databases, tmp_path: Path, kith_factory: KithFactory,
        kith_process: KithProcessFactory, node_a: MeshNode, node_b: MeshNode) -> None:
    b = await kith_factory({**node_b.sections(node_a), **databases()}, name="b")
    assert b.server.store is not None
    a_dir = tmp_path / "a-process"
    a_dir.mkdir()
    a_path = write_config(a_dir, {**node_a.sections(node_b), **databases()})
    a_config = load_config(str(a_path), env={})
    a = kith_process(a_path)
    # B is down while A takes the binds, so that they go out in many pushes at once.
    await b.server.stop()
    a.start(a_config.http.client_port)
    internal = f"http://127.0.0.1:{a_config.http.internal_port}"
    async with aiohttp.ClientSession() as http:
        semaphore = asyncio.Semaphore(32)

        async def bind(i: int) -> None:
            async with semaphore, http.post(f"{internal}/_matrix/identity/internal/bind", json={
                    "medium": "email", "address": f"user{i}@example.com",
                    "mxid": f"@user{i}:hs.test"}) as resp:
                assert resp.status == 200

        await asyncio.gather(*(bind(i) for i in range(3000)))
    restarted = KithServer(load_config(b.config.path, env={}))
    await restarted.start()
    try:
        assert restarted.store is not None
        store = restarted.store
        # Kill A once B has some of its binds but not all.
        await wait_for("the first pushes", lambda: _some(store), timeout_s=60, poll_s=0.01)
        a.kill(signal.SIGKILL)
        got = len(await own_bindings(store, "kith-a.test"))
        assert 0 < got < 3000, got
        a.start(a_config.http.client_port)
        a_store = await Store.open(a_config.db)
        try:
            expected = await own_bindings(a_store)
        finally:
            await a_store.close()
        assert len(expected) == 3000
        await wait_for("B to get the rest", lambda: _same(store, expected), timeout_s=90)
    finally:
        await restarted.stop()


async def _some(store: Store) -> bool:
    return 0 < len(await own_bindings(store, "kith-a.test"))
