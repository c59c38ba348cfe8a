#!/usr/bin/env python3
"""What an authenticated request pays to find its account: two kith trees, A B A B.

`AccountService.authenticate` on a token it has cached, the path every authenticated
request takes, timed in-process (the best of several repeats, so that other load on
the machine does not count), each tree in its own process with PYTHONPATH=<tree> and
this checkout's venv.  Throughput under wrk (bench/ab.py) moves by more than this costs
on a shared machine; this isolates the one function a change to the token cache touches.

    .venv/bin/python bench/auth_cost.py --a /tmp/kith-base --b . --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALLS = 200_000
REPEATS = 7
TOKEN = "bench-token"


async def measure() -> None:
    import kith
    from kith.config import DbConfig
    from kith.services.accounts import AccountService, hash_token
    from kith.services.terms import TermsSource
    from kith.store import Store

    async def no_userinfo(server_name: str, token: str) -> str:
        raise AssertionError("not called: the token is registered in the store")

    with tempfile.TemporaryDirectory() as directory:
        store = await Store.open(DbConfig(file=f"{directory}/kith.db"))
        try:
            await store.accounts.create_with_token("@bench:hs.test", hash_token(TOKEN), 0)
            accounts = AccountService(store, TermsSource(""), no_userinfo)
            await accounts.authenticate(TOKEN)
            best = float("inf")
            for _ in range(REPEATS):
                started = time.perf_counter()
                for _ in range(CALLS):
                    await accounts.authenticate(TOKEN)
                best = min(best, time.perf_counter() - started)
        finally:
            await store.close()
    print(json.dumps({"kith": os.path.dirname(kith.__file__), "us_per_call": best / CALLS * 1e6}))


def run(tree: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--measure"],  # noqa: S603
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tree)), check=True, timeout=600)
    result = json.loads(out.stdout.splitlines()[-1])
    if Path(result["kith"]).parent != tree:
        raise SystemExit(f"imported kith from {result['kith']}, not from {tree}")
    return float(result["us_per_call"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, help="kith source tree A (the base)")
    ap.add_argument("--b", type=Path, help="kith source tree B (the change)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        asyncio.run(measure())
        return
    if args.a is None or args.b is None:
        ap.error("--a and --b are required")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            times[label].append(run(tree))
            print(f"{label}: {times[label][-1]:.3f} µs", flush=True)
    for label in trees:
        print(f"{label} ({trees[label]}): median {statistics.median(times[label]):.3f} µs, "
              f"best {min(times[label]):.3f} µs per authenticate()")
    print(f"B - A: {statistics.median(times['B']) - statistics.median(times['A']):+.3f} µs "
          "(medians)")


if __name__ == "__main__":
    main()
