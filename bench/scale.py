"""Scale figures for docs/performance.md: a store of N bindings (default 10M), how long
kith takes to answer its first lookup, how much memory it holds, and its lookup rates.

    .venv/bin/python -m bench.scale [N] [--keep DIR] [--db URL | --postgresql] [--workers W]

The bindings are isbench's (`bench<i>@bench.test` → `@bench<i>:127.0.0.1:48448`), written
straight into a kith store (SQLite by default; `--db` a PostgreSQL URL, `--postgresql`
a throwaway PostgreSQL server as the tests start one) with raw
executemany/COPY, then kith is started on it as `python -m kith`.  Measured: seconds
from the start of the process until a sha256 lookup of a bound address answers right,
resident memory (VmRSS of kith and its workers) then and after the load, isbench's
checked lookups (`--seeded N`, batches 1, 100, 1000 at 16 in flight), and with `--wrk`
the same batches driven by wrk (C, one thread, 16 connections), each request with the
next of many bodies (100k addresses in all, half of them bound, drawn at random): at 10M the
index's memory is then touched as real lookups touch it, which one fixed body would
not.  For each wrk row, the server's CPU per request (utime + stime of kith and its
workers, from /proc).  `--keep DIR` keeps (or reuses) the seeded store in DIR, so that
runs of several commits can share one store.
Results also go to bench/results/scale-N-<date>.{json,txt}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from kith.config import DbConfig
from kith.store import Store
from kith.threepid import new_pepper
from tests.conftest import KithProcess, free_port, write_config
from tests.pg import PostgresCluster, _run_as_user, find_bindir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent / "shared" / "bench"))
import isbench  # noqa: E402

CHUNK = 200_000
FIRST_ANSWER_TIMEOUT_S = 900.0
WRK_ADDRESSES = 100_000  # distinct addresses across a wrk row's bodies
WRK_LUA = """
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %.3f %.2f %d %d\\n", summary.requests,
    summary.duration / 1e6, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.timeout))
end
"""


def rows(start: int, stop: int, pepper: str) -> list[tuple[Any, ...]]:
    out = []
    for i in range(start, stop):
        address = isbench.address(i)
        digest = hashlib.sha256(f"{address} email {pepper}".encode()).digest()
        out.append(("local", "email", address, isbench.mxid(i), 1000 + i, 1000 + i, 10**13,
                    urlsafe_b64encode(digest).rstrip(b"=").decode()))
    return out


INSERT = ("INSERT INTO threepid_associations (source, medium, address, mxid, ts, not_before, "
          "not_after, lookup_hash) VALUES ")


async def prepare_store(db: DbConfig) -> str:
    """Migrate the store and answer its pepper."""
    store = await Store.open(db)
    try:
        return await store.state.get_or_create("lookup_pepper", new_pepper())
    finally:
        await store.close()


def seed_sqlite(path: str, count: int, pepper: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    for start in range(0, count, CHUNK):
        with conn:
            conn.executemany(INSERT + "(?, ?, ?, ?, ?, ?, ?, ?)",
                             rows(start, min(count, start + CHUNK), pepper))
        print(f"  seeded {min(count, start + CHUNK)}/{count}", flush=True)
    conn.close()


async def seed_postgresql(url: str, count: int, pepper: str) -> None:
    import asyncpg  # the store's PostgreSQL driver

    conn = await asyncpg.connect(url)
    try:
        for start in range(0, count, CHUNK):
            await conn.copy_records_to_table(
                "threepid_associations", records=rows(start, min(count, start + CHUNK), pepper),
                columns=["source", "medium", "address", "mxid", "ts", "not_before",
                         "not_after", "lookup_hash"])
            print(f"  seeded {min(count, start + CHUNK)}/{count}", flush=True)
        await conn.execute("ANALYZE threepid_associations")
    finally:
        await conn.close()


async def first_answer(base: str, pepper: str, hs_name: str, started: float,
                       count: int) -> float:
    """Seconds from `started` until a lookup of a bound address is answered right."""
    wanted = count - 1
    asked = isbench.sha256_hash(isbench.address(wanted), "email", pepper)
    deadline = started + FIRST_ANSWER_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        token = None
        while time.monotonic() < deadline:
            try:
                if token is None:
                    token = await isbench.register(session, base, hs_name)
                async with session.post(
                        f"{base}/_matrix/identity/v2/lookup",
                        json={"addresses": [asked], "algorithm": "sha256", "pepper": pepper},
                        headers={"Authorization": f"Bearer {token}"}) as response:
                    body = await response.json(content_type=None)
                    if body.get("mappings", {}).get(asked) == isbench.mxid(wanted):
                        return time.monotonic() - started
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("no right answer")


def write_bodies(workdir: Path, count: int, pepper: str, batch: int) -> Path:
    """wrk's bodies for batches of `batch` over a store of `count` bindings: WRK_ADDRESSES
    addresses in all, half of them bound, drawn at random (the same for the same count)."""
    rng = random.Random(count * 10_000 + batch)
    bodies = workdir / f"wrk-bodies-{count}-{batch}.txt"
    with bodies.open("w") as f:
        for _ in range(WRK_ADDRESSES // batch):
            picked = [rng.randrange(count) if rng.random() < 0.5
                      else count + rng.randrange(count) for _ in range(batch)]
            f.write(json.dumps({"algorithm": "sha256", "pepper": pepper, "addresses": [
                isbench.sha256_hash(isbench.address(i), "email", pepper)
                for i in picked]}) + "\n")
    return bodies


def wrk_row(base: str, token: str, bodies: Path, batch: int, pid: int, duration: str,
            workdir: Path, cpus: str | None = None) -> dict[str, Any]:
    """One wrk run of lookups (16 in flight), each request with the next of `bodies`;
    the server's CPU per request from /proc.  `cpus`: the CPUs wrk runs on (taskset)."""
    lua = workdir / "wrk-scale.lua"
    lua.write_text(WRK_LUA)
    before = procs.cpu_seconds(pid)
    pin = ["taskset", "-c", cpus] if cpus else []
    out = subprocess.run(  # noqa: S603 - wrk from PATH, our own script
        [*pin, "wrk", "-t1", "-c16", f"-d{duration}s", "-s", str(lua),  # noqa: S607
         f"{base}/_matrix/identity/v2/lookup"], capture_output=True, text=True,
        env={**os.environ, "BODIES": str(bodies), "TOKEN": token}, check=False)
    cpu_s = procs.cpu_seconds(pid) - before
    found = re.search(r"^RESULT (\d+) ([\d.]+) ([\d.]+) (\d+) (\d+)$", out.stdout, re.M)
    if found is None:
        raise RuntimeError(f"wrk said: {out.stdout}{out.stderr}")
    requests, seconds = int(found[1]), float(found[2])
    return {"scenario": f"wrk batch={batch} conc=16 (distinct bodies)",
            "req_per_s": round(requests / seconds, 1),
            "addresses_per_s": round(requests * batch / seconds),
            "p99_ms": float(found[3]), "errors": int(found[4]) + int(found[5]),
            "server_cpu_us_per_request": round(cpu_s / max(requests, 1) * 1e6, 1)}


