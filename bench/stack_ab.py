"""Two kith source trees, A and B: the CPU one lookup costs through kith's whole HTTP
stack in process, without sockets, alternated in short bursts.

Over loopback with wrk, this machine's noise (a third between runs, and between its
two cores) hides changes of a few percent on the request path.  Here each tree runs in
a process of its own: a kith server (`KithServer`, on a store of 2k bench bindings)
whose client listener is handed raw HTTP requests through an in-memory transport, one
after another, each answered before the next is fed.  The two processes take turns
(A B, then B A) in bursts of `--requests` single lookups (or `--batch` addresses),
`--pairs` times; each burst's CPU time (`time.process_time`) over its requests is one
figure.  Reported: each tree's median and tenth percentile, and B/A per pair.  What
the kernel spends on a socket is left out: it is the same for both trees.

    mkdir /tmp/kith-base && git archive <base> | tar -x -C /tmp/kith-base
    cp kith/_probe*.so /tmp/kith-base/kith/      # or build the base's own
    .venv/bin/python bench/stack_ab.py --a /tmp/kith-base --b . --pairs 300 --requests 300
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KITH_BENCH_DIR", ROOT.parent / "shared" / "bench"))


class Transport(asyncio.Transport):
    """Where the server writes its answers: counted, and `answered` called."""

    def __init__(self, answered: Any) -> None:
        super().__init__()
        self.answered = answered
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000),
                "sockname": ("127.0.0.1", 8090)}.get(name, default)

    def write(self, data: Any) -> None:
        self.answered()

    def writelines(self, list_of_data: Any) -> None:
        self.answered()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def serve(batch: int) -> None:
    """One tree's side (kith is imported from the tree first on sys.path): start kith,
    then answer each line of stdin (a request count) with the CPU µs a request."""
    from bench.scale import isbench, prepare_store, seed_sqlite
    from kith.config import DbConfig, load_config
    from kith.server import KithServer
    from tests.conftest import free_port, write_config

    directory = Path(tempfile.mkdtemp(prefix="kith-stack-"))
    db = DbConfig(file=str(directory / "kith.db"))
    pepper = await prepare_store(db)
    await asyncio.to_thread(seed_sqlite, db.file, 2000, pepper)
    hs_name = isbench.start_fake_homeserver(0)
    port = free_port()
    config = write_config(directory, {
        "general": {"ip.whitelist": "127.0.0.1", "lookup.budget.account": 10**12,
                    "lookup.budget.ip": 10**12},
        "http": {"clientapi.http.port": port, "federation.verifycerts": "False"}})
    server = KithServer(load_config(str(config), env={}))
    await server.start()
    try:
        import aiohttp
        async with aiohttp.ClientSession() as session:
            token = await isbench.register(session, f"http://127.0.0.1:{port}", hs_name)
        body = json.dumps({"algorithm": "sha256", "pepper": pepper, "addresses": [
            isbench.sha256_hash(isbench.address(i), "email", pepper)
            for i in range(batch)]}).encode()
        request = (b"POST /_matrix/identity/v2/lookup HTTP/1.1\r\nHost: kith.test\r\n"
                   b"Content-Type: application/json\r\nAuthorization: Bearer "
                   + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []

        def answered() -> None:
            if waiting and not waiting[-1].done():
                waiting[-1].set_result(None)

        protocol = server.runners[-1].server()  # the client listener: the last one opened
        protocol.connection_made(Transport(answered))
        print("ready", flush=True)
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            count = int(line)
            started = time.process_time()
            for _ in range(count):
                answer = loop.create_future()
                waiting[:] = [answer]
                protocol.data_received(request)
                await answer
                # until the answer is finished and the handler waits for the next (aiohttp
                # offers nothing to wait on for that)
                while protocol._waiter is None:  # noqa: ASYNC110
                    await asyncio.sleep(0)
            print((time.process_time() - started) / count * 1e6, flush=True)
        protocol.connection_lost(None)
    finally:
        await server.stop()
        for homeserver in isbench._homeservers:
            homeserver.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=Path, help="kith source tree A (the base)")
    parser.add_argument("--b", type=Path, help="kith source tree B (the change)")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300, help="requests a burst")
    parser.add_argument("--batch", type=int, default=1, help="addresses a lookup")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop
        uvloop.run(serve(args.batch))
        return
    if args.a is None or args.b is None:
        parser.error("--a and --b are needed")
    sides = {}
    for name, tree in (("A", args.a.resolve()), ("B", args.b.resolve())):
        # this script from this checkout, kith and its bench helpers from the tree
        sides[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, __file__, "--serve", "--batch", str(args.batch)],
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(SHARED)])),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert sides[name].stdout is not None
        while (sides[name].stdout.readline() or "ready").strip() != "ready":
            pass

    def burst(name: str) -> float:
        side = sides[name]
        assert side.stdin is not None and side.stdout is not None
        side.stdin.write(f"{args.requests}\n")
        side.stdin.flush()
        return float(side.stdout.readline())

    try:
        for name in sides:  # warm up
            burst(name)
        figures: dict[str, list[float]] = {"A": [], "B": []}
        ratios = []
        for pair in range(args.pairs):
            got = {name: burst(name) for name in (("A", "B") if pair % 2 == 0 else ("B", "A"))}
            for name, value in got.items():
                figures[name].append(value)
            ratios.append(got["B"] / got["A"])
    finally:
        for side in sides.values():
            if side.stdin is not None:
                side.stdin.write("\n")
                side.stdin.flush()
            side.wait(timeout=60)
    for name, values in figures.items():
        ordered = sorted(values)
        print(f"{name} ({args.a if name == 'A' else args.b}): µs of CPU a request, median "
              f"{statistics.median(ordered):.1f}, tenth percentile "
              f"{ordered[len(ordered) // 10]:.1f}")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"B/A per pair: median {statistics.median(ratios):.3f}, quartiles "
          f"{quartiles[0]:.3f}-{quartiles[2]:.3f} ({args.pairs} pairs of {args.requests} "
          f"requests, batch {args.batch})")


if __name__ == "__main__":
    main()
