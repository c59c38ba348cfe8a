"""Moving an installation from its SQLite file to PostgreSQL (`kith migrate-db`).

Every table is copied with its ids: an association's id is the change cursor every
process's lookup index follows, and the replication peers' acknowledged positions are
such ids, so they must mean the same rows afterwards; each id sequence is then set past
the largest id SQLite ever gave.  The SQLite file is only read (`mode=ro`), so a running
installation can be copied, and copied again: the associations, which may be millions,
are copied in id order in chunks, each committed, so the largest id in the target says
where to resume (a row rewritten meanwhile has a new, larger id, and replaces its old
copy); every other table is small and is copied whole, in one transaction, at each run.
The result is verified by counts of every table and a checksum of the associations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Table, create_engine, delete, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql

from kith.config import DbConfig
from kith.store import Store, StoreError
from kith.store.database import schema_head
from kith.store.schema import metadata, threepid_associations
from kith.store.sydent_db import SYDENT_TABLES

CHUNK_ROWS = 5000
PEPPER = "lookup_pepper"
ASSOCIATIONS = threepid_associations


@dataclass
class TableCount:
    table: str
    source: int
    target: int


@dataclass
class Verification:
    counts: list[TableCount] = field(default_factory=list)
    source_checksum: str = ""
    target_checksum: str = ""

    @property
    def ok(self) -> bool:
        return (self.source_checksum == self.target_checksum
                and all(c.source == c.target for c in self.counts))


Progress = Callable[[str, int], None]  # (table, rows copied so far in this run)


def _with_ids(table: Table) -> bool:
    """Whether the table's ids come from a sequence (SQLite AUTOINCREMENT)."""
    return bool(table.kwargs.get("sqlite_autoincrement"))