def wrk_rows(base: str, token: str, pepper: str, count: int, pid: int, duration: str,
             workdir: Path) -> list[dict[str, Any]]:
    """Lookups driven by wrk, batches 1, 100 and 1000 (`wrk_row`)."""
    return [wrk_row(base, token, write_bodies(workdir, count, pepper, batch), batch, pid,
                    duration, workdir) for batch in (1, 100, 1000)]


def start_kith(directory: Path, workers: int = 1,
               db_url: str | None = None) -> tuple[KithProcess, Path, str, float]:
    """kith (`python -m kith`) on the store in `directory` (or at `db_url`), with lookup
    budgets no generator reaches: the process, its config, its base URL, and the
    monotonic time it was started at."""
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "general": {"ip.whitelist": "127.0.0.1", "workers": workers,
                    "lookup.budget.account": 10**12, "lookup.budget.ip": 10**12},
        "http": {"clientapi.http.port": port, "federation.verifycerts": "False"}}
    if db_url:
        sections["db"] = {"db.url": db_url}
    config = write_config(directory, sections)
    kith = KithProcess(config)
    started = time.monotonic()
    kith.start(port, timeout_s=FIRST_ANSWER_TIMEOUT_S)
    return kith, config, f"http://127.0.0.1:{port}", started


def stop(kith: KithProcess, directory: Path | None) -> None:
    """Stop kith and the fake homeservers; remove `directory` unless None (kept)."""
    kith.kill(15)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
    for homeserver in isbench._homeservers:
        homeserver.stop()


