"""A big store against a small one, in one sitting: lookup rates at 10M bindings as a
share of kith's own rate at 2k, robust to a machine whose speed drifts between runs.

    .venv/bin/python -m bench.scale_pair --big-keep DIR [--big-db URL] [--small-keep DIR]
        [--big 10000000] [--small 2000] [--rounds 6] [--duration 3] [--pin]
        [--big-tree TREE] [--small-tree TREE]

Both stores are seeded as `bench.scale` seeds them (and reused when kept), and both
kith processes (`python -m kith`, one worker each) run for the whole sitting.  Each
round drives wrk lookups (batches of 1, 100 and 1000, 16 in flight, each request with
the next of many bodies: `bench.scale.wrk_row`) at one server and then at the other,
the order alternating between rounds, so that each pair of runs shares the machine's
state of that minute; with `--pin` both servers run on one CPU and wrk on the others,
so that the two sides do not differ by the core each happens to run on.  Reported for
each batch size: the big server's rate over the small one's in each pair (median and
range), each side's median rate, and the server CPU per request (from /proc).  The
first right answer of the big server after its start is reported too.  Results go to
bench/results/scale-pair-BIG-SMALL-<date>.{json,txt}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.scale import (
    ROOT,
    commit,
    first_answer,
    isbench,
    register,
    seeded,
    start_kith,
    write_bodies,
    wrk_row,
)
from tests.conftest import KithProcess

BATCHES = (1, 100, 1000)
CPU = "server_cpu_us_per_request"


@dataclass
class Side:
    name: str
    count: int
    kith: KithProcess
    base: str
    token: str
    bodies: dict[int, Path]
    first_answer_s: float
    workdir: Path

    @property
    def pid(self) -> int:
        assert self.kith.proc is not None
        return self.kith.proc.pid


def start_side(name: str, count: int, directory: Path, db_url: str | None,
               hs_name: str, tree: Path | None = None) -> Side:
    pepper = seeded(directory, count, db_url)
    # kith from `tree` (this checkout by default): `python -m kith` with it first on the path
    os.environ.pop("PYTHONPATH", None)
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree.resolve())
    kith, _, base, started = start_kith(directory, 1, db_url)
    os.environ.pop("PYTHONPATH", None)
    try:
        seconds = asyncio.run(first_answer(base, pepper, hs_name, started, count))
        print(f"{name}: {count} bindings, first right answer {seconds:.1f} s after the start, "
              f"VmRSS {procs.rss_mb(kith.proc.pid if kith.proc else 0)} MB", flush=True)
        bodies = {batch: write_bodies(directory, count, pepper, batch) for batch in BATCHES}
        return Side(name, count, kith, base, asyncio.run(register(base, hs_name)), bodies,
                    seconds, directory)
    except BaseException:
        kith.kill(15)
        raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=10_000_000)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--big-keep", type=Path, required=True,
                        help="the big store's directory (seeded there unless it was)")
    parser.add_argument("--big-db", help="a PostgreSQL URL for the big store")
    parser.add_argument("--small-keep", type=Path,
                        help="the small store's directory (default: a temporary one)")
    parser.add_argument("--big-tree", type=Path,
                        help="run the big side's kith from this source tree (default: this "
                             "checkout's); with --small as big as --big, an A B of two trees")
    parser.add_argument("--small-tree", type=Path, help="the same for the small side")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", default="3")
    parser.add_argument("--pin", action="store_true",
                        help="run both servers on the last CPU and wrk on the others, so "
                             "that the two sides do not differ by the core they run on")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        parser.error("--pin needs two CPUs or more")
    server_cpu = str(cpus[-1]) if args.pin else None
    wrk_cpus = ",".join(map(str, cpus[:-1])) if args.pin else None

    small_dir = args.small_keep or Path(tempfile.mkdtemp(prefix="kith-scale-small-"))
    for directory in (args.big_keep, small_dir):
        directory.mkdir(parents=True, exist_ok=True)
    hs_name = isbench.start_fake_homeserver(0)
    sides: list[Side] = []
    try:
        sides.append(start_side("big", args.big, args.big_keep, args.big_db, hs_name,
                                args.big_tree))
        sides.append(start_side("small", args.small, small_dir, None, hs_name,
                                args.small_tree))
        if server_cpu is not None:
            for side in sides:  # every thread of each server (-a)
                subprocess.run(  # noqa: S603
                    ["taskset", "-a", "-p", "-c", server_cpu, str(side.pid)],  # noqa: S607
                    check=True, capture_output=True)
        runs: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = sides if round_ % 2 == 0 else sides[::-1]
            for batch in BATCHES:
                for side in order:
                    row = wrk_row(side.base, side.token, side.bodies[batch], batch, side.pid,
                                  args.duration, side.workdir, wrk_cpus)
                    runs.append({"round": round_, "side": side.name, "batch": batch, **row})
                    print(f"round {round_} {side.name:5s} batch {batch:4d}: "
                          f"{row['addresses_per_s']:>9} addr/s, "
                          f"{row['server_cpu_us_per_request']} µs CPU a request, "
                          f"{row['errors']} errors", flush=True)
        report(args, sides, runs)
    finally:
        for side in sides:
            side.kith.kill(15)
        for homeserver in isbench._homeservers:
            homeserver.stop()
        if args.small_keep is None:
            shutil.rmtree(small_dir, ignore_errors=True)


def report(args: argparse.Namespace, sides: list[Side], runs: list[dict[str, Any]]) -> None:
    lines = []
    summary: dict[str, Any] = {
        "big": args.big, "small": args.small,
        "big_db": "postgresql" if args.big_db else "sqlite", "rounds": args.rounds,
        "duration_s": float(args.duration), "pinned": args.pin, "commit": commit(),
        "trees": {"big": str(args.big_tree or ""), "small": str(args.small_tree or "")},
        "first_answer_s": {side.name: round(side.first_answer_s, 1) for side in sides},
        "errors": sum(run["errors"] for run in runs), "batches": {}}
    for batch in BATCHES:
        def of(name: str, key: str, batch: int = batch) -> list[float]:
            return [run[key] for run in sorted(runs, key=lambda r: r["round"])
                    if run["side"] == name and run["batch"] == batch]
        big, small = of("big", "addresses_per_s"), of("small", "addresses_per_s")
        ratios = [b / s for b, s in zip(big, small, strict=True)]
        entry = {
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "big_addresses_per_s_median": round(statistics.median(big)),
            "small_addresses_per_s_median": round(statistics.median(small)),
            "big_cpu_us_median": round(statistics.median(of("big", CPU)), 1),
            "small_cpu_us_median": round(statistics.median(of("small", CPU)), 1)}
        summary["batches"][str(batch)] = entry
        lines.append(
            f"batch {batch:4d}: big/small per round median {entry['ratio_median']} "
            f"[{entry['ratio_min']}-{entry['ratio_max']}]; addr/s medians "
            f"{entry['big_addresses_per_s_median']} / {entry['small_addresses_per_s_median']}; "
            f"µs CPU a request {entry['big_cpu_us_median']} / {entry['small_cpu_us_median']}")
    lines.append(f"errors: {summary['errors']}")
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "bench" / "results" / f"scale-pair-{args.big}-{args.small}-{stamp}"
    Path(f"{out}.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
    Path(f"{out}.txt").write_text(f"{json.dumps(summary)}\n{text}\n")


if __name__ == "__main__":
    main()
