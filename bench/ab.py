#!/usr/bin/env python3
"""Two kith source trees, or one with two settings, in alternation (A B B A ...):
lookups under wrk.

For a change on the hot path (every authenticated lookup) that must not slow kith down:
both trees run with this checkout's venv (`python -m kith` with PYTHONPATH=<tree>), on
the same generated sydent.conf, the same port and the same database (seeded once, by
A), so they differ only in kith's own code.  Each turn starts the server, waits until
it is idle, warms the connections up, drives `POST /v2/lookup` with one bound address
(sha256) with wrk at each concurrency, --bursts times for --duration seconds (the
fastest burst counts: other load on a shared machine only slows a burst down), and stops
it.  Rounds run A B, then B A.  `--batch N` asks for N addresses a request instead of
one; `--a-workers`/`--b-workers` run a side with that many worker processes (the CPU
counted is then the parent's and its workers').

    mkdir /tmp/kith-base && git archive <base commit> | tar -x -C /tmp/kith-base
    .venv/bin/python bench/ab.py --a /tmp/kith-base --b . --rounds 5
    .venv/bin/python bench/ab.py --a . --b . --b-workers 2 --batch 100 --concurrency 16
    .venv/bin/python bench/ab.py --a /tmp/kith-base --b . --pin --rounds 10 --duration 3

Needs `wrk` on PATH and ../shared/bench (or KITH_BENCH_DIR) for the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KITH_BENCH_DIR", ROOT.parent / "shared" / "bench"))
sys.path[:0] = [str(ROOT), str(SHARED)]
import compare  # noqa: E402
import isbench  # noqa: E402

from bench import procs  # noqa: E402

# With --pin: the CPU the servers run on, and the CPUs this process and wrk run on.
PIN: tuple[set[int], set[int]] | None = None


def start(server: Any, tree: Path, workers: int = 1) -> None:
    os.environ["PYTHONPATH"] = str(tree)
    server.argv = [sys.executable, "-m", "kith", "--workers", str(workers)]
    if PIN is not None:  # the server (and its workers) inherit this process's CPUs
        os.sched_setaffinity(0, PIN[0])
    try:
        server.start()
    finally:
        if PIN is not None:
            os.sched_setaffinity(0, PIN[1])
    compare.wait_idle(server.proc.pid, server.label)


async def prepare(server: Any, tree: Path, seed: int) -> tuple[str, str]:
    """Start A once: register an account, seed the bindings; the token and the pepper
    stay valid for both trees (same database)."""
    hs_name = isbench.start_fake_homeserver()
    try:
        start(server, tree)
        async with aiohttp.ClientSession() as session:
            token: str = await isbench.register(session, server.base, hs_name)
            await isbench.seed(session, server.internal, seed, 32, domain=hs_name)
            async with session.get(f"{server.base}/_matrix/identity/v2/hash_details",
                                   headers={"Authorization": f"Bearer {token}"}) as r:
                pepper: str = (await r.json())["lookup_pepper"]
        compare.wait_idle(server.proc.pid, server.label)
    finally:
        server.stop()
    return token, pepper


def best_burst(server: Any, token: str, pepper: str, args: argparse.Namespace,
               conc: int) -> dict[str, Any]:
    """`args.bursts` wrk runs of `args.duration` s; the fastest, with the server's CPU
    per request in it (other load on a shared machine only ever slows a burst down)."""
    bursts: list[dict[str, Any]] = []
    for _ in range(args.bursts):
        cpu_before = procs.cpu_seconds(server.proc.pid)
        run = compare.run_wrk(server.base, token, pepper, args.seed, args.batch, conc,
                              args.duration, server.dir)
        cpu_s = procs.cpu_seconds(server.proc.pid) - cpu_before
        requests = run["req_per_s"] * args.duration
        run["cpu_us_per_req"] = round(cpu_s / requests * 1e6, 1) if requests else None
        bursts.append(run)
    best = max(bursts, key=lambda run: float(run["req_per_s"]))
    return {**best, "errors": sum(run["errors"] for run in bursts),
            "bursts_req_per_s": [run["req_per_s"] for run in bursts]}


def table(rows: list[dict[str, Any]], key: str, conc: int, fmt: str,
          best: Callable[[list[float]], float]) -> dict[str, Any]:
    """Print A, B and B/A per round for one figure; return them."""
    value = {label: [r[key] for r in rows if r["tree"] == label and r["conc"] == conc]
             for label in ("A", "B")}
    ratios = [b / a for a, b in zip(value["A"], value["B"], strict=True) if a and b]
    print(f"{conc:>3} in flight, {key}")
    for label in ("A", "B"):
        print(f"  {label}: {' '.join(format(x, fmt) for x in value[label])}  "
              f"median {format(statistics.median(value[label]), fmt)}  "
              f"best {format(best(value[label]), fmt)}")
    print(f"  B/A per round: {' '.join(f'{x:.3f}' for x in ratios)}  "
          f"median {statistics.median(ratios):.3f}")
    return {**value, "B/A": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="kith source tree A (the base)")
    ap.add_argument("--b", type=Path, required=True, help="kith source tree B (the change)")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="measured seconds per burst")
    ap.add_argument("--bursts", type=int, default=1,
                    help="wrk runs per turn and concurrency; the fastest counts")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--batch", type=int, default=1, help="addresses a lookup")
    ap.add_argument("--a-workers", type=int, default=1)
    ap.add_argument("--b-workers", type=int, default=1)
    ap.add_argument("--pin", action="store_true",
                    help="run the servers on the last CPU and wrk on the others, so that "
                         "turns do not differ by the core the server happens to run on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.pin:
        global PIN
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs two CPUs or more")
        PIN = ({cpus[-1]}, set(cpus[:-1]))
        os.sched_setaffinity(0, PIN[1])
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    server = compare.Server("kith", [sys.executable, "-m", "kith"])
    # One client looking up thousands of addresses a second: lift the lookup budget,
    # as for the shared benchmark (a tree without budgets ignores the keys).
    subprocess.run([str(ROOT / "bench" / "candidate.sh"), "true"], check=True,  # noqa: S603
                   env=dict(os.environ, SYDENT_CONF=str(server.dir / "sydent.conf")))
    try:
        rows = alternate(server, trees, args)
    finally:
        shutil.rmtree(server.dir, ignore_errors=True)  # its config, database and log
    report(rows, trees, args)


def alternate(server: Any, trees: dict[str, Path],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    token, pepper = asyncio.run(prepare(server, trees["A"], args.seed))
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        # A B, then B A: a turn's place in the round (what ran just before it) favours
        # neither tree.
        order = list(trees.items()) if round_ % 2 else list(trees.items())[::-1]
        for label, tree in order:
            try:
                start(server, tree, args.a_workers if label == "A" else args.b_workers)
                compare.run_wrk(server.base, token, pepper, args.seed, 1, 16, 2, server.dir)
                for conc in concurrency:
                    row = {"round": round_, "tree": label, "conc": conc,
                           **best_burst(server, token, pepper, args, conc)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.stop()
    return rows


def report(rows: list[dict[str, Any]], trees: dict[str, Path],
           args: argparse.Namespace) -> None:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"\nlookups/s (wrk, batch {args.batch}; workers A {args.a_workers}, B "
          f"{args.b_workers}), {args.seed} bindings, the best of {args.bursts} x "
          f"{args.duration} s per turn")
    print("(and the server's CPU per request in that burst, µs)")
    summary: dict[str, Any] = {}
    for conc in concurrency:
        for key, fmt, best in (("req_per_s", "8.0f", max), ("cpu_us_per_req", "8.1f", min)):
            summary[f"conc {conc} {key}"] = table(rows, key, conc, fmt, best)
    errors = sum(r["errors"] for r in rows)
    print(f"errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "errors": errors,
                                         "trees": {k: str(v) for k, v in trees.items()},
                                         "workers": {"A": args.a_workers,
                                                     "B": args.b_workers},
                                         "batch": args.batch, "seed": args.seed}, indent=1))


if __name__ == "__main__":
    main()
