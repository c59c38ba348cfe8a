"""What the operator sees of the mesh: `kith peers`, the Prometheus gauges, and a clear
log line when a peer cannot be reached or refuses a push."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import aiohttp
import pytest

from kith.store import Store
from tests.conftest import KithFactory, RunningKith, free_port, wait_for
from tests.replication.conftest import MeshNode

pytestmark = pytest.mark.usefixtures("homeserver")


def kith_peers(kith: RunningKith) -> str:
    result = subprocess.run([sys.executable, "-m", "kith", "--config", kith.config.path,
                             "peers"], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


async def metric(port: int, name: str, peer: str) -> float | None:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf'^{name}{{peer="{re.escape(peer)}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def test_peers_command_gauges_and_log_lines(
        kith_factory: KithFactory, node_a: MeshNode, node_b: MeshNode,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kith.replication")
    metrics_port = free_port()
    a_sections = node_a.sections(node_b)
    a_sections["general"]["prometheus_port"] = metrics_port
    a = await kith_factory(a_sections, name="a")
    b = await kith_factory(node_b.sections(node_a), name="b")
    assert a.server.store is not None and b.server.store is not None
    b_store: Store = b.server.store

    await a.bind("alice@example.com", "@alice:hs.test")

    async def b_has_it() -> bool:
        return await b_store.associations.get("local", "email", "alice@example.com") \
            is not None

    await wait_for("B to have A's bind", b_has_it)
    acked = (await a.server.store.associations.own_changes(0, 10))[-1].id
    assert await wait_for("A to see the ack", lambda: _acked(a)) == acked
    out = await asyncio.to_thread(kith_peers, a)
    lines = out.splitlines()
    assert lines[0] == f"kith-b.test {node_b.url}"
    assert lines[1] == f"  acknowledged: id {acked}; behind: 0 changes, 0 s"
    assert re.fullmatch(r"  last success: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[2])
    assert lines[3] == "  last error: none"
    assert await wait_for("the gauges", lambda: _gauge_is(
        metrics_port, "kith_replication_acknowledged_id", float(acked)), timeout_s=20)
    assert await metric(metrics_port, "kith_replication_lag_changes", "kith-b.test") == 0

    # B goes away: A says so, once, and counts what B has not had.
    await b.server.stop()
    await a.bind("bob@example.com", "@bob:hs.test")
    await wait_for("A to record the failure", lambda: _failed(a))
    out = await asyncio.to_thread(kith_peers, a)
    assert "behind: 1 changes" in out
    assert re.search(r"  last error: \S+Z ClientConnectorError: Cannot connect to host "
                     rf"127.0.0.1:{node_b.port}", out), out
    assert await wait_for("the lag gauge", lambda: _gauge_is(
        metrics_port, "kith_replication_lag_changes", 1.0), timeout_s=20)
    failures = [r for r in caplog.records if "push to kith-b.test" in r.getMessage()]
    assert failures[0].getMessage().startswith(
        f"replication: push to kith-b.test ({node_b.url}) failed: ClientConnectorError: "
        "Cannot connect to host")
    # Loud once per outage, then quiet while it lasts.
    assert [r.levelname for r in failures] == ["WARNING"] + ["INFO"] * (len(failures) - 1)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in logged and "CERTIFICATE-----" not in logged


async def _acked(kith: RunningKith) -> int | None:
    assert kith.server.store is not None
    state = (await kith.server.store.peers.push_states()).get("kith-b.test")
    return state.last_sent_version if state else None


async def _failed(kith: RunningKith) -> bool:
    assert kith.server.store is not None
    state = (await kith.server.store.peers.push_states()).get("kith-b.test")
    return state is not None and state.last_error is not None


async def _gauge_is(port: int, name: str, value: float) -> bool:
    return await metric(port, name, "kith-b.test") == value
