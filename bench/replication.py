"""Replication figures for docs/performance.md: a peer catching up on N changes (default
100k), and the lookups of the receiving side while it takes them in.

    .venv/bin/python -m bench.replication [N]

Two kith processes on loopback (SQLite, one worker each), certificates from a throwaway
CA.  Node A's store holds N own bindings that node B has not had; B holds 10k bindings of
its own, which the lookup load asks for: `wrk` (../shared/bench/compare.py's, one fixed
body) at 16 connections for throughput, and isbench's checked sha256 lookups one at a
time for the latency of a lightly loaded server.  B is started and measured at rest; then
A is started and pushes everything to B while the same load runs on B; then B is
measured at rest again.  B runs on CPU 1, everything else (A, the load generators, this
script) on CPU 0, so that what B's lookups lose is what applying the pushes costs B, not
A's signing.
Last, both are stopped, B's copy and A's cursor are wiped, and the catch-up is timed
again with no lookup load.  Results also go to bench/results/replication-N-<date>.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from kith.config import DbConfig, KithConfig, load_config
from kith.store import AssociationRow, Store
from kith.threepid import lookup_hash, new_pepper
from tests.conftest import KithProcess, write_config
from tests.federation.conftest import TestPki, _make_ca
from tests.replication.conftest import MeshNode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent / "shared" / "bench"))
import compare  # noqa: E402
import isbench  # noqa: E402

OWN_ON_B = 10_000
DURING_WINDOW_S = 2.0


async def seed(db: DbConfig, count: int, address: Any, mxid: Any) -> None:
    store = await Store.open(db)
    try:
        pepper = await store.state.get_or_create("lookup_pepper", new_pepper())
        for start in range(0, count, 5000):
            await store.associations.write([
                AssociationRow("local", "email", address(i), mxid(i), 1000 + i, 1000 + i,
                               10**13, lookup_hash("email", address(i), pepper))
                for i in range(start, min(count, start + 5000))])
    finally:
        await store.close()


def received(config: KithConfig) -> int:
    with sqlite3.connect(config.db.file) as conn:
        return int(conn.execute("SELECT count(*) FROM threepid_associations "
                                "WHERE origin_server = 'kith-a.test'").fetchone()[0])


async def wait_received(config: KithConfig, count: int, timeout_s: float = 600) -> float:
    """Seconds until B holds `count` associations from A."""
    started = time.perf_counter()
    while await asyncio.to_thread(received, config) < count:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"B did not receive {count} associations in {timeout_s} s")
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


def start(path: Path, config: KithConfig, cpu: int) -> KithProcess:
    process = KithProcess(path)
    process.start(config.http.client_port, timeout_s=120)
    assert process.proc is not None
    # Every thread of it (aiosqlite's, the executor's), and those it starts later.
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(process.proc.pid)],  # noqa: S603, S607
                   check=True, capture_output=True)
    return process


async def lookups(session: aiohttp.ClientSession, base: str, token: str, pepper: str,
                  domain: str, duration_s: float, workdir: Path) -> list[dict[str, Any]]:
    runs = []
    for batch in (1, 100):
        result = await asyncio.to_thread(compare.run_wrk, base, token, pepper, OWN_ON_B,
                                         batch, 16, duration_s, workdir)
        runs.append({**result, "batch": batch, "concurrency": 16})
    one = await isbench.lookup_run(session, base, token, pepper, OWN_ON_B, 1, 1, duration_s,
                                   domain, warmup=0.2)
    runs.append(one)
    return runs


def row(phase: str, run: dict[str, Any]) -> str:
    return (f"| {phase} | {run['batch']} | {run['concurrency']} | "
            f"{run['addresses_per_s']:,.0f} | {run.get('p50_ms') or ''} | {run['p99_ms']} | "
            f"{run['errors']} / {run.get('wrong_answers', '')} |")


async def main(n: int) -> dict[str, Any]:
    results: dict[str, Any] = {"changes": n, "own_on_b": OWN_ON_B}
    hs_name = isbench.start_fake_homeserver()
    with tempfile.TemporaryDirectory(prefix="kith-bench-repl-") as tmp:
        directory = Path(tmp)
        for ca in ("ca", "other-ca"):
            _make_ca(directory, ca)
        pki = TestPki(directory / "ca.pem", directory / "other-ca.pem", directory / "x.pem",
                      directory / "x.key")
        a, b = MeshNode("kith-a.test", pki), MeshNode("kith-b.test", pki)
        paths = {}
        for node, peer, name in ((a, b, "a"), (b, a, "b")):
            (directory / name).mkdir()
            sections = node.sections(peer)
            sections["http"]["federation.verifycerts"] = "False"
            paths[name] = write_config(directory / name, sections)
        config_a = load_config(str(paths["a"]), env={})
        config_b = load_config(str(paths["b"]), env={})
        started = time.perf_counter()
        await seed(config_a.db, n, lambda i: f"peer{i}@bench.test", lambda i: f"@peer{i}:hs.test")
        await seed(config_b.db, OWN_ON_B, isbench.address,
                   lambda i: isbench.mxid(i, hs_name))
        print(f"seeded A with {n} and B with {OWN_ON_B} in {time.perf_counter() - started:.1f} s",
              flush=True)

        running: list[KithProcess] = []
        try:
            results.update(await measure(paths, config_a, config_b, hs_name, n, running))
        finally:
            for process in running:
                process.kill(15)
    return results


async def measure(paths: dict[str, Path], config_a: KithConfig, config_b: KithConfig,
                  hs_name: str, n: int, running: list[KithProcess]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    workdir = paths["b"].parent
    running.append(start(paths["b"], config_b, cpu=1))
    base = f"http://127.0.0.1:{config_b.http.client_port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        token = await isbench.register(session, base, hs_name)
        async with session.get(f"{base}/_matrix/identity/v2/hash_details",
                               headers={"Authorization": f"Bearer {token}"}) as resp:
            pepper = (await resp.json())["lookup_pepper"]
        results["before"] = await lookups(session, base, token, pepper, hs_name, 5, workdir)

        running.append(start(paths["a"], config_a, cpu=0))
        catch_up = asyncio.create_task(wait_received(config_b, n))
        during: list[dict[str, Any]] = []
        while not catch_up.done():
            during += await lookups(session, base, token, pepper, hs_name,
                                    DURING_WINDOW_S, workdir)
        results["catch_up_under_lookups_s"] = round(catch_up.result(), 2)
        # Only the windows that ran wholly while the push was being applied.
        results["during"] = during[:-3] or during
        results["after"] = await lookups(session, base, token, pepper, hs_name, 5, workdir)
    while running:
        running.pop().kill(15)

    # Once more with nothing else running: B forgets A's rows, A its cursor.
    with sqlite3.connect(config_b.db.file) as conn:
        conn.execute("DELETE FROM threepid_associations WHERE origin_server = 'kith-a.test'")
    with sqlite3.connect(config_a.db.file) as conn:
        conn.execute("UPDATE replication_peers SET last_sent_version = NULL")
    running.append(start(paths["b"], config_b, cpu=1))
    running.append(start(paths["a"], config_a, cpu=0))
    results["catch_up_alone_s"] = round(await wait_received(config_b, n), 2)
    return results


def report(results: dict[str, Any]) -> str:
    n = results["changes"]
    lines = [
        f"catch-up of {n} changes, nothing else running: {results['catch_up_alone_s']} s "
        f"({n / results['catch_up_alone_s']:,.0f} changes/s)",
        f"catch-up of {n} changes under the lookup load: {results['catch_up_under_lookups_s']} s "
        f"({n / results['catch_up_under_lookups_s']:,.0f} changes/s)",
        "",
        "| B's lookups | batch | in flight | addr/s | p50 ms | p99 ms | errors / wrong |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("before", "during", "after"):
        for run in results[phase]:
            lines.append(row(phase, run))
    return "\n".join(lines)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    os.sched_setaffinity(0, {0})  # this script and the load generators: CPU 0
    outcome = asyncio.run(main(count))
    text = report(outcome)
    print(text)
    out = ROOT / "bench" / "results" / (
        f"replication-{count}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    out.with_suffix(".json").write_text(json.dumps(outcome, indent=2))
    out.with_suffix(".txt").write_text(text + "\n")
