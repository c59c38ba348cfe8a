"""Opening the database, applying migrations, and the group-commit writer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import fcntl
import functools
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    FromClause,
    Select,
    Table,
    and_,
    bindparam,
    event,
    exists,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import ClauseElement, ColumnElement, Executable

from kith.config import DbConfig
from kith.store.sydent_db import SYDENT_TABLES, sydent_schema_problem

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# PostgreSQL advisory lock held while migrating (any constant; "kith" in ASCII).
MIGRATION_LOCK_KEY = 0x6B697468
# PostgreSQL advisory lock held by each group-commit transaction ("kitw").
WRITE_LOCK_KEY = 0x6B697477


class StoreError(Exception):
    """The database cannot be used; the message names it and says why, in one line."""


class DatabaseKind(enum.Enum):
    NEW = "new"  # no file yet, or one without tables: kith creates its schema there
    KITH = "kith"
    SYDENT = "sydent"  # Sydent's database: kith takes it over and never writes into it


_SQLITE_HEADER = b"SQLite format 3\x00"


_DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it: what the driver raised (`orig`), what it was
    raised from and what it was raised while handling, each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a PostgreSQL error carries (asyncpg's `sqlstate`, psycopg's `pgcode`)."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database's disk is full: SQLite's
    SQLITE_FULL, PostgreSQL's disk_full, or ENOSPC.  Reads still work then, and writes
    work again once there is room: nothing about it is permanent."""
    return any(getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
               or _sqlstate(current) == _DISK_FULL_SQLSTATE
               or (isinstance(current, OSError) and current.errno == errno.ENOSPC)
               for current in _chain(exc))


# PostgreSQL's connection_exception class, and admin_shutdown, crash_shutdown and
# cannot_connect_now: the server went away or is not accepting connections yet.
_UNREACHABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database cannot be reached now: the
    connection was refused, reset or closed under a query, the server is shutting down
    or starting, or no pooled connection came in time.  Nothing about it is permanent:
    the pool connects again once the database answers."""
    for current in _chain(exc):
        sqlstate = _sqlstate(current)
        if (isinstance(current, (ConnectionError, sa_exc.TimeoutError))
                or (isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated)
                or (sqlstate is not None and sqlstate.startswith(_UNREACHABLE_SQLSTATES))
                or (type(current).__module__.startswith("asyncpg")
                    and type(current).__name__ in _UNREACHABLE_DRIVER_ERRORS)):
            return True
    return False


# asyncpg's errors for a connection that is closed or lost (they carry no SQLSTATE).
_UNREACHABLE_DRIVER_ERRORS = frozenset(("ConnectionDoesNotExistError",
                                        "InternalClientError", "InterfaceError"))

# PostgreSQL's serialization_failure and deadlock_detected.
_CONFLICT_SQLSTATES = frozenset(("40001", "40P01"))


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the transaction lost to a concurrent one
    and was rolled back: running it again is the cure."""
    return any(_sqlstate(current) in _CONFLICT_SQLSTATES for current in _chain(exc))


def sqlite_file(url: URL) -> str | None:
    """The absolute path of the SQLite file of `url`; None for another database, or an
    in-memory one."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return os.path.abspath(url.database)


def sqlite_path(db: DbConfig) -> str | None:
    """The absolute path of the SQLite file `db` names; None for another database."""
    return sqlite_file(make_url(db.url)) if db.url else os.path.abspath(db.file)


def make_self_contained(path: str) -> None:
    """Fold the WAL of the closed SQLite store at `path` into its file and leave it in
    rollback-journal mode: one file, which can be renamed or copied on its own."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()