class SqliteSource:
    """The installation's SQLite file, opened read-only: nothing is ever written to it.

    Its reads block, so they run in a thread of their own (`run`, `chunks`)."""

    def __init__(self, path: str, chunk_rows: int = CHUNK_ROWS) -> None:
        self.path = path
        self.chunk_rows = chunk_rows
        self._engine: Engine = create_engine(
            f"sqlite:///file:{urllib.parse.quote(path)}?mode=ro&uri=true")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kith-migrate")

    async def run(self, read: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, functools.partial(read, *args))

    async def chunks(self, table: Table,
                     after_id: int | None = None) -> AsyncGenerator[list[dict[str, Any]], None]:
        """`rows`, each chunk read in the source's thread."""
        rows = await self.run(self.rows, table, after_id)
        done: list[dict[str, Any]] = []
        try:
            while (chunk := await self.run(next, rows, done)) is not done:
                yield chunk
        finally:
            await self.run(rows.close)  # its connection belongs to the source's thread

    def check(self) -> None:
        """A kith store of this kith's schema, or a `StoreError` saying what to do.
        (Read through SQLite, not from the file alone: a running kith's latest writes
        may still be in the write-ahead log beside it.)"""
        if not os.path.isfile(self.path):
            raise StoreError(f"{self.path}: no such database file")
        try:
            with self._engine.connect() as conn:
                tables = {name for (name,) in conn.execute(text(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"))}
                revisions = {r for (r,) in conn.execute(text(
                    "SELECT version_num FROM alembic_version"))
                } if "alembic_version" in tables else set()
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"{self.path}: cannot read it: {exc.orig}") from None
        if not revisions:
            what = "Sydent's database; start kith on it once (it takes it over), then " \
                "migrate kith's" if SYDENT_TABLES <= tables else "no kith store"
            raise StoreError(f"{self.path}: holds {what}")
        head = schema_head()
        if revisions != {head}:
            raise StoreError(f"{self.path}: its schema ({', '.join(sorted(revisions))}) is "
                             f"not this kith's ({head}); start this kith on it once, which "
                             "upgrades it, then migrate")

    def rows(self, table: Table, after_id: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """The table's rows in chunks, in one read transaction (a consistent snapshot);
        with `after_id`, only those with a larger id, in id order."""
        query = select(table)
        if after_id is not None:
            query = query.where(table.c.id > after_id).order_by(table.c.id)
        with self._engine.connect() as conn:
            result = conn.execution_options(yield_per=self.chunk_rows).execute(query)
            for chunk in result.mappings().partitions(self.chunk_rows):
                yield [dict(row) for row in chunk]

    def largest_id(self, table: Table) -> int:
        """The largest id SQLite has given in `table`, that of a deleted row included."""
        with self._engine.connect() as conn:
            seq = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = :name"),
                               {"name": table.name}).scalar()
            largest = conn.execute(select(func.max(table.c.id))).scalar()
        return max(int(seq or 0), int(largest or 0))

    def count_and_checksum(self) -> tuple[dict[str, int], str]:
        with self._engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # one snapshot for every figure
            counts = {t.name: int(conn.execute(select(func.count()).select_from(t))
                                  .scalar() or 0) for t in metadata.sorted_tables}
            digest = hashlib.sha256()
            for row in conn.execution_options(yield_per=CHUNK_ROWS).execute(
                    _association_rows()):
                digest.update(repr(tuple(row)).encode())
            conn.exec_driver_sql("COMMIT")
        return counts, digest.hexdigest()

    def pepper(self) -> str | None:
        with self._engine.connect() as conn:
            value = conn.execute(text("SELECT value FROM server_state WHERE name = :name"),
                                 {"name": PEPPER}).scalar()
        return None if value is None else str(value)

    def close(self) -> None:
        self._thread.submit(self._engine.dispose).result()
        self._thread.shutdown()


def _association_rows() -> Any:
    return select(*ASSOCIATIONS.c).order_by(ASSOCIATIONS.c.id)


async def migrate(source_path: str, target_url: str, *, from_scratch: bool = False,
                  progress: Progress | None = None,
                  chunk_rows: int = CHUNK_ROWS) -> Verification:
    """Copy the SQLite store at `source_path` into the PostgreSQL database `target_url`
    (its schema is created or upgraded first), then verify it."""
    source = SqliteSource(source_path, chunk_rows)
    try:
        await source.run(source.check)
        store = await Store.open(DbConfig(file="", url=target_url))
        try:
            if store.db.dialect != "postgresql":
                raise StoreError(f"{store.db.name}: not a PostgreSQL database")
            await _check_target(store, source, from_scratch)
            await _copy_associations(store, source, progress)
            for table in metadata.sorted_tables:
                if table is not ASSOCIATIONS:
                    await _copy_whole(store, source, table, progress)
            for table in metadata.sorted_tables:
                if _with_ids(table):
                    await store.db.advance_ids(
                        table, await source.run(source.largest_id, table))
            return await verify(store, source)
        finally:
            await store.close()
    finally:
        source.close()


async def _check_target(store: Store, source: SqliteSource, from_scratch: bool) -> None:
    """Refuse a target that holds another installation's store (its own pepper), unless
    told to empty it; a target this source was copied into before is resumed."""
    if from_scratch:
        async with store.db.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                await conn.execute(delete(table))
        return
    theirs = await store.state.get(PEPPER)
    ours = await source.run(source.pepper)
    if theirs is not None and theirs != ours:
        raise StoreError(f"{store.db.name}: already holds another kith store (a different "
                         "lookup pepper); to replace it, run with --from-scratch")


async def _copy_associations(store: Store, source: SqliteSource,
                             progress: Progress | None) -> None:
    async with store.db.engine.connect() as conn:
        copied_up_to = int((await conn.execute(select(func.max(ASSOCIATIONS.c.id))))
                           .scalar() or 0)
    insert = postgresql.insert(ASSOCIATIONS)
    # A row rewritten since the last run replaces its copy (same address, new id).
    upsert = insert.on_conflict_do_update(
        constraint="uq_threepid_source_medium_address",
        set_={c.name: insert.excluded[c.name] for c in ASSOCIATIONS.c
              if c.name not in ("source", "medium", "address")})
    copied = 0
    async with contextlib.aclosing(source.chunks(ASSOCIATIONS, copied_up_to)) as chunks:
        async for chunk in chunks:
            async with store.db.engine.begin() as conn:
                await conn.execute(upsert, chunk)
            copied += len(chunk)
            if progress is not None:
                progress(ASSOCIATIONS.name, copied)


async def _copy_whole(store: Store, source: SqliteSource, table: Table,
                      progress: Progress | None) -> None:
    copied = 0
    async with store.db.engine.begin() as conn, \
            contextlib.aclosing(source.chunks(table)) as chunks:
        await conn.execute(delete(table))
        async for chunk in chunks:
            await conn.execute(postgresql.insert(table), chunk)
            copied += len(chunk)
    if progress is not None:
        progress(table.name, copied)


async def verify(store: Store, source: SqliteSource) -> Verification:
    """Counts of every table, and a checksum of the associations, on both sides."""
    counts, source_checksum = await source.run(source.count_and_checksum)
    result = Verification(source_checksum=source_checksum)
    async with store.db.engine.connect() as conn:
        for table in metadata.sorted_tables:
            target = int((await conn.execute(select(func.count()).select_from(table)))
                         .scalar() or 0)
            result.counts.append(TableCount(table.name, counts[table.name], target))
        digest = hashlib.sha256()
        stream = await conn.stream(_association_rows())
        async for row in stream:
            digest.update(repr(tuple(row)).encode())
    result.target_checksum = digest.hexdigest()
    return result


def switch_lines(target_url: str) -> Sequence[str]:
    """The config lines that make kith serve from the target (`%` doubled, as the
    config file's interpolation wants)."""
    return ["[db]", f"db.url = {target_url.replace('%', '%%')}"]