def commit() -> str:
    """This checkout's commit; with PYTHONPATH set, kith is run from there instead
    (as the A B comparisons do), and the result says so."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"],  # noqa: S603, S607
                          capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    elsewhere = os.environ.get("PYTHONPATH")
    return f"{head}, kith from PYTHONPATH={elsewhere}" if elsewhere else head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="keep (or reuse) the seeded store here")
    parser.add_argument("--db", help="a PostgreSQL URL, postgresql://... (default: SQLite "
                                     "in the directory)")
    parser.add_argument("--postgresql", action="store_true",
                        help="start a throwaway PostgreSQL server (as the tests do) for "
                             "the run, and seed it")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", default="5")
    parser.add_argument("--wrk", action="store_true",
                        help="also drive the lookups with wrk, over many distinct bodies")
    args = parser.parse_args()

    directory = args.keep or Path(tempfile.mkdtemp(prefix="kith-scale-"))
    directory.mkdir(parents=True, exist_ok=True)
    cluster = None
    if args.postgresql:
        bindir = find_bindir()
        assert bindir is not None, "no PostgreSQL server binaries (apt-get install postgresql)"
        cluster = PostgresCluster(bindir=bindir, datadir=Path(tempfile.mkdtemp(prefix="kith-pg-")),
                                  user=_run_as_user())
        cluster.start()
        cluster.psql('CREATE DATABASE "kith_scale"')
        args.db = cluster.url("kith_scale")
    try:
        measure(args, directory)
    finally:
        if cluster is not None:
            cluster.stop()


def seeded(directory: Path, count: int, db_url: str | None = None, *,
           fresh: bool = False) -> str:
    """The pepper of a store of `count` bench bindings in `directory` (or at `db_url`),
    seeded first unless a marker there says it was (`fresh`: seed again)."""
    db = DbConfig(url=db_url) if db_url else DbConfig(file=str(directory / "kith.db"))
    marker = directory / f"seeded-{count}{'-pg' if db_url else ''}"
    if fresh:
        marker.unlink(missing_ok=True)
    pepper = asyncio.run(prepare_store(db))
    if not marker.exists():
        started = time.monotonic()
        if db_url:
            asyncio.run(seed_postgresql(db_url, count, pepper))
        else:
            seed_sqlite(db.file, count, pepper)
        marker.write_text(f"{time.monotonic() - started:.0f} s\n")
    print(f"store: {count} bindings ({marker.read_text().strip()} to seed)")
    return pepper


async def register(base: str, hs_name: str) -> str:
    async with aiohttp.ClientSession() as session:
        return str(await isbench.register(session, base, hs_name))


def measure(args: argparse.Namespace, directory: Path) -> None:
    # a new PostgreSQL server each time
    pepper = seeded(directory, args.count, args.db, fresh=args.postgresql)

    # Only for the token: the lookups below run isbench, with its homeserver on its port.
    hs_name = isbench.start_fake_homeserver(0)
    kith, _, base, started = start_kith(directory, args.workers, args.db)
    try:
        assert kith.proc is not None
        pid = kith.proc.pid
        seconds = asyncio.run(first_answer(base, pepper, hs_name, started, args.count))
        rss_loaded = procs.rss_mb(pid)
        print(f"first right answer {seconds:.1f} s after the start; VmRSS {rss_loaded} MB "
              f"({(rss_loaded or 0) * 2**20 / args.count:.0f} bytes a binding)", flush=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = ROOT / "bench" / "results" / f"scale-{args.count}-{stamp}"
        load = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, str(ROOT.parent / "shared" / "bench" / "isbench.py"),
             "--base", base, "--seeded", str(args.count), "--server-pid", str(pid),
             "--batches", "1,100,1000", "--concurrency", "16", "--duration", args.duration,
             "--json", f"{out}.lookups.json"], capture_output=True, text=True, check=False)
        wrk = []
        if args.wrk:
            wrk = wrk_rows(base, asyncio.run(register(base, hs_name)), pepper, args.count, pid,
                           args.duration, directory)
        rss_after = procs.rss_mb(pid)
        summary = {"count": args.count, "db": "postgresql" if args.db else "sqlite",
                   "workers": args.workers, "first_answer_s": round(seconds, 1),
                   "rss_loaded_mb": rss_loaded, "rss_after_mb": rss_after,
                   "bytes_per_binding": round((rss_loaded or 0) * 2**20 / args.count),
                   "commit": commit()}
        summary["wrk"] = wrk
        wrk_text = "".join(
            f"{r['scenario']:40s} {r['req_per_s']:>9} req/s {r['addresses_per_s']:>9} addr/s "
            f"p99 {r['p99_ms']} ms, {r['errors']} errors, server "
            f"{r['server_cpu_us_per_request']} µs CPU a request\n" for r in wrk)
        text = f"{json.dumps(summary)}\n{load.stdout}{load.stderr[-3000:]}{wrk_text}"
        print(text)
        Path(f"{out}.txt").write_text(text)
        Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
    finally:
        stop(kith, None if args.keep else directory)


if __name__ == "__main__":
    main()
