"""A change of the lookup pepper at scale, for docs/performance.md.

    .venv/bin/python -m bench.rotation [N] [--keep DIR]

Seeds N bindings (default 1M) straight into a SQLite store as bench/scale.py does,
starts kith on it (`python -m kith`, one process) and waits for its first right answer,
then runs `kith rotate-pepper` and measures: the command's wall time and peak memory
(its VmHWM, from getrusage of the waited-for child), the seconds until the serving
process announces the new pepper and answers a lookup made with it, and the serving process's VmHWM
before and after (it holds the indexes of both peppers meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import scale
from bench.scale import (
    FIRST_ANSWER_TIMEOUT_S,
    ROOT,
    commit,
    first_answer,
    prepare_store,
    seed_sqlite,
    start_kith,
    stop,
)
from kith.config import DbConfig

isbench = scale.isbench


def vm_hwm_mb(pid: int) -> float:
    """The peak resident memory of process `pid`, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def announced_after(base: str, hs_name: str, old: str) -> str:
    """The pepper the server announces once it is no longer `old` (read over HTTP: the
    store is the server's while it runs)."""
    deadline = time.monotonic() + FIRST_ANSWER_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        token = await isbench.register(session, base, hs_name)
        while time.monotonic() < deadline:
            async with session.get(f"{base}/_matrix/identity/v2/hash_details",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                pepper = str((await resp.json())["lookup_pepper"])
            if pepper != old:
                return pepper
            await asyncio.sleep(0.1)
    raise TimeoutError("the new pepper was never announced")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="keep (or reuse) the seeded store here")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="kith-rotation-"))
    directory.mkdir(parents=True, exist_ok=True)
    db = DbConfig(file=str(directory / "kith.db"))
    pepper = asyncio.run(prepare_store(db))
    marker = directory / f"seeded-{args.count}"
    if not marker.exists():
        seed_sqlite(db.file, args.count, pepper)
        marker.write_text("seeded\n")

    hs_name = isbench.start_fake_homeserver(0)
    kith, config, base, started = start_kith(directory)
    try:
        assert kith.proc is not None
        pid = kith.proc.pid
        loaded_s = asyncio.run(first_answer(base, pepper, hs_name, started, args.count))
        serving_before = vm_hwm_mb(pid)
        print(f"serving: first right answer after {loaded_s:.1f} s; VmHWM "
              f"{serving_before:.0f} MB", flush=True)

        started = time.monotonic()
        rotate = subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "kith", "--config", str(config), "rotate-pepper"],
            cwd=directory, capture_output=True, text=True, timeout=FIRST_ANSWER_TIMEOUT_S,
            check=False)
        rotate_s = time.monotonic() - started
        assert rotate.returncode == 0, rotate.stderr
        rotate_hwm = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        new = asyncio.run(announced_after(base, hs_name, pepper))
        announced_s = asyncio.run(first_answer(base, new, hs_name, started, args.count))
        summary: dict[str, Any] = {
            "count": args.count, "db": "sqlite", "first_answer_s": round(loaded_s, 1),
            "rotate_pepper_s": round(rotate_s, 1),
            "rotate_pepper_vmhwm_mb": round(rotate_hwm),
            "new_pepper_answered_after_s": round(announced_s, 1),
            "serving_vmhwm_before_mb": round(serving_before),
            "serving_vmhwm_after_mb": round(vm_hwm_mb(pid)),
            "commit": commit()}
        print(json.dumps(summary), flush=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (ROOT / "bench" / "results" / f"rotation-{args.count}-{stamp}.json").write_text(
            json.dumps(summary, indent=1))
    finally:
        stop(kith, None if args.keep else directory)


if __name__ == "__main__":
    main()
