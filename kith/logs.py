"""kith's log: where it goes, how it rotates, and what it must never say.

- `log.path` (Sydent's): a file rotated at midnight, 365 kept; empty: stderr.  Several
  workers write the same file: the first to pass midnight rotates it, the others notice
  the file was moved and reopen it.  A file moved away by logrotate is noticed the same
  way, and SIGHUP (`systemctl reload`) reopens it at once.
- `log.format = json` (kith's): one JSON object a line, for log shippers.
- Email addresses and phone numbers never appear in clear, at any level and from any
  library: each is replaced by a short keyed hash (`<email:3f9a12c0>`), the same for the
  same address in every line, worker and restart, so lines about one person can still
  be told apart and grepped for, while the log alone does not say who it is.  Tokens,
  secrets and passwords are never passed to the log at all (docs/decisions.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

# Libraries that log what kith's store sends (SQL parameters: client secrets, tokens)
# below this level: they are held at it, whatever `log.level` says.
QUIET_LOGGERS = {"aiosqlite": logging.INFO, "sqlalchemy.engine": logging.WARNING}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
KEEP_DAYS = 365

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
                    r"@[A-Za-z0-9\u0080-\U0010ffff-]+(?:\.[A-Za-z0-9\u0080-\U0010ffff-]+)+")
# E.164 numbers (kith stores them as 8-15 digits, without '+'), alone or with a '+'.
_PHONE = re.compile(r"(?<![\w.:/-])\+?[1-9][0-9]{7,14}(?![\w.:/-])")


class Redactor:
    """Replaces email addresses and phone numbers in text by keyed hashes."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _hash(self, medium: str, value: str) -> str:
        digest = hmac.new(self._key, f"{medium}:{value.casefold()}".encode(),
                          hashlib.sha256).hexdigest()
        return f"<{medium}:{digest[:8]}>"

    def __call__(self, text: str) -> str:
        if "@" in text:
            text = _EMAIL.sub(lambda m: self._hash("email", m.group(0)), text)
        return _PHONE.sub(lambda m: self._hash("msisdn", m.group(0).lstrip("+")), text)

    def message(self, record: logging.LogRecord) -> str:
        """The record's message, its text and text arguments redacted, its numbers left
        alone: a count of 10000000 is not a phone number, a string of digits may be."""
        args = record.args
        if not args:
            return self(str(record.msg))
        try:
            if isinstance(args, Mapping):
                return self(str(record.msg)) % {k: self._arg(v) for k, v in args.items()}
            return self(str(record.msg)) % tuple(self._arg(a) for a in args)
        except (TypeError, ValueError, KeyError):  # e.g. %d given a text: redact it all
            return self(record.getMessage())

    def _arg(self, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        return _Redacted(self(str(value)), self(repr(value)))


class _Redacted:
    """A log argument as its redacted text, for %s and %r alike."""

    __slots__ = ("_repr", "_str")

    def __init__(self, text: str, representation: str) -> None:
        self._str, self._repr = text, representation

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return self._repr


def redactor_for(signing_key: str) -> Redactor:
    """A redactor keyed by this server's signing key: stable across workers and
    restarts, and not reproducible by someone who has only the log."""
    return Redactor(hashlib.sha256(b"kith log redaction\0" + signing_key.encode()).digest())


class RedactingFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__(TEXT_FORMAT)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        # Another handler may have cached the traceback's text unredacted on the record.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the library's
        record.message = self.redact.message(record)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - the library's name
        return self.redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - the library's name
        return self.redact(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, pid and,
    for an exception, its traceback."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name,
            "message": self.redact.message(record), "pid": record.process}
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class SharedRotatingFileHandler(logging.handlers.TimedRotatingFileHandler):
    """Midnight rotation that several processes can share, and that follows a file
    moved away by someone else (another worker, logrotate)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, when="midnight", backupCount=KEEP_DAYS, encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        if self._moved():
            self._follow()
        super().emit(record)

    def _follow(self) -> None:
        """The file was rotated by another process (or logrotate): write to the new one,
        and rotate next at the next midnight, not again now."""
        self.reopen()
        self.rolloverAt = self.computeRollover(int(time.time()))

    def _moved(self) -> bool:
        if self.stream is None:
            return False
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        opened = os.fstat(self.stream.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (opened.st_dev, opened.st_ino)

    def reopen(self) -> None:
        """Close the file and open the one now at the path (SIGHUP, or moved away)."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()

    def doRollover(self) -> None:  # noqa: N802 - the library's name
        # One process rotates; the others, waiting on the lock, find the file moved.
        if self.stream is None:
            super().doRollover()
            return
        fcntl.flock(self.stream.fileno(), fcntl.LOCK_EX)
        if self._moved():
            fcntl.flock(self.stream.fileno(), fcntl.LOCK_UN)
            self._follow()
            return
        try:
            super().doRollover()  # closes the old stream, which drops the lock
        except FileNotFoundError:
            self.reopen()


_handler: logging.Handler | None = None


def make_handler(path: str, log_format: str, redact: Redactor) -> logging.Handler:
    handler: logging.Handler = (SharedRotatingFileHandler(path) if path
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter(redact) if log_format == "json"
                         else RedactingFormatter(redact))
    return handler


def setup(path: str, level: str, log_format: str, signing_key: str) -> None:
    """Send every logger's records through one redacting handler."""
    global _handler
    _handler = make_handler(path, log_format, redactor_for(signing_key))
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def reopen() -> None:
    """SIGHUP: open the log file again (after logrotate moved it)."""
    if isinstance(_handler, SharedRotatingFileHandler):
        _handler.reopen()
        logging.getLogger(__name__).info("log file reopened")
