"""A pytest plugin: no email address, phone number, token or secret the suite used may
appear in clear in any log kith wrote during the run, at any level.

Every record logged in the test process (in-process kith servers) goes, at DEBUG,
through kith's own log handler (kith.logs, as `kith serve` installs it) into one file;
every kith process a test starts logs to a file it registers here (`watch`).  The
fixtures that see secrets and addresses go by (the SMTP server's mail, the SMS stub, the
homeserver stub's tokens, registration, binds) `remember` them.  When the run ends,
every log is searched for every value, and a value found fails the run.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote

import pytest

from kith import logs

# The test's own stand-ins log what they receive, in this process: the SMTP server
# (aiosmtpd) and the aiohttp servers standing in for homeservers (kith's own listeners
# keep no access log).  Their lines are not kith's.
STAND_INS = ("mail.log", "aiohttp.access")

# Shorter values (a test's client secret "pending") are words a log says anyway.
MIN_LENGTH = 8

_remembered: dict[str, str] = {}
_watched: set[Path] = set()
_session_log: Path | None = None
_handler: logging.Handler | None = None
_leaks: list[str] = []


def remember(what: str, value: str) -> None:
    if len(value) >= MIN_LENGTH:
        _remembered.setdefault(value, what)


def watch(path: Path) -> None:
    _watched.add(path.resolve())


def remember_mail(recipients: list[str], text: str) -> None:
    """The recipients, and every token and secret of the links in a mail."""
    for address in recipients:
        remember("email address", address)
    plain = unquote(unquote(text.replace("=\r\n", "").replace("=3D", "=")))
    for what, pattern in (("validation token", r"[?&]token=([A-Za-z0-9]+)"),
                          ("client secret", r"[?&]client_secret=([^&\s\"<]+)"),
                          ("invite token", r"[?&]token=([A-Za-z]{128})"),
                          ("ephemeral private key", r"[?&]private_key=([A-Za-z0-9_-]{43})")):
        for value in re.findall(pattern, plain):
            remember(what, value)


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session_log, _handler
    _session_log = Path(tempfile.mkdtemp(prefix="kith-test-logs-")) / "in-process.log"
    _handler = logs.make_handler(str(_session_log), "text",
                                 logs.redactor_for("ed25519 0 test-run"))
    _handler.setLevel(logging.DEBUG)
    _handler.addFilter(lambda record: not record.name.startswith(STAND_INS))
    root = logging.getLogger()
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG)
    logs.quiet_libraries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler.close()
    files = [p for p in [_session_log, *sorted(_watched)] if p is not None and p.exists()]
    patterns = [(what, value, re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}"
                                         rf"(?![0-9A-Za-z])", re.IGNORECASE))
                for value, what in _remembered.items()]
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        folded = text.lower()
        for what, value, pattern in patterns:
            if value.lower() not in folded:  # the cheap test first: most never appear
                continue
            match = pattern.search(text)
            if match:
                line = text[text.rfind("\n", 0, match.start()) + 1:
                            text.find("\n", match.end())]
                _leaks.append(f"{what} {value!r} in {path}: {line[:300]}")
    session.config.stash[_SUMMARY] = (f"log audit: {len(_remembered)} addresses, tokens "
                                      f"and secrets searched in {len(files)} log files: "
                                      f"{len(_leaks)} found")
    if _leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif _session_log is not None:
        shutil.rmtree(_session_log.parent, ignore_errors=True)


_SUMMARY = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    summary = terminalreporter.config.stash.get(_SUMMARY, None)
    if summary is None:
        return
    terminalreporter.write_line(summary, red=bool(_leaks))
    for leak in _leaks[:50]:
        terminalreporter.write_line(f"  {leak}", red=True)