def inspect_sqlite(path: str) -> DatabaseKind:
    """What the SQLite file at `path` is, for kith; a `StoreError` if kith cannot use it.

    Reads without writing anything: a file in rollback-journal mode (Sydent's) is
    opened `immutable`, so SQLite takes no lock and creates no journal, WAL or
    shared-memory file beside it; one in WAL mode (kith's), which a running server may
    be writing, is opened read-only through its WAL, which `immutable` would ignore.
    """
    folder = os.path.dirname(path)
    if not os.path.lexists(path):
        if not os.path.isdir(folder):
            raise StoreError(f"{path}: its folder does not exist")
        _require_writable(folder, path)
        return DatabaseKind.NEW
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except IsADirectoryError:
        raise StoreError(f"{path}: is a directory, not a database file") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read it: {e.strerror or e}") from None
    if header and header != _SQLITE_HEADER:
        raise StoreError(f"{path}: not a SQLite database")
    tables, revisions, user_version = _read_schema(path) if header else (set(), [], 0)
    if revisions:
        check_revisions(path, revisions)
        kind = DatabaseKind.KITH
    elif SYDENT_TABLES <= tables:
        problem = sydent_schema_problem(tables, user_version)
        if problem:
            raise StoreError(f"{path}: {problem}")
        # (kith's own migration table may be there, empty: left by a kith too old to
        # recognise Sydent's database, whose start failed.  Sydent's data is intact.)
        return DatabaseKind.SYDENT
    elif "alembic_version" in tables:
        raise StoreError(f"{path}: kith's first start on it did not finish (its schema "
                         "revision is missing); move it away and start again")
    elif tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(f"{path}: a SQLite database that is neither kith's nor Sydent's "
                         f"(tables: {listed})")
    else:
        kind = DatabaseKind.NEW
    _require_writable(path, path)
    _require_writable(folder, path)  # for SQLite's WAL beside the file
    return kind


def _read_schema(path: str) -> tuple[set[str], list[str], int]:
    """(tables, kith's schema revisions, `PRAGMA user_version`) of a SQLite file."""
    in_wal_mode = os.path.exists(f"{path}-wal")
    uri = f"file:{urllib.parse.quote(path)}?{'mode=ro' if in_wal_mode else 'immutable=1'}"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            tables = {name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")
                if not name.startswith("sqlite_")}
            revisions = [r for (r,) in conn.execute("SELECT version_num FROM alembic_version")
                         ] if "alembic_version" in tables else []
            user_version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StoreError(f"{path}: not a usable SQLite database: {e}") from None
    return tables, revisions, user_version


def _require_writable(path: str, database: str) -> None:
    if not os.access(path, os.W_OK):
        what = "its folder" if path != database else "it"
        raise StoreError(f"{database}: kith cannot write {what} (permission denied)")


@functools.cache
def _known_revisions() -> tuple[frozenset[str], str]:
    """(every schema revision this kith knows, its newest)."""
    script = ScriptDirectory(str(MIGRATIONS))
    return (frozenset(s.revision for s in script.walk_revisions()),
            ", ".join(script.get_heads()))


def schema_head() -> str:
    """The newest schema revision this kith knows."""
    return _known_revisions()[1]


def check_revisions(where: str, revisions: Iterable[str]) -> None:
    """Refuse a kith database whose schema is newer than the migrations of this kith."""
    known, head = _known_revisions()
    unknown = sorted(set(revisions) - known)
    if unknown:
        raise StoreError(f"{where}: a kith database of a newer schema (revision "
                         f"{', '.join(unknown)}) than this kith knows ({head}); run a newer "
                         "kith on it")


