"""kith's log: Sydent's log.path and log.level, SIGHUP for logrotate, midnight rotation
shared by workers, JSON lines, and addresses that never appear in clear."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import aiohttp

from kith.config import load_config
from kith.logs import JsonFormatter, SharedRotatingFileHandler, make_handler, redactor_for
from tests.conftest import KithProcessFactory, wait_for, write_config

KEY = "ed25519 0 " + "A" * 43


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@contextmanager
def logging_to(path: Path, name: str) -> Iterator[logging.Logger]:
    """A logger that writes only to kith's text handler at `path`, for the test."""
    handler = make_handler(str(path), "text", redactor_for(KEY))
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        handler.close()


def test_addresses_are_hashed_the_same_way_every_time(tmp_path: Path) -> None:
    path = tmp_path / "kith.log"
    with logging_to(path, "kith.test.redaction") as log:
        log.warning("mail to %s failed", "Alice.Smith@Example.org")
        log.warning("again: alice.smith@example.org; SMS to +447700900123 and 14155550100")
        log.warning("sid 6916299466410583327 of @alice:hs.test on port 8090 at 12:00:01")
        try:
            raise ValueError("bad address jöran@exämple.org")
        except ValueError:
            log.exception("failed")
    text = path.read_text(encoding="utf-8")
    for clear in ("alice.smith", "Alice.Smith", "447700900123", "14155550100", "jöran"):
        assert clear.casefold() not in text.casefold(), text
    first, second, third = text.splitlines()[:3]
    alice = re.findall(r"<email:[0-9a-f]{8}>", first)
    assert len(alice) == 1 and alice == re.findall(r"<email:[0-9a-f]{8}>", second)
    assert len(re.findall(r"<msisdn:[0-9a-f]{8}>", second)) == 2
    # What is not an address stays readable.
    assert third.endswith("sid 6916299466410583327 of @alice:hs.test on port 8090 at 12:00:01")
    # Another server's key hashes differently: the hash says nothing without the key.
    assert redactor_for(KEY)("a@b.org") != redactor_for("ed25519 0 " + "B" * 43)("a@b.org")


def test_json_lines_for_log_shippers() -> None:
    formatter = JsonFormatter(redactor_for(KEY))
    record = logging.LogRecord("kith.x", logging.INFO, __file__, 1, "bound %s", ("a@b.org",),
                               None)
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "kith.x"
    assert re.fullmatch(r"bound <email:[0-9a-f]{8}>", entry["message"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["pid"] == os.getpid()


def test_two_processes_rotate_at_midnight_once(tmp_path: Path) -> None:
    """Two handlers on one file, as two workers have: the first past midnight rotates,
    the second finds the file moved and follows it, rotating nothing again."""
    path = tmp_path / "kith.log"
    first, second = SharedRotatingFileHandler(str(path)), SharedRotatingFileHandler(str(path))
    for handler in (first, second):
        handler.setFormatter(logging.Formatter("%(message)s"))

    def emit(handler: logging.Handler, message: str) -> None:
        handler.handle(logging.LogRecord("kith", logging.INFO, __file__, 1, message, None,
                                         None))
    try:
        emit(first, "before midnight (1)")
        emit(second, "before midnight (2)")
        first.rolloverAt = second.rolloverAt = int(time.time()) - 1
        emit(first, "after midnight (1)")
        emit(second, "after midnight (2)")
    finally:
        first.close()
        second.close()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "kith.log")
    assert len(rotated) == 1 and rotated[0].startswith("kith.log.")
    assert lines_of(tmp_path / rotated[0]) == ["before midnight (1)", "before midnight (2)"]
    assert lines_of(path) == ["after midnight (1)", "after midnight (2)"]


async def test_sighup_reopens_the_log_of_every_worker(
        tmp_path: Path, kith_process: KithProcessFactory) -> None:
    """logrotate moves the file away and sends SIGHUP (systemctl reload): the parent and
    both workers write to a new file at the same path."""
    log_path = tmp_path / "logs" / "kith.log"
    log_path.parent.mkdir()
    path = write_config(tmp_path, {"general": {
        "workers": 2, "log.path": log_path, "log.level": "INFO"}})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    proc.start(config.http.client_port)
    await wait_for("kith started", lambda: sum("kith started" in line
                                              for line in lines_of(log_path)) == 2)
    log_path.rename(log_path.with_suffix(".log.1"))
    proc.signal(signal.SIGHUP)
    await wait_for("three processes to reopen the log", lambda: sum(
        "log file reopened" in line for line in lines_of(log_path)) == 3)
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{config.http.client_port}/_matrix/identity/v2") as resp:
        assert resp.status == 200
    old = lines_of(log_path.with_suffix(".log.1"))
    assert sum("kith started" in line for line in old) == 2
    assert not any("reopened" in line for line in old)


def test_numbers_stay_readable_and_text_arguments_are_redacted(tmp_path: Path) -> None:
    path = tmp_path / "kith.log"
    with logging_to(path, "kith.test.numbers") as log:
        log.info("kith started: %d bindings, %s sessions", 10_000_000, 12_345_678)
        log.info("sent a text to %s and %r", "447700900123", "+14155550100")
        log.info("lookup of %(address)s took %(ms).1f ms", {"address": "a@b.org", "ms": 2.5})
        # a number of another type, which %d takes and the redaction does not: all redacted
        log.info("%d is a number", Decimal(447700900123))
    started, texted, mapped, other = lines_of(path)
    assert started.endswith("kith started: 10000000 bindings, 12345678 sessions")
    assert re.search(r"sent a text to <msisdn:[0-9a-f]{8}> and '<msisdn:[0-9a-f]{8}>'$",
                     texted), texted
    assert re.search(r"lookup of <email:[0-9a-f]{8}> took 2.5 ms$", mapped), mapped
    assert "447700900123" not in other and "<msisdn:" in other
