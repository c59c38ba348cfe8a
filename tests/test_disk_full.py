"""A full disk: writes answer a clear Matrix error (503, not a bare 500), reads go on,
and writes work again once there is room.

The database lives on a 4 MB tmpfs that a ballast file fills.  Mounting needs root
(CAP_SYS_ADMIN); elsewhere the test is skipped, saying so.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy.exc

from kith.store import is_storage_full
from tests.api.test_validation import request_email
from tests.conftest import KithFactory, SmtpSink

V1 = "/_matrix/identity/api/v1"


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True, timeout=30)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem with one file; answers its path."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return ballast


async def test_a_full_disk_refuses_writes_clearly_keeps_reads_and_recovers(
        small_filesystem: Path, kith_factory: KithFactory, smtp: SmtpSink) -> None:
    # (small_filesystem first: it is unmounted after kith has stopped.)
    kith = await kith_factory({
        "db": {"db.file": small_filesystem / "kith.db"},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}})
    token = await kith.register("alice")
    await kith.bind("before@example.com", "@before:hs.test")
    assert (await request_email(kith, token, email="first@example.com"))[0] == 200

    ballast = fill(small_filesystem)
    status, body = await request_email(kith, token, email="second@example.com", secret="s2")
    assert status == 503, body
    assert body == {"errcode": "M_UNKNOWN", "error": "The server cannot store anything "
                    "now: its storage is full. Try again later."}
    assert len(smtp.messages) == 1  # nothing mailed for a session that is not stored
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/bind", json={
            "medium": "email", "address": "during@example.com",
            "mxid": "@during:hs.test"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["errcode"] == "M_UNKNOWN"
    # Reads are answered as before.
    assert await kith.lookup(token, "none", ["before@example.com email"]) == {
        "before@example.com email": "@before:hs.test"}
    async with kith.http.get(f"{kith.base}{V1}/lookup", params={
            "medium": "email", "address": "before@example.com"}) as resp:
        assert resp.status == 200 and (await resp.json())["mxid"] == "@before:hs.test"
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/account",
                             headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200

    ballast.unlink()
    status, body = await request_email(kith, token, email="second@example.com", secret="s2")
    assert status == 200, body
    assert len(smtp.messages) == 2
    await kith.bind("after@example.com", "@after:hs.test")
    assert await kith.lookup(token, "none", ["after@example.com email"]) == {
        "after@example.com email": "@after:hs.test"}


def test_full_storage_is_recognised_on_each_backend() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert is_storage_full(sqlalchemy.exc.OperationalError("INSERT", {}, full))
    assert is_storage_full(sqlalchemy.exc.OperationalError(
        "INSERT", {}, asyncpg.exceptions.DiskFullError("could not extend file")))
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert not is_storage_full(sqlalchemy.exc.OperationalError("INSERT", {}, locked))
    assert not is_storage_full(asyncpg.exceptions.UniqueViolationError("duplicate"))
    assert not is_storage_full(ValueError("no"))