def database_url(db: DbConfig) -> str:
    """The async SQLAlchemy URL for the configured database."""
    if db.url:
        url = db.url
        for plain, driver in (("postgresql://", "postgresql+asyncpg://"),
                              ("postgres://", "postgresql+asyncpg://"),
                              ("sqlite://", "sqlite+aiosqlite://")):
            if url.startswith(plain):
                return driver + url[len(plain):]
        return url
    return "sqlite+aiosqlite:///" + os.path.abspath(db.file)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; synchronous=FULL makes every commit
    # durable before it is acknowledged (an acked bind survives kill -9 and power loss).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """An async engine plus the one writer that batches commits."""

    def __init__(self, engine: AsyncEngine, process_lock: Any = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # What error messages call it: the file, or the URL without its password.
        self.name = str(engine.url.database) if self.dialect == "sqlite" else \
            engine.url.render_as_string(hide_password=True)
        self.writer = GroupCommitWriter(engine, process_lock)
        self._lock_fd: int | None = None

    # The statements whose SQL differs between SQLite and PostgreSQL, written once.  Both
    # dialects' INSERT constructs take ON CONFLICT clauses the same way.

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def insert_or_ignore(self, table: Table,
                         conflict: Sequence[str] | None = None) -> Executable:
        """INSERT that skips a row which conflicts with a stored one (on the unique
        columns `conflict`, or on any unique constraint)."""
        return self._insert(table).on_conflict_do_nothing(index_elements=conflict)

    def upsert(self, table: Table, conflict: Sequence[str],
               update: Sequence[str]) -> Executable:
        """INSERT that, when a row with the same `conflict` columns is stored, sets its
        `update` columns to the new row's instead."""
        insert = self._insert(table)
        return insert.on_conflict_do_update(
            index_elements=conflict, set_={c: insert.excluded[c] for c in update})

    def upsert_where(self, table: Table, values: Mapping[str, Any], conflict: Sequence[str],
                     set_: Mapping[str, Any],
                     where: ColumnElement[bool] | None = None) -> postgresql.Insert | sqlite.Insert:
        """INSERT of `values` that, when a row with the same `conflict` columns is stored,
        sets `set_` (expressions of the stored row) instead, but only where `where` holds
        of the stored row: one atomic statement, so concurrent writers never lose an
        update.  Add `.returning(...)`: no row comes back when `where` refused."""
        return self._insert(table).values(dict(values)).on_conflict_do_update(
            index_elements=conflict, set_=dict(set_), where=where)

    def replace_with_new_id(
        self, table: Table, conflict: Sequence[str], columns: Sequence[str],
        unless: Callable[[FromClause], ColumnElement[bool]] | None = None,
    ) -> Executable:
        """INSERT of `columns` (bound by name) that replaces the row with the same
        `conflict` columns and gives it a new, larger `id`, for tables whose id is a change
        cursor.  SQLite's REPLACE takes the next AUTOINCREMENT id (never one used before,
        even by a deleted row); PostgreSQL takes the id sequence's next value.

        With `unless`, a condition on the stored row (given the table's alias), a row is
        written only where the stored row with the same `conflict` columns does not meet
        it; the check and the write are one statement."""
        if unless is None:
            insert = self._insert(table).values({c: bindparam(c) for c in columns})
        else:
            stored = table.alias("stored")
            same = [stored.c[c] == bindparam(c, type_=table.c[c].type) for c in conflict]
            insert = self._insert(table).from_select(list(columns), select(
                *[bindparam(c, type_=table.c[c].type) for c in columns]
            ).where(~exists().where(and_(*same, unless(stored)))))
        if self.dialect != "postgresql":
            return insert.prefix_with("OR REPLACE")
        next_id = text(f"nextval(pg_get_serial_sequence('{table.name}', 'id'))")
        return insert.on_conflict_do_update(
            index_elements=conflict,
            set_={"id": next_id, **{c: insert.excluded[c] for c in columns
                                    if c not in conflict}})

    async def advance_ids(self, table: Table, past: int) -> None:
        """Make every id `table` gives from now on larger than `past` (ids already larger
        stay as they are)."""
        name = table.name
        if past < 1:
            return
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                sequence = f"pg_get_serial_sequence('{name}', 'id')"
                await conn.execute(text(
                    f"SELECT setval({sequence}, GREATEST(:past, COALESCE("
                    f"pg_sequence_last_value({sequence}::regclass), 0)))"), {"past": past})
                return
            # SQLite's AUTOINCREMENT takes the next id after the larger of sqlite_sequence's
            # value and the largest id in the table.
            updated = await conn.execute(text(
                "UPDATE sqlite_sequence SET seq = max(seq, :past) WHERE name = :name"),
                {"past": past, "name": name})
            if not updated.rowcount:
                await conn.execute(text(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :past)"),
                    {"past": past, "name": name})

    async def stream_tuples(self, statement: Select[Any],
                            batch: int) -> AsyncIterator[Sequence[Sequence[Any]]]:
        """The rows of `statement` (a SELECT of plain columns), `batch` at a time, read
        through the driver: at start-up kith reads millions of rows, and the driver's
        own rows cost a third of what SQLAlchemy's do.  The next batch is fetched while
        the caller works on this one."""
        sql = str(statement.compile(self.engine, compile_kwargs={"literal_binds": True}))
        async with self.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            async with contextlib.AsyncExitStack() as stack:
                if self.dialect == "postgresql":
                    await stack.enter_async_context(driver.transaction())
                    cursor = await driver.cursor(sql)
                    fetch = functools.partial(cursor.fetch, batch)
                else:
                    cursor = await driver.execute(sql)
                    stack.push_async_callback(cursor.close)
                    fetch = functools.partial(cursor.fetchmany, batch)
                ahead: asyncio.Future[Sequence[Sequence[Any]]] = asyncio.ensure_future(fetch())
                try:
                    while rows := await ahead:
                        ahead = asyncio.ensure_future(fetch())
                        yield rows
                finally:
                    ahead.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await ahead

    def likely(self, condition: str) -> str:
        """`condition` (SQL) marked as true for most rows.  SQLite keeps no statistics
        here and guesses that an equality narrows rows tenfold: told otherwise, it picks
        the index that serves the rest of the query (a partial index whose WHERE clause
        the query repeats still matches)."""
        return f"likelihood({condition}, 0.99)" if self.dialect == "sqlite" else condition

    @classmethod
    def open(cls, db: DbConfig, process_lock: Any = None) -> Database:
        """`process_lock` (a multiprocessing.Lock) serialises the group commits of worker
        processes sharing one SQLite file: they then take turns instead of backing off in
        SQLite's busy handler, which sleeps for milliseconds at a time.

        Statement parameters carry client secrets and tokens: SQLAlchemy leaves them out
        of its error messages and SQL logs (`hide_parameters`)."""
        url = database_url(db)
        if url.startswith("sqlite"):
            engine = create_async_engine(url, pool_size=4, max_overflow=4,
                                         hide_parameters=True)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            return cls(engine, process_lock)
        else:
            engine = create_async_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True,
                                         hide_parameters=True)
        return cls(engine)

    async def migrate(self) -> None:
        """Bring the schema up to the newest migration (run at every start)."""

        def upgrade(connection: Connection) -> None:
            check_revisions(self.name,
                            MigrationContext.configure(connection).get_current_heads())
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

        # Instances or workers starting together on one database migrate in turn.
        async with self._file_lock(), self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
            await conn.run_sync(upgrade)

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """On SQLite, an exclusive flock(2) on the database file: it does not touch
        SQLite's own (POSIX record) locks, and goes with the process if it dies.

        The descriptor stays open until `close`, after SQLite's connections: closing any
        descriptor of a file drops every POSIX lock the process holds on it, SQLite's
        included.  Without its shared lock, another process closing the database (the
        CLI, say) would think itself the last user and delete the WAL this one writes to."""
        path = sqlite_file(self.engine.url)
        if path is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fd = self._lock_fd
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        await self.writer.close()
        await self.engine.dispose()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


