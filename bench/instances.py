"""Figures for "More than one machine" (README, docs/performance.md): two kith instances
on one PostgreSQL.

    .venv/bin/python -m bench.instances [N]

A throwaway PostgreSQL on loopback (tests/pg.py's cluster: fsync off), N bench bindings
(default 10k) written into it, and two kith processes (one worker each) on it.  Measures
(1) how long after a bind on A a lookup on B finds it (binds at random moments, B polled
every 5 ms), and (2) single and batch-100 lookups/s with `wrk` (../shared/bench's, one
fixed body of bound addresses, 16 connections per instance) against A alone, then
against A and B at once, with the server CPU per request from /proc.  On this 2-core
machine the load generators share the cores with the servers.  Results also go to
bench/results/instances-N-<date>.json.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from signedjson.key import encode_signing_key_base64, generate_signing_key

from bench.replication import seed
from kith.config import DbConfig, load_config
from kith.store import Store
from kith.threepid import lookup_hash, now_ms
from tests.conftest import KithProcess, write_config
from tests.pg import PostgresCluster, _run_as_user, find_bindir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent / "shared" / "bench"))
import compare  # noqa: E402
import isbench  # noqa: E402

TOKEN = "bench-instances-token"
DURATION_S = 10


async def add_token(db: DbConfig) -> None:
    store = await Store.open(db)
    try:
        await store.accounts.create_with_token(
            "@bench:bench.test", hashlib.sha256(TOKEN.encode()).hexdigest(), now_ms())
    finally:
        await store.close()


async def bind_to_lookup_delays(a: str, b: str, pepper: str, count: int) -> list[float]:
    delays = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        for i in range(count):
            await asyncio.sleep(random.uniform(0, 0.3))  # a random phase of B's poll
            address = f"delay{i}@bench.test"
            async with http.post(f"{a}/_matrix/identity/internal/bind", json={
                    "medium": "email", "address": address, "mxid": f"@d{i}:bench.test"}) as r:
                assert r.status == 200, await r.text()
            bound = time.monotonic()
            hashed = lookup_hash("email", address, pepper)
            while time.monotonic() - bound < 5:
                async with http.post(f"{b}/_matrix/identity/v2/lookup", headers=headers, json={
                        "algorithm": "sha256", "pepper": pepper,
                        "addresses": [hashed]}) as r:
                    if (await r.json())["mappings"]:
                        break
                await asyncio.sleep(0.005)
            delays.append(time.monotonic() - bound)
    return delays


def wrk_on(bases: list[str], pids: list[int], pepper: str, seeded: int, batch: int,
           workdir: Path) -> dict[str, Any]:
    """`wrk` on each base at once; requests/s summed, server CPU per request."""
    cpu_before = sum(compare.cpu_seconds(pid) for pid in pids)
    with ThreadPoolExecutor(len(bases)) as pool:
        runs = list(pool.map(lambda i: compare.run_wrk(
            bases[i], TOKEN, pepper, seeded, batch, 16, DURATION_S, workdir / str(i)),
            range(len(bases))))
    cpu = sum(compare.cpu_seconds(pid) for pid in pids) - cpu_before
    rps = sum(r["req_per_s"] for r in runs)
    return {"instances": len(bases), "batch": batch, "req_per_s": round(rps),
            "addresses_per_s": round(rps * batch), "errors": sum(r["errors"] for r in runs),
            "p99_ms": max(r["p99_ms"] or 0 for r in runs),
            "server_cpu_us_per_request": round(cpu / (rps * DURATION_S) * 1e6)}


def main() -> None:
    seeded = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    bindir = find_bindir()
    assert bindir is not None, "PostgreSQL binaries not found"
    work = Path(tempfile.mkdtemp(prefix="kith-instances-"))
    cluster = PostgresCluster(bindir=bindir, datadir=Path(tempfile.mkdtemp(prefix="kith-pg-")),
                              user=_run_as_user())
    processes: list[KithProcess] = []
    try:
        cluster.start()
        cluster.psql("CREATE DATABASE kith")
        db = DbConfig(file="", url=cluster.url("kith"))
        asyncio.run(seed(db, seeded, isbench.address, isbench.mxid))
        asyncio.run(add_token(db))
        key = f"ed25519 0 {encode_signing_key_base64(generate_signing_key('0'))}"
        bases, pids = [], []
        for name in ("a", "b"):
            (work / name).mkdir()
            for i in range(2):
                (work / name / str(i)).mkdir()
            path = write_config(work / name, {
                "db": {"db.url": db.url}, "crypto": {"ed25519.signingkey": key},
                "general": {"lookup.budget.account": 10**12, "lookup.budget.ip": 10**12,
                            "client_ip.ratelimit.burst": 10**9,
                            "log.level": "WARNING"}})
            config = load_config(str(path), env={})
            process = KithProcess(path)
            processes.append(process)
            process.start(config.http.client_port, timeout_s=120)
            assert process.proc is not None
            bases.append(f"http://127.0.0.1:{config.http.client_port}")
            pids.append(process.proc.pid)
            internal = f"http://127.0.0.1:{config.http.internal_port}"
            if name == "a":
                internal_a = internal

        async def pepper_of() -> str:
            async with aiohttp.ClientSession() as http, http.get(
                    f"{bases[0]}/_matrix/identity/v2/hash_details",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                return str((await r.json())["lookup_pepper"])
        pepper = asyncio.run(pepper_of())
        delays = asyncio.run(bind_to_lookup_delays(internal_a, bases[1], pepper, 50))
        results: dict[str, Any] = {"seeded": seeded, "delay_ms": {
            "median": round(statistics.median(delays) * 1000),
            "p95": round(sorted(delays)[int(len(delays) * 0.95) - 1] * 1000),
            "max": round(max(delays) * 1000)}, "wrk": []}
        print(f"bind on A -> found on B: {results['delay_ms']}", flush=True)
        for batch in (100, 1):
            for count in (1, 2):
                row = wrk_on(bases[:count], pids[:count], pepper, seeded, batch, work / "a")
                print(row, flush=True)
                results["wrk"].append(row)
        out = ROOT / "bench" / "results" / (
            f"instances-{seeded}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"results: {out}")
    finally:
        for process in processes:
            process.kill(15)
        cluster.stop()


if __name__ == "__main__":
    main()
