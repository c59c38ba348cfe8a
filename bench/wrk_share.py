"""Two kith configurations (source tree and worker count) in alternation, each on a
fresh copy of one kept store, driven by wrk at one route: the requests a second, the
server's CPU (with its workers) and wrk's own CPU, so that a run says how the machine's
cores were shared between the server and the load.

    .venv/bin/python -m bench.wrk_share --store DIR [--route lookup|hash_details]
        [--a TREE] [--b TREE] [--a-workers 1] [--b-workers 2] [--rounds 2] [--duration 6]

DIR is a store kept by `bench.scale --keep DIR` (its kith.db is copied for each run).
`lookup`: single sha256 lookups, each request with the next of the store's addresses
(half of them bound), as `bench.scale --wrk` drives them; `hash_details`: GET
/v2/hash_details with the same access token.  16 connections, after 2 s of warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from bench import procs
from bench.scale import ROOT, WRK_LUA, isbench, start_kith, stop, write_bodies

HASH_DETAILS = "/_matrix/identity/v2/hash_details"


async def _token_and_pepper(base: str, homeserver: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        token: str = await isbench.register(session, base, homeserver)
        async with session.get(f"{base}{HASH_DETAILS}",
                               headers={"Authorization": f"Bearer {token}"}) as answer:
            pepper: str = (await answer.json())["lookup_pepper"]
    return token, pepper


def one_run(store: Path, tree: Path, workers: int, route: str, duration: int,
            count: int) -> str:
    os.environ["PYTHONPATH"] = str(tree)  # the server runs kith from `tree`
    directory = Path(tempfile.mkdtemp(prefix="kith-share-"))
    shutil.copy(store / "kith.db", directory / "kith.db")
    kith, _, base, _ = start_kith(directory, workers)
    assert kith.proc is not None
    pid = kith.proc.pid
    try:
        token, pepper = asyncio.run(_token_and_pepper(base, isbench.start_fake_homeserver(0)))
        env = {**os.environ, "TOKEN": token}
        if route == "lookup":
            env["BODIES"] = str(write_bodies(directory, count, pepper, 1))
            script, url = WRK_LUA, f"{base}/_matrix/identity/v2/lookup"
        else:
            script, url = f'wrk.headers["Authorization"] = "Bearer {token}"\n', base + HASH_DETAILS
        lua = directory / "share.lua"
        lua.write_text(script)
        command = ["wrk", "-t1", "-c16", "-s", str(lua), url]
        subprocess.run([*command[:2], "-d2s", *command[2:]],  # noqa: S603 - wrk, our script
                       env=env, capture_output=True, check=True)
        server_before, load_before = procs.cpu_seconds(pid), os.times()
        out = subprocess.run([*command[:2], f"-d{duration}s", *command[2:]],  # noqa: S603
                             env=env, capture_output=True, text=True, check=True).stdout
        server_s = procs.cpu_seconds(pid) - server_before
        load_after = os.times()
        load_s = (load_after.children_user + load_after.children_system
                  - load_before.children_user - load_before.children_system)
        requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
        failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return (f"{requests / duration:9.0f} requests/s; kith {server_s / duration:.2f} cores, "
                f"{server_s / requests * 1e6:6.1f} µs a request; wrk {load_s / duration:.2f} "
                f"cores; non-2xx {failed[1] if failed else 0}")
    finally:
        stop(kith, directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a kept bench.scale store")
    parser.add_argument("--count", type=int, default=2000, help="bindings in the store")
    parser.add_argument("--route", choices=("lookup", "hash_details"), default="lookup")
    parser.add_argument("--a", type=Path, default=ROOT, help="kith source tree A")
    parser.add_argument("--b", type=Path, default=ROOT, help="kith source tree B")
    parser.add_argument("--a-workers", type=int, default=1)
    parser.add_argument("--b-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=6, help="measured seconds a run")
    args = parser.parse_args()
    sides = {"A": (args.a.resolve(), args.a_workers), "B": (args.b.resolve(), args.b_workers)}
    for name, (tree, workers) in sides.items():
        print(f"{name}: {tree}, {workers} worker(s)")
    for round_ in range(args.rounds):
        for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
            tree, workers = sides[name]
            print(f"round {round_ + 1} {name}: "
                  f"{one_run(args.store, tree, workers, args.route, args.duration, args.count)}",
                  flush=True)


if __name__ == "__main__":
    main()