class _DriverRun(NamedTuple):
    """Consecutive writes of one statement, for the driver: its SQL and the rows."""

    sql: str
    rows: list[tuple[Any, ...]]
    writes: Sequence[_Write]


def _runs(batch: Sequence[_Write]) -> Iterator[tuple[Executable, Sequence[_Write]]]:
    """The batch as runs of consecutive writes of one statement."""
    i = 0
    while i < len(batch):
        start, statement = i, batch[i].statement
        while i < len(batch) and batch[i].statement is statement:
            i += 1
        yield statement, batch[start:i]


class _Write:
    """One submission to the group-commit writer."""

    __slots__ = ("statement", "params", "future", "wants_ids")

    def __init__(self, statement: Executable, params: list[dict[str, Any]],
                 future: asyncio.Future[range | None], wants_ids: bool) -> None:
        self.statement = statement
        self.params = params
        self.future = future
        self.wants_ids = wants_ids


class GroupCommitWriter:
    """Runs writes that arrive together in one transaction, acking each after the commit.

    One fsync per batch instead of one per write: under concurrent binds this is the
    difference between about a thousand and several thousand writes a second.  Order is
    kept: statements run in the order they were submitted, and consecutive submissions of
    the same statement become one executemany.

    On a SQLite file the writer has a connection and a thread of its own, and a batch is
    one call into that thread: the transaction, the cross-process lock, the statements
    and the commit run there, without SQLAlchemy's per-statement work and without the
    event loop being woken for each step (docs/performance.md, "Binds").  Elsewhere
    (PostgreSQL), and for a batch that failed there and is retried one write at a time,
    SQLAlchemy holds the transaction and the driver runs the statements (`_apply`).
    """

    MAX_BATCH = 2000

    def __init__(self, engine: AsyncEngine, process_lock: Any = None) -> None:
        self._engine = engine
        self._process_lock = process_lock
        self._pending: list[_Write] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # On a SQLite file: the writer's thread, and its connection (opened there).
        # (Not for a URL with options for the driver, which this connection would lack.)
        self._file = None if engine.url.query else sqlite_file(engine.url)
        self._thread = None if self._file is None else \
            concurrent.futures.ThreadPoolExecutor(1, "kith-group-commit")
        self._connection: sqlite3.Connection | None = None
        # Each statement's SQL for the driver and the names of its parameters in order
        # (None: one that needs SQLAlchemy's processing of its parameters).
        self._driver_sql: dict[Executable, tuple[str, tuple[str, ...]] | None] = {}

    async def execute(self, statement: Executable, params: Sequence[dict[str, Any]]) -> None:
        """Write `params` with `statement`; returns once the transaction is committed."""
        await self._submit(statement, params, wants_ids=False)

    async def insert(self, statement: Executable,
                     params: Sequence[dict[str, Any]]) -> range | None:
        """`execute` an INSERT (or SQLite REPLACE) into a table with an AUTOINCREMENT id,
        and say which ids its rows took, in order: on a SQLite file, where the transaction
        holds the file's write lock, one statement's rows take consecutive ids.  None
        where that is not known: on PostgreSQL, whose sequence gives ids to concurrent
        writers in any order, and for a write retried alone."""
        return await self._submit(statement, params, wants_ids=True)

    async def _submit(self, statement: Executable, params: Sequence[dict[str, Any]], *,
                      wants_ids: bool) -> range | None:
        if self._closed:
            raise RuntimeError("database writer is closed")
        future: asyncio.Future[range | None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(statement, list(params), future, wants_ids))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kith-group-commit")
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while not self._closed or self._pending:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH:]
            try:
                runs = self._driver_runs(batch)
                if runs is not None:
                    ids = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._commit_in_thread, runs)
                else:
                    async with self._turn():
                        async with self._engine.begin() as conn:
                            await self._apply(conn, batch)
                    ids = [None] * len(batch)
            except Exception:
                # One bad write must not fail its neighbours: retry each alone.
                log.debug("batch of %d failed; retrying one by one", len(batch), exc_info=True)
                for item in batch:
                    await self._apply_alone(item)
                continue
            for item, item_ids in zip(batch, ids, strict=True):
                if not item.future.done():
                    item.future.set_result(item_ids)

    async def _apply_alone(self, item: _Write) -> None:
        try:
            async with self._turn(), self._engine.begin() as conn:
                await self._apply(conn, [item])
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            if not item.future.done():
                item.future.set_result(None)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Hold the cross-process write lock, if there is one, for one transaction."""
        if self._process_lock is None:
            yield
            return
        await asyncio.to_thread(self._process_lock.acquire)
        try:
            yield
        finally:
            self._process_lock.release()

    @contextlib.asynccontextmanager
    async def transaction(self, *, commit: bool = True) -> AsyncIterator[AsyncConnection]:
        """One transaction of several statements, taking its turn with the group commits
        (and their locks) so that ids still become visible in order.  With `commit`
        False it is rolled back: what it would have done, without doing it."""
        async with self._turn(), self._engine.connect() as conn:
            async with conn.begin() as transaction:
                await self._lock_writes(conn)
                yield conn
                if not commit:
                    await transaction.rollback()

    @staticmethod
    async def _lock_writes(conn: AsyncConnection) -> None:
        if conn.dialect.name == "postgresql":
            # Writers in other processes wait until this transaction is committed, so ids
            # become visible in id order and a reader of changes_since skips none.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": WRITE_LOCK_KEY})

    async def _apply(self, conn: AsyncConnection, batch: Sequence[_Write]) -> None:
        """Run the batch's statements on `conn`, in its transaction: through the driver
        where a statement's parameters need no processing (one `executemany`, without
        SQLAlchemy's work for each row), through SQLAlchemy otherwise."""
        await self._lock_writes(conn)
        for statement, writes in _runs(batch):
            params = [p for write in writes for p in write.params]
            if not params:
                continue
            plan = self._driver_plan(statement)
            if plan is None:
                await conn.execute(statement, params)
                continue
            sql, names = plan
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.executemany(sql, [tuple(p[n] for n in names) for p in params])

    def _driver_runs(self, batch: Sequence[_Write]) -> list[_DriverRun] | None:
        """The batch for the writer's thread: runs of one statement, as its SQL and its
        rows of parameters in order.  None where there is no such thread, or where a
        statement needs SQLAlchemy."""
        if self._thread is None:
            return None
        runs: list[_DriverRun] = []
        for statement, writes in _runs(batch):
            plan = self._driver_plan(statement)
            if plan is None:
                return None
            sql, names = plan
            rows = [tuple(p[n] for n in names) for write in writes for p in write.params]
            runs.append(_DriverRun(sql, rows, writes))
        return runs

    def _driver_plan(self, statement: Executable) -> tuple[str, tuple[str, ...]] | None:
        if statement not in self._driver_sql:
            if len(self._driver_sql) >= 32:
                self._driver_sql.clear()
            plan = None
            if isinstance(statement, ClauseElement):
                compiled = statement.compile(dialect=self._engine.dialect)
                names = getattr(compiled, "positiontup", None)
                if names is not None and not getattr(compiled, "_bind_processors", True):
                    plan = (compiled.string, tuple(names))
            self._driver_sql[statement] = plan
        return self._driver_sql[statement]

    def _commit_in_thread(self, runs: list[_DriverRun]) -> list[range | None]:
        """(In the writer's thread.)  One transaction of `runs`; the ids each write's rows
        took, where it asked for them."""
        conn = self._connection
        if conn is None:
            assert self._file is not None
            # Autocommit mode: the transaction is begun and ended here, explicitly.
            conn = self._connection = sqlite3.connect(self._file, isolation_level=None)
            _sqlite_pragmas(conn, None)
        if self._process_lock is not None:
            self._process_lock.acquire()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids: list[range | None] = []
                for run in runs:
                    conn.executemany(run.sql, run.rows)
                    first = None
                    if all(write.wants_ids for write in run.writes):
                        (last,), = conn.execute("SELECT last_insert_rowid()")
                        first = int(last) - len(run.rows) + 1
                    for write in run.writes:
                        if first is None:
                            ids.append(None)
                        else:
                            ids.append(range(first, first + len(write.params)))
                            first += len(write.params)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if self._process_lock is not None:
                self._process_lock.release()
        return ids

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._disconnect)
            self._thread.shutdown()

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
