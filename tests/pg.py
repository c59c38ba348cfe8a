"""A throwaway PostgreSQL cluster for tests (a pytest plugin).

`postgresql_server` (session) runs `initdb` into a temporary directory and starts the
server with `pg_ctl` on 127.0.0.1 and a free port, fsync off; it is stopped by PID at
the end of the session.  `postgresql_url` (per test) creates a fresh database on it and
drops it afterwards, so tests never see each other's rows.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user
when there is one, else to a `kith-test` system user created for it.

Without PostgreSQL binaries the tests that need them are skipped, except under CI
(`CI=true`), where they fail: a missing install must not pass as a green run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

SUPERUSER = "kith"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# Stops the cluster if the test process dies without tearing down (SIGKILL, a timeout):
# waits for pid $1 to go, then fast-shuts-down postmaster $2 and removes directory $3.
WATCHDOG = """
while kill -0 "$1" 2>/dev/null; do sleep 1; done
kill -INT "$2" 2>/dev/null
i=0
while kill -0 "$2" 2>/dev/null && [ "$i" -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
kill -QUIT "$2" 2>/dev/null
rm -rf "$3"
"""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl, postgres and psql, if any."""
    candidates: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        candidates.append(out)
    # Newest major version first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(os.path.realpath(initdb)).parent))
    for directory in candidates:
        path = Path(directory)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return path
    return None


def _run_as_user() -> str | None:
    """The user owning the cluster when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "kith-test"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "kith-test"], check=True)
    return "kith-test"


@dataclass
class PostgresCluster:
    """One running postmaster owned by this test session."""

    bindir: Path
    datadir: Path
    user: str | None
    port: int = 0
    pid: int = 0
    watchdog: subprocess.Popen[bytes] | None = None

    def _cmd(self, *argv: str) -> list[str]:
        return (["runuser", "-u", self.user, "--"] if self.user else []) + list(argv)

    def start(self) -> None:
        if self.user:
            os.chown(self.datadir, pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid)
        pgdata = self.datadir / "data"
        subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(pgdata), "-U", SUPERUSER,
                                 "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        for attempt in range(5):
            self.port = free_port()
            started = self._pg_ctl_start()
            if started.returncode == 0:
                break
            if attempt == 4:
                raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n"
                                   f"{self.log_tail()}")
        self._watch()

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.datadir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        return subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "data"),
                      "-l", str(self.datadir / "postgres.log"), "-o", options,
                      "-w", "-t", str(START_TIMEOUT_S), "start"),
            capture_output=True, text=True, timeout=START_TIMEOUT_S + 30)

    def _watch(self) -> None:
        """Read the postmaster's PID and watch it (see WATCHDOG)."""
        self.pid = int((self.datadir / "data" / "postmaster.pid").read_text().split()[0])
        self.watchdog = subprocess.Popen(
            ["sh", "-c", WATCHDOG, "kith-pg-watchdog", str(os.getpid()), str(self.pid),
             str(self.datadir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.datadir / "postgres.log").read_text()[-2000:]
        return ""

    def halt(self) -> None:
        """Fast shutdown of our postmaster (by PID), keeping its data: clients see their
        connections closed and new ones refused until `resume`."""
        self._unwatch()
        self._shut_down()

    def resume(self) -> None:
        """Start the halted server again, on the same port."""
        started = self._pg_ctl_start()
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n"
                               f"{self.log_tail()}")
        self._watch()

    def _unwatch(self) -> None:
        if self.watchdog is not None:
            self.watchdog.terminate()
            self.watchdog.wait(timeout=10)
            self.watchdog = None

    def stop(self) -> None:
        """Fast shutdown of our postmaster (by PID), then remove the cluster."""
        self._unwatch()
        self._shut_down()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def _shut_down(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGQUIT)
            self.pid = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> None:
        subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER,
                        "-d", "postgres", "-c", sql],
                       check=True, capture_output=True, timeout=60)


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run in CI, not be skipped)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole session (skipped locally if not installed)."""
    yield from _cluster()


@pytest.fixture
def own_postgresql_server() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for one test, which may `halt` and `resume` it."""
    yield from _cluster()


def _cluster() -> Iterator[PostgresCluster]:
    bindir = find_bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries not found (pg_config --bindir, "
                     "/usr/lib/postgresql/*/bin, PATH); apt-get install postgresql")
    assert bindir is not None
    datadir = Path(tempfile.mkdtemp(prefix="kith-pg-"))
    cluster = PostgresCluster(bindir=bindir, datadir=datadir, user=_run_as_user())
    try:
        cluster.start()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        cluster.stop()
        detail = getattr(exc, "stderr", None) or ""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        pytest.fail(f"could not start PostgreSQL from {bindir}: {exc} {detail}".strip(),
                    pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgresql_url(postgresql_server: PostgresCluster) -> Iterator[str]:
    """postgresql://kith@127.0.0.1:PORT/<fresh database>, dropped after the test."""
    name = "kith_test_" + secrets.token_hex(6)
    postgresql_server.psql(f'CREATE DATABASE "{name}"')
    try:
        yield postgresql_server.url(name)
    finally:
        postgresql_server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
