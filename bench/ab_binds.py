#!/usr/bin/env python3
"""Two kith source trees side by side (A B, then B A, ...): internal binds under wrk.

For a change to the write path: each tree runs as its own server (`python -m kith` with
PYTHONPATH=<tree>, this checkout's venv, one worker, a fresh SQLite store or, with
--db-url, a PostgreSQL database each), and wrk binds a new address on every request
(bench/wrk-bind.lua, 32 connections) against one, then the other.  Each round gives
binds/s and server CPU per bind (utime + stime from /proc); the report gives both
sides' medians and the median of the B/A ratios of the pairs.

    mkdir /tmp/kith-base && git archive <base commit> | tar -x -C /tmp/kith-base
    .venv/bin/python -m bench.ab_binds --a /tmp/kith-base --b . --rounds 10

Needs `wrk` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import procs  # noqa: E402
from tests.conftest import KithProcess, free_port, write_config  # noqa: E402


def start(tree: Path, directory: Path, db_url: str | None) -> tuple[KithProcess, str]:
    port, internal_port = free_port(), free_port()
    sections: dict[str, dict[str, object]] = {
        "http": {"clientapi.http.port": port, "internalapi.http.port": internal_port}}
    if db_url:
        sections["db"] = {"db.url": db_url}
    kith = KithProcess(write_config(directory, sections))
    os.environ["PYTHONPATH"] = str(tree.resolve())
    try:
        kith.start(port, timeout_s=60)
    finally:
        del os.environ["PYTHONPATH"]
    return kith, f"http://127.0.0.1:{internal_port}/_matrix/identity/internal/bind"


def burst(kith: KithProcess, url: str, seconds: int, prefix: str) -> tuple[float, float]:
    """binds/s and server CPU µs a bind, over one wrk run."""
    assert kith.proc is not None
    before = procs.cpu_seconds(kith.proc.pid)
    command = ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(ROOT / "bench/wrk-bind.lua"), url]
    out = subprocess.run(  # noqa: S603 - wrk from PATH
        command,
        capture_output=True, text=True, check=True, env={**os.environ, "PREFIX": prefix}).stdout
    cpu = procs.cpu_seconds(kith.proc.pid) - before
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    binds = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    return binds / seconds, cpu / binds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="kith source tree A (the base)")
    parser.add_argument("--b", type=Path, required=True, help="kith source tree B (the change)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--db-url", nargs=2, metavar=("A_URL", "B_URL"),
                        help="empty PostgreSQL databases for A and B (default: SQLite)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="kith-ab-binds-"))
    servers = {}
    try:
        for i, (side, tree) in enumerate((("A", args.a), ("B", args.b))):
            (directory / side).mkdir()
            servers[side] = start(tree, directory / side, args.db_url[i] if args.db_url else None)
        for side, (kith, url) in servers.items():
            burst(kith, url, 2, f"warm{side}")
        results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        for r in range(args.rounds):
            for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                results[side].append(burst(*servers[side], args.duration, f"r{r}{side}"))
                print(f"round {r} {side}: {results[side][-1][0]:.0f} binds/s, "
                      f"{results[side][-1][1]:.1f} µs/bind", flush=True)
        for side, tree in (("A", args.a), ("B", args.b)):
            rates, costs = zip(*results[side], strict=True)
            print(f"{side} ({tree}): binds/s median {statistics.median(rates):.0f} "
                  f"[{min(rates):.0f}-{max(rates):.0f}], µs/bind median "
                  f"{statistics.median(costs):.1f} [{min(costs):.1f}-{max(costs):.1f}]")
        pairs = list(zip(results["A"], results["B"], strict=True))
        for i, what in ((0, "binds/s"), (1, "CPU per bind")):
            ratios = [b[i] / a[i] for a, b in pairs]
            print(f"B/A {what}: median {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]")
    finally:
        for kith, _ in servers.values():
            kith.kill(15)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
