"""The cost of rewriting every stored lookup hash (what a pepper change does), for
docs/performance.md.

    .venv/bin/python -m bench.rehash N DIR            # a SQLite store in DIR
    .venv/bin/python -m bench.rehash N --db URL       # a PostgreSQL database

Seeds N bindings as bench/scale.py does (once: a marker file in DIR, or the rows already
in the database, say it is done), then runs `AssociationStore.rehash` alone, in this
process, with a new pepper, and prints the wall time and this process's CPU time a row.
The kith that runs is the one of the tree the command is run in (`cd TREE && python -m
bench.rehash ...`: the current directory comes first on the import path, before
PYTHONPATH), so two commits can be compared on one store, from a checkout and a `git
archive` of the other beside it (`../shared` must be reachable from both).  A store
opened by a newer kith is migrated and cannot be opened by an older one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.scale import prepare_store, seed_postgresql, seed_sqlite
from kith.config import DbConfig
from kith.store import Store
from kith.threepid import lookup_hash


async def rehash(db: DbConfig) -> None:
    store = await Store.open(db)
    try:
        upto = await store.associations.max_id()
        pepper = f"bench{time.time_ns()}"
        wall, cpu = time.perf_counter(), time.process_time()
        rows = await store.associations.rehash(
            lambda medium, address: lookup_hash(medium, address, pepper), upto)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await store.close()
    print(f"{rows} rows rewritten in {wall:.1f} s: {wall / rows * 1e6:.1f} µs a row of wall "
          f"time, {cpu / rows * 1e6:.1f} µs of this process's CPU", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("--db", help="a PostgreSQL URL instead of a SQLite store")
    args = parser.parse_args()
    if (args.db is None) == (args.directory is None):
        parser.error("give a directory or --db URL")
    if args.db is not None:
        db = DbConfig(url=args.db)
        pepper = asyncio.run(prepare_store(db))

        async def empty() -> bool:
            store = await Store.open(db)
            try:
                return await store.associations.max_id() == 0
            finally:
                await store.close()

        if asyncio.run(empty()):
            asyncio.run(seed_postgresql(args.db, args.count, pepper))
    else:
        args.directory.mkdir(parents=True, exist_ok=True)
        db = DbConfig(file=str(args.directory / "kith.db"))
        pepper = asyncio.run(prepare_store(db))
        marker = args.directory / f"seeded-{args.count}"
        if not marker.exists():
            seed_sqlite(db.file, args.count, pepper)
            marker.write_text("seeded\n")
    asyncio.run(rehash(db))


if __name__ == "__main__":
    main()
