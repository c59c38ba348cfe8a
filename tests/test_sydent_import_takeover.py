"""Starting kith on a configuration whose db.file is Sydent's database: kith takes it over
into a database of its own beside it, once, and never writes into Sydent's file; a
database kith cannot use stops it with one line, having written nothing.

(The same, driven from a real Sydent 2.6.1 installation: tests/e2e/test_sydent_import.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from kith.config import DbConfig, load_config
from kith.config_template import with_option
from kith.store import Store, StoreError
from tests.conftest import write_config
from tests.test_sydent_import_unit import make_sydent_db

TOOK_OVER = "took over Sydent's database"

# The rows of threepid_associations the import makes from make_sydent_db's database:
# Sydent's 2 bindings, the unbind its active peer was not sent yet, and the association
# that peer replicated to it.
IMPORTED_ROWS = 4


def kith(*args: str, cwd: Path, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kith", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def snapshot(directory: Path) -> dict[str, str]:
    """Every file in `directory` (not below) → sha256 of its bytes ("dir" for folders)."""
    return {p.name: "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.iterdir()}


def configured(directory: Path, sections: dict[str, dict[str, object]]) -> Path:
    """A sydent.conf for tests, with its signing key already written in (as a Sydent
    installation's has)."""
    conf = write_config(directory, sections)
    load_config(str(conf), env={})
    return conf


def sydent_install(directory: Path, db_file: str | None = None) -> tuple[Path, Path]:
    """A sydent.conf (every file inside `directory`) naming a Sydent database with data."""
    sydent_db = directory / "sydent.db"
    make_sydent_db(sydent_db, int(time.time() * 1000))
    conf = configured(directory, {"db": {"db.file": db_file or sydent_db}})
    return conf, sydent_db


def count(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_first_start_takes_over_and_the_second_is_normal(tmp_path: Path) -> None:
    conf, sydent_db = sydent_install(tmp_path)
    before, conf_before = snapshot(tmp_path), conf.read_text()
    first = kith("--config", str(conf), "onbind", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    notes = [line for line in first.stderr.splitlines() if TOOK_OVER in line]
    assert len(notes) == 1, first.stderr
    assert f"{TOOK_OVER} {sydent_db}: imported it into {tmp_path / 'kith.db'}" in notes[0]
    assert "associations: 2" in notes[0] and "accounts: 1" in notes[0]
    after = snapshot(tmp_path)
    assert after.pop("kith.db")
    assert after.pop("sydent.conf") != before.pop("sydent.conf")
    assert after == before  # Sydent's database byte for byte, and nothing else new

    # The db.file line now names kith's database, under a comment; every other line stays.
    lines = conf.read_text().splitlines()
    at = lines.index(f"db.file = {tmp_path / 'kith.db'}")
    assert lines[at - 2].startswith(f"# kith took over Sydent's database {sydent_db} on ")
    assert lines[at - 1] == (f"# {tmp_path / 'kith.db'} and left {sydent_db} unchanged "
                             "(kith does not use it any more).")
    assert lines[:at - 2] + [f"db.file = {sydent_db}"] + lines[at + 1:] == \
        conf_before.splitlines()
    kith_db = tmp_path / "kith.db"
    assert count(kith_db, "SELECT count(*) FROM threepid_associations") == IMPORTED_ROWS
    assert count(kith_db, "SELECT count(*) FROM accounts") == 1

    conf_taken = conf.read_text()
    second = kith("--config", str(conf), "onbind", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert TOOK_OVER not in second.stderr
    assert conf.read_text() == conf_taken
    again = snapshot(tmp_path)
    assert again.pop("sydent.db") == before["sydent.db"]
    # kith's own database, with perhaps its WAL beside it
    assert set(again) - {"kith.db-wal", "kith.db-shm"} == {"kith.db", "sydent.conf"}
    assert count(kith_db, "SELECT count(*) FROM threepid_associations") == IMPORTED_ROWS


def test_relative_db_file_stays_relative(tmp_path: Path) -> None:
    conf, _ = sydent_install(tmp_path, db_file="sydent.db")
    result = kith("--config", str(conf), "onbind", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\ndb.file = kith.db\n" in conf.read_text()
    assert "set [db] db.file = kith.db in" in result.stderr


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    conf, sydent_db = sydent_install(tmp_path)
    (tmp_path / "kith.db").write_bytes(b"the operator's own file")
    (tmp_path / "kith-2.db-wal").write_bytes(b"a stray WAL SQLite would apply")
    result = kith("--config", str(conf), "onbind", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kith.db").read_bytes() == b"the operator's own file"
    assert not (tmp_path / "kith-2.db").exists()
    assert f"db.file = {tmp_path / 'kith-3.db'}\n" in conf.read_text()
    assert count(tmp_path / "kith-3.db",
                 "SELECT count(*) FROM threepid_associations") == IMPORTED_ROWS


def test_db_file_from_the_environment(tmp_path: Path) -> None:
    """$SYDENT_DB_PATH is a default, as in Sydent: the db.file line kith writes into the
    file takes precedence over it from then on."""
    sydent_db = tmp_path / "sydent.db"
    make_sydent_db(sydent_db, int(time.time() * 1000))
    conf = configured(tmp_path, {})
    conf.write_text(re.sub(r"\[db\]\ndb.file = .*\n", "", conf.read_text()))
    assert "db.file" not in conf.read_text()
    env = {"SYDENT_DB_PATH": str(sydent_db)}
    first = kith("--config", str(conf), "onbind", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(TOOK_OVER) == 1
    text = conf.read_text()
    kith_db = tmp_path / "kith.db"
    assert text.splitlines()[-6:-3] == ["", "[db]", text.splitlines()[-4]]
    assert text.splitlines()[-4].startswith(f"# kith took over Sydent's database {sydent_db} ")
    assert text.splitlines()[-3:] == [
        f"# {kith_db} and left {sydent_db} unchanged (kith does not use it any more).",
        "# $SYDENT_DB_PATH named Sydent's file; this line takes precedence.",
        f"db.file = {kith_db}"]
    second = kith("--config", str(conf), "onbind", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert TOOK_OVER not in second.stderr
    assert conf.read_text() == text


def test_import_sydent_on_the_same_configuration(tmp_path: Path) -> None:
    conf, sydent_db = sydent_install(tmp_path)
    before = snapshot(tmp_path)["sydent.db"]
    for run in range(2):
        result = kith("--config", str(conf), "import-sydent", str(conf), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "associations: 2" in result.stdout
        assert "open validation sessions: 1" in result.stdout
        assert result.stderr.count(TOOK_OVER) == (1 if run == 0 else 0), result.stderr
        again = f"names kith's database now: importing again from {sydent_db}"
        assert (again in result.stdout) == (run == 1)
    assert snapshot(tmp_path)["sydent.db"] == before
    assert sorted(snapshot(tmp_path)) == ["kith.db", "sydent.conf", "sydent.db"]
    assert count(tmp_path / "kith.db",
                 "SELECT count(*) FROM threepid_associations") == IMPORTED_ROWS


def waiting_for_lock(path: Path) -> int:
    """How many processes wait for a flock on `path` (Linux's /proc/locks)."""
    inode = f":{path.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and "FLOCK" in line and inode in line)


def test_concurrent_starts_take_over_once(tmp_path: Path) -> None:
    """Processes starting together wait for the one taking over, then start normally."""
    conf, sydent_db = sydent_install(tmp_path)
    conf_before = conf.read_text()
    held = os.open(sydent_db, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a kith in the middle of taking over would
        procs = [subprocess.Popen(
            [sys.executable, "-m", "kith", "--config", str(conf), "onbind"], cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin"}) for _ in range(3)]
        deadline = time.monotonic() + 60
        while waiting_for_lock(sydent_db) < len(procs):
            assert all(p.poll() is None for p in procs), "a kith did not wait"
            assert time.monotonic() < deadline, "the kiths did not all wait for the lock"
            time.sleep(0.05)
        assert sorted(snapshot(tmp_path)) == ["sydent.conf", "sydent.db"]
        assert conf.read_text() == conf_before
    finally:
        os.close(held)  # let them all go at once
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert sum(e.count(TOOK_OVER) for e in errors) == 1, errors
    assert sorted(snapshot(tmp_path)) == ["kith.db", "sydent.conf", "sydent.db"]


def test_workers_serve_the_database_taken_over_before_they_start(tmp_path: Path) -> None:
    conf, _ = sydent_install(tmp_path)
    port = load_config(str(conf), env={}).http.client_port
    conf.write_text(conf.read_text().replace("[general]\n", "[general]\nworkers = 2\n"))
    log = tmp_path.parent / f"{tmp_path.name}-kith.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kith", "--config", str(conf)],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
                                env={"PATH": "/usr/bin:/bin"})
    try:
        url = (f"http://127.0.0.1:{port}/_matrix/identity/api/v1/lookup"
               "?medium=email&address=alice@example.com")
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                    found = json.loads(resp.read())
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert found["mxid"] == "@alice:hs.test"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert log.read_text().count(TOOK_OVER) == 1
    assert "workers started" in log.read_text()


def _text_file(path: Path) -> None:
    path.write_text("db.file is not meant to be this\n")


def _neither(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (id integer primary key, body text)")


def _newer_kith(path: Path) -> None:
    async def make() -> None:
        store = await Store.open(DbConfig(file=str(path)))
        await store.close()

    asyncio.run(make())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
        conn.commit()
        conn.execute("PRAGMA journal_mode=DELETE")  # all in the file, none in a WAL


def _newer_sydent(path: Path) -> None:
    make_sydent_db(path, 0)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 6")


def _unfinished_kith(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) not null)")
        conn.execute("CREATE TABLE threepid_associations (id integer primary key)")


def _directory(path: Path) -> None:
    path.mkdir()


def _truncated(path: Path) -> None:
    make_sydent_db(path, 0)
    path.write_bytes(path.read_bytes()[:1024 + 16])


@pytest.mark.parametrize(("make", "problem"), [
    (_text_file, "not a SQLite database"),
    (_neither, "a SQLite database that is neither kith's nor Sydent's (tables: notes)"),
    (_newer_kith, "a kith database of a newer schema (revision 9999) than this kith knows"),
    (_newer_sydent, "a Sydent database of a newer schema (version 6) than kith knows (5)"),
    (_unfinished_kith, "kith's first start on it did not finish"),
    (_directory, "is a directory, not a database file"),
    (_truncated, "not a usable SQLite database"),
])
def test_an_unusable_database_stops_kith_with_one_line(
        tmp_path: Path, make: Callable[[Path], None], problem: str) -> None:
    db = tmp_path / "data.db"
    make(db)
    conf = configured(tmp_path, {"db": {"db.file": db}})
    before = snapshot(tmp_path)
    result = kith("--config", str(conf), cwd=tmp_path)  # serve, the default command
    assert result.returncode == 1
    assert result.stderr.startswith(f"kith: {db}: {problem}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert snapshot(tmp_path) == before  # no table, no journal, no pid file, no config edit


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_database_stops_kith_with_one_line(tmp_path: Path) -> None:
    conf, sydent_db = sydent_install(tmp_path)
    sydent_db.chmod(0)
    before = snapshot(tmp_path)
    result = kith("--config", str(conf), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"kith: {sydent_db}: cannot read it: Permission denied\n"
    assert snapshot(tmp_path) == before


async def test_the_store_never_opens_a_sydent_database(tmp_path: Path) -> None:
    sydent_db = tmp_path / "sydent.db"
    make_sydent_db(sydent_db, 0)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="is Sydent's database"):
        await Store.open(DbConfig(file=str(sydent_db)))
    assert snapshot(tmp_path) == before


@pytest.mark.postgres
async def test_a_newer_kith_schema_on_postgresql_is_refused(postgresql_url: str) -> None:
    store = await Store.open(DbConfig(url=postgresql_url))
    try:
        async with store.db.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await store.close()
    with pytest.raises(StoreError, match=r"newer schema \(revision 9999\)"):
        await Store.open(DbConfig(url=postgresql_url))


def test_with_option_edits_one_line_and_keeps_the_rest() -> None:
    text = "# top\r\n[db]\r\n; old\r\nDB.File = a.db\r\n  continued\r\n[http]\r\nx = 1\r\n"
    assert with_option(text, "db", "db.file", "b.db", ["why", ""]) == (
        "# top\r\n[db]\r\n; old\r\n# why\r\n#\r\ndb.file = b.db\r\n[http]\r\nx = 1\r\n")
    assert with_option("[db]\nother = 1\n", "db", "db.file", "b.db", ["why"]) == (
        "[db]\n# why\ndb.file = b.db\nother = 1\n")
    assert with_option("[general]\nx = 1", "db", "db.file", "b.db") == (
        "[general]\nx = 1\n\n[db]\ndb.file = b.db\n")
