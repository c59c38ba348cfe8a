"""Of several workers, or of several instances on one PostgreSQL database, exactly one
pushes to the peers; another takes over when it stops."""

from __future__ import annotations

import asyncio
import copy
import signal
from pathlib import Path

import aiohttp
import pytest

from kith.config import load_config
from kith.metrics import REPLICATION_RECEIVED
from kith.services.coherence import SharedCounters
from kith.store import Store
from tests.conftest import (
    KithFactory,
    KithProcessFactory,
    RunningKith,
    free_port,
    wait_for,
    write_config,
)
from tests.replication.conftest import MeshNode

pytestmark = pytest.mark.usefixtures("homeserver")


def test_one_worker_claims_the_pusher() -> None:
    counters = SharedCounters()
    assert counters.claim(SharedCounters.LDAP_SYNC)
    assert counters.claim(SharedCounters.REPLICATION_PUSH)  # a job of its own
    assert not counters.claim(SharedCounters.REPLICATION_PUSH)


def pushing(kith: RunningKith) -> bool:
    assert kith.server.replication is not None
    return kith.server.replication.pusher.turn.held


def refused(kith: RunningKith) -> int:
    assert kith.server.replication is not None
    return kith.server.replication.pusher.turn.refused


async def has(store: Store, address: str) -> bool:
    return await store.associations.get("local", "email", address) is not None


@pytest.mark.postgres
async def test_instances_sharing_postgresql_push_one_at_a_time(
        postgresql_url: str, kith_factory: KithFactory, node_a: MeshNode,
        node_b: MeshNode) -> None:
    # (postgresql_url first: the database outlives the kiths at teardown)
    b = await kith_factory(node_b.sections(node_a), name="b")
    sections = node_a.sections(node_b)
    sections["db"] = {"db.url": postgresql_url}
    first = await kith_factory(sections, name="first")
    second_sections = copy.deepcopy(sections)
    second_sections["http"]["replication.https.port"] = free_port()
    second = await kith_factory(second_sections, name="second")
    await wait_for("the first to push", lambda: pushing(first))
    await wait_for("a refused turn of the second", lambda: refused(second) >= 1)
    assert not pushing(second)
    assert b.server.store is not None
    b_store = b.server.store

    # A bind on the instance that does not push goes out all the same.
    await second.bind("via-second@example.com", "@s:hs.test")
    await wait_for("B to get it", lambda: has(b_store, "via-second@example.com"))

    await first.server.stop()
    await wait_for("the second to take over", lambda: pushing(second), timeout_s=30)
    await second.bind("after@example.com", "@after:hs.test")
    await wait_for("B to get the next", lambda: has(b_store, "after@example.com"))


async def test_of_two_workers_one_pushes(tmp_path: Path, kith_factory: KithFactory,
                                        kith_process: KithProcessFactory, node_a: MeshNode,
                                        node_b: MeshNode) -> None:
    b = await kith_factory(node_b.sections(node_a), name="b")
    assert b.server.store is not None
    b_store = b.server.store
    received = REPLICATION_RECEIVED.labels(node_a.name)
    before = received._value.get()
    sections = node_a.sections(node_b)
    sections["general"]["workers"] = 2
    path = write_config(tmp_path, sections)
    config = load_config(str(path), env={})
    a = kith_process(path)
    await asyncio.to_thread(a.start, config.http.client_port)
    try:
        # A new connection per request, so the kernel spreads the binds over both workers.
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as http:
            for i in range(40):
                async with http.post(
                        f"http://127.0.0.1:{config.http.internal_port}"
                        "/_matrix/identity/internal/bind", json={
                            "medium": "email", "address": f"u{i}@example.com",
                            "mxid": f"@u{i}:hs.test"}) as resp:
                    assert resp.status == 200
        await wait_for("B to get all 40", lambda: _count(b_store, 40), timeout_s=30)
    finally:
        a.kill(signal.SIGTERM)  # the parent stops its workers (SIGKILL would orphan them)
    log = (tmp_path / "kith.log").read_text()
    assert log.count("replication: process") == 1, log
    assert "kith: 2 workers started" in log
    assert received._value.get() - before == 40  # each sent once


async def _count(store: Store, expected: int) -> bool:
    return len(await store.associations.live_rows("local")) == expected
