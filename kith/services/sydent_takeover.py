"""Starting on Sydent's own files: kith takes the installation over, once.

A Sydent operator's first try is `kith --config /etc/sydent/sydent.conf`, whose
`[db] db.file` is Sydent's `sydent.db`.  kith never writes into that file.  Instead it
creates its own database beside it (`kith.db`), imports Sydent's data there exactly as
`kith import-sydent` does, and records the choice in the configuration file, on the
`db.file` line, with a comment; from then on every start is a normal one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from configparser import ConfigParser
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from kith.config import DbConfig, KithConfig, load_config
from kith.config_template import with_option, write_atomically
from kith.services.sydent_import import ImportReport, import_sydent_db
from kith.store import (
    DatabaseKind,
    Store,
    StoreError,
    inspect_sqlite,
    make_self_contained,
    sqlite_path,
)

log = logging.getLogger("kith")

Runner = Callable[[Coroutine[Any, Any, None]], None]
# The names tried, in order, for kith's database beside Sydent's: kith.db, kith-2.db, ...
STORE_NAME, STORE_NAMES = "kith", 100
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def prepare_database(config: KithConfig, run: Runner) -> KithConfig:
    """The configuration to open the store with: `config` itself, unless its database is
    Sydent's, which is taken over first; then the configuration as now written.

    A database kith cannot use (not SQLite, of neither kind, of a newer kith schema,
    unreadable, ...) raises a one-line `StoreError`, and nothing has been written.
    Several kith processes starting together take it over once: the first holds a lock
    on the Sydent file; the others then read the configuration file it rewrote.
    """
    path = sqlite_path(config.db)
    if path is None or inspect_sqlite(path) is not DatabaseKind.SYDENT:
        return config
    if config.db.url:
        raise StoreError(f"{path}: is Sydent's database; kith takes it over when [db] "
                         "db.file names it (not db.url), or imports it with `kith "
                         "import-sydent`")
    with _locked(path):
        current = load_config(config.path)
        if sqlite_path(current.db) != path or inspect_sqlite(path) is not DatabaseKind.SYDENT:
            return prepare_database(current, run)
        return _take_over(current, path, run)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive advisory lock on the file, opened read-only: its bytes stay as they
    are, and SQLite's own (POSIX record) locks are not affected."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take_over(config: KithConfig, sydent_db: str, run: Runner) -> KithConfig:
    folder = os.path.dirname(sydent_db)
    _check_writable(config.path, sydent_db)
    if not os.access(folder, os.W_OK):
        raise StoreError(f"{sydent_db}: is Sydent's database, and kith cannot create its "
                         f"own beside it: {folder} is not writable")
    started = time.time()
    fd, building = tempfile.mkstemp(dir=folder, prefix=f".{STORE_NAME}-import-", suffix=".db")
    os.close(fd)
    try:
        report = _import(config, sydent_db, building, int(started * 1000), run)
        store_path = _put_in_place(building, folder)
    except BaseException:
        for suffix in ("", *_SQLITE_SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(building + suffix)
        raise
    setting = os.path.join(os.path.dirname(config.db.file), os.path.basename(store_path))
    try:
        _record(config.path, config.db.file, setting, started)
    except OSError as exc:
        raise StoreError(f"{config.path}: cannot write it ({exc.strerror or exc}); kith "
                         f"imported Sydent's database into {store_path}: set [db] db.file "
                         f"= {setting} there by hand") from None
    log.warning("took over Sydent's database %s: imported it into %s (%s) and set [db] "
                "db.file = %s in %s; Sydent's file is left unchanged",
                sydent_db, store_path, _summary(report), setting, config.path)
    return load_config(config.path)


def _check_writable(config_path: str, sydent_db: str) -> None:
    """The configuration file must take the new `db.file` (written as a new file renamed
    over it), or every start would take Sydent's database over again."""
    target = os.path.realpath(config_path)
    for path in (target, os.path.dirname(target)):
        if not os.access(path, os.W_OK):
            raise StoreError(
                f"{sydent_db}: is Sydent's database, and kith cannot record in {config_path} "
                f"that it took it over ({path} is not writable); make it writable, or "
                f"import it into another configuration with `kith --config OTHER.conf "
                f"import-sydent {config_path}`")


def _import(config: KithConfig, sydent_db: str, into: str, now_ms: int,
            run: Runner) -> ImportReport:
    peer_urls = {peer.name: peer.base_replication_url for peer in config.peers
                 if peer.base_replication_url}
    reports: list[ImportReport] = []

    async def main() -> None:
        store = await Store.open(DbConfig(file=into))
        try:
            reports.append(await import_sydent_db(
                store, sydent_db, config.general.server_name, now_ms, peer_urls))
        finally:
            await store.close()

    try:
        run(main())
        make_self_contained(into)  # no WAL to lose when it is renamed
    except (OSError, ValueError, sqlite3.Error, SQLAlchemyError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(f"{sydent_db}: is Sydent's database, and kith cannot import it: "
                         f"{problem}") from None
    return reports[0]


def _put_in_place(building: str, folder: str) -> str:
    """Rename the finished database to the first free name; never over an existing file
    (nor beside a stray WAL or journal, which SQLite would apply to it)."""
    for n in range(1, STORE_NAMES + 1):
        path = os.path.join(folder, f"{STORE_NAME}.db" if n == 1 else f"{STORE_NAME}-{n}.db")
        if any(os.path.lexists(path + suffix) for suffix in _SQLITE_SIDE_FILES):
            continue
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        os.replace(building, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return path
    raise StoreError(f"{folder}: {STORE_NAME}.db to {STORE_NAME}-{STORE_NAMES}.db all exist; "
                     "kith will not overwrite them")


def _record(config_path: str, old: str, new: str, when: float) -> None:
    """Point `[db] db.file` at kith's database, saying why; every other line stays."""
    with open(config_path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    layout = ConfigParser(interpolation=None, strict=False)
    layout.read_string(text)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
    comment = [f"kith took over Sydent's database {old} on {stamp}: it imported it into",
               f"{new} and left {old} unchanged (kith does not use it any more)."]
    if not layout.has_option("db", "db.file") and "SYDENT_DB_PATH" in os.environ:
        comment.append("$SYDENT_DB_PATH named Sydent's file; this line takes precedence.")
    write_atomically(config_path, with_option(text, "db", "db.file",
                                              new.replace("%", "%%"), comment))


def _summary(report: ImportReport) -> str:
    return ", ".join([f"{what}: {count}" for what, count in report.imported.items()]
                     + report.notes)
