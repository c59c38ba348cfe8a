"""Taking over a real Sydent 2.6.1 installation with `kith import-sydent`.

Sydent (matrix-sydent 2.6.1 from PyPI, in its own venv) runs on loopback with its own
generated config; real data is made through its API; it is stopped; kith imports the
installation and is started on the same sydent.conf; then the same keys and lookups must
answer as before.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from kith.services.threepid import lookup_hash
from tests.conftest import Homeserver, SmtpSink, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

# Sydent's wheel ships no templates (they live in its source tree): minimal ones, in
# Sydent's %-format, so that it can send its mails to the test's SMTP server.
VERIFICATION = """\
Date: %(date)s
From: %(from)s
To: %(to)s
Message-ID: %(messageid)s
Subject: Your code
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8

token=%(token)s link=%(link)s
"""
INVITE = """\
Date: %(date)s
From: %(from)s
To: %(to)s
Message-ID: %(messageid)s
Subject: You are invited
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8

invite=%(token)s key=%(ephemeral_private_key)s
"""


def sydent_python() -> str:
    """The interpreter of a venv holding matrix-sydent 2.6.1 (`make install-sydent`)."""
    python = os.environ.get("KITH_SYDENT_PYTHON") or str(ROOT / ".venv-sydent/bin/python")
    if not Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Sydent venv at {python}: `make test` builds it")
        pytest.skip(f"no Sydent venv at {python} (make install-sydent)")
    return python


def http(method: str, url: str, body: object | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as resp:  # noqa: S310 - loopback
        return dict(json.loads(resp.read()))


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()  # noqa: S310 - loopback
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not answer {url}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sydent_dir(tmp_path: Path, smtp: SmtpSink) -> Iterator[tuple[Path, int, int]]:
    python = sydent_python()
    port, internal = free_port(), free_port()
    (tmp_path / "res" / "matrix-org").mkdir(parents=True)
    (tmp_path / "res" / "matrix-org" / "verification_template.eml").write_text(VERIFICATION)
    (tmp_path / "res" / "matrix-org" / "invite_template.eml").write_text(INVITE)
    (tmp_path / "sydent.conf").write_text(f"""[general]
server.name = sydent.test
pidfile.path = {tmp_path}/sydent.pid
ip.whitelist = 127.0.0.1

[db]
db.file = sydent.db

[http]
clientapi.http.bind_address = 127.0.0.1
clientapi.http.port = {port}
internalapi.http.bind_address = 127.0.0.1
internalapi.http.port = {internal}

[email]
email.smtphost = 127.0.0.1
email.smtpport = {smtp.port}

[crypto]
""")
    log = open(tmp_path / "sydent.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([python, "-m", "sydent.sydent"], cwd=tmp_path, stdout=log,
                            stderr=log, env={**os.environ,
                                             "SYDENT_CONF": str(tmp_path / "sydent.conf")})
    try:
        wait_for(f"http://127.0.0.1:{port}/_matrix/identity/versions", proc, "Sydent")
        yield tmp_path, port, internal
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


async def test_kith_takes_over_a_sydent_installation(sydent_dir: tuple[Path, int, int],
                                               smtp: SmtpSink, homeserver: Homeserver,
                                               kith_process) -> None:
    directory, port, internal = sydent_dir
    base, ibase = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{internal}"
    v1 = f"{base}/_matrix/identity/api/v1"
    # Real data, made through Sydent's own API.
    for i in range(5):
        http("POST", f"{ibase}/_matrix/identity/internal/bind", {
            "medium": "email", "address": f"user{i}@example.com", "mxid": f"@user{i}:hs.test"})
    http("POST", f"{ibase}/_matrix/identity/internal/bind", {
        "medium": "msisdn", "address": "447700900123", "mxid": "@phone:hs.test"})
    sid = http("POST", f"{v1}/validate/email/requestToken", {
        "email": "alice@example.com", "client_secret": "s3cret", "send_attempt": 1})["sid"]
    token = re.search(r"token=([A-Za-z0-9]+)", smtp.messages[-1][1])
    assert token
    http("POST", f"{v1}/validate/email/submitToken",
         {"sid": sid, "client_secret": "s3cret", "token": token.group(1)})
    http("POST", f"{v1}/3pid/bind", {"sid": sid, "client_secret": "s3cret",
                                     "mxid": "@alice:hs.test"})
    open_sid = http("POST", f"{v1}/validate/email/requestToken", {
        "email": "carol@example.com", "client_secret": "other", "send_attempt": 1})["sid"]
    carol_token = re.search(r"token=([A-Za-z0-9]+)", smtp.messages[-1][1])
    assert carol_token
    invite = http("POST", f"{v1}/store-invite", {
        "medium": "email", "address": "dave@example.com", "room_id": "!room:hs.test",
        "sender": "@alice:hs.test"})
    ephemeral_key = invite["public_keys"][1]["public_key"]
    assert http("GET", f"{v1}/pubkey/ephemeral/isvalid?public_key={ephemeral_key}") == {
        "valid": True}
    sydent_key = http("GET", f"{v1}/pubkey/ed25519:0")["public_key"]
    sydent_lookup = http("GET", f"{v1}/lookup?medium=email&address=alice@example.com")
    assert sydent_lookup["mxid"] == "@alice:hs.test"
    time.sleep(1)  # Sydent copies local bindings to its global table in the background

    # Stop Sydent; kith imports and starts on the same sydent.conf.
    sydent_pid = int((directory / "sydent.pid").read_text())
    os.kill(sydent_pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(sydent_pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    conf, db = directory / "sydent.conf", directory / "sydent.db"
    with sqlite3.connect(db) as conn:
        pepper = conn.execute("SELECT lookup_pepper FROM hashing_metadata").fetchone()[0]
    before = {p.name: digest(p) for p in (conf, db)}
    kith_db = directory / "kith.db"
    result = subprocess.run(
        [sys.executable, "-m", "kith", "--config", str(directory / "kith.conf"),
         "import-sydent", str(conf)], cwd=directory, capture_output=True, text=True,
        timeout=120, env={**os.environ, "SYDENT_DB_PATH": str(kith_db),
                          "SYDENT_SERVER_NAME": "sydent.test"})
    assert result.returncode == 0, result.stderr
    assert "associations: 7" in result.stdout
    assert "open validation sessions: 2" in result.stdout  # alice's and carol's
    assert {p.name: digest(p) for p in (conf, db)} == before  # Sydent's files untouched
    again = subprocess.run(
        [sys.executable, "-m", "kith", "--config", str(directory / "kith.conf"),
         "import-sydent", str(conf)], cwd=directory, capture_output=True, text=True,
        timeout=120)
    assert again.returncode == 0, again.stderr  # idempotent

    kith_conf = (directory / "kith.conf").read_text()
    kith_conf = re.sub(r"^clientapi.http.port = .*$", f"clientapi.http.port = {port}",
                       kith_conf, flags=re.MULTILINE)
    kith_conf = re.sub(r"^clientapi.http.bind_address = .*$",
                       "clientapi.http.bind_address = 127.0.0.1", kith_conf, flags=re.MULTILINE)
    kith_internal = free_port()
    kith_conf = re.sub(r"^internalapi.http.port =.*$", f"internalapi.http.port = {kith_internal}",
                       kith_conf, flags=re.MULTILINE)
    kith_conf = re.sub(r"^internalapi.http.bind_address =.*$",
                       "internalapi.http.bind_address = 127.0.0.1", kith_conf, flags=re.MULTILINE)
    kith_conf = re.sub(r"^#? ?ip.whitelist =.*$", "ip.whitelist = 127.0.0.1", kith_conf,
                       flags=re.MULTILINE)
    kith_conf = re.sub(r"^#? ?federation.test_overrides =.*$",
                       f"federation.test_overrides = hs.test={homeserver.url}", kith_conf,
                       flags=re.MULTILINE)
    (directory / "kith.conf").write_text(kith_conf)
    proc = kith_process(directory / "kith.conf")
    proc.start(port)
    try:
        assert http("GET", f"{v1}/pubkey/ed25519:0")["public_key"] == sydent_key
        kith_lookup = http("GET", f"{v1}/lookup?medium=email&address=alice@example.com")
        assert {k: kith_lookup[k] for k in ("address", "medium", "mxid", "ts")} == {
            k: sydent_lookup[k] for k in ("address", "medium", "mxid", "ts")}
        assert kith_lookup["signatures"]["sydent.test"]["ed25519:0"] == \
            sydent_lookup["signatures"]["sydent.test"]["ed25519:0"]
        found = http("POST", f"{v1}/bulk_lookup", {"threepids": [
            ["email", f"user{i}@example.com"] for i in range(5)] + [
            ["msisdn", "447700900123"]]})["threepids"]
        assert len(found) == 6
        # v2 with Sydent's pepper: clients' cached pepper stays valid.
        v2 = f"{base}/_matrix/identity/v2"
        # (in a thread: the homeserver stand-in answers kith from this test's event loop)
        access = (await asyncio.to_thread(http, "POST", f"{v2}/account/register", {
            "access_token": homeserver.issue("bob"), "matrix_server_name": "hs.test"}))["token"]
        assert http("GET", f"{v2}/hash_details?access_token={access}")["lookup_pepper"] == \
            pepper
        hashed = [lookup_hash("email", "alice@example.com", pepper),
                  lookup_hash("msisdn", "447700900123", pepper)]
        assert http("POST", f"{v2}/lookup?access_token={access}", {
            "algorithm": "sha256", "pepper": pepper, "addresses": hashed})["mappings"] == {
            hashed[0]: "@alice:hs.test", hashed[1]: "@phone:hs.test"}
        # Sydent's invite: its ephemeral key still checks out, and binding the invited
        # address delivers the invite to the invitee's homeserver.
        assert http("GET", f"{v1}/pubkey/ephemeral/isvalid?public_key={ephemeral_key}") == {
            "valid": True}
        bound = await asyncio.to_thread(
            http, "POST", f"http://127.0.0.1:{kith_internal}/_matrix/identity/internal/bind",
            {"medium": "email", "address": "dave@example.com", "mxid": "@dave:hs.test"})
        assert [i["token"] for i in bound["invites"]] == [invite["token"]]
        for _ in range(100):
            if homeserver.onbinds:
                break
            await asyncio.sleep(0.1)
        assert [i["token"] for i in homeserver.onbinds[0]["invites"]] == [invite["token"]]
        assert homeserver.onbinds[0]["invites"][0]["signed"]["mxid"] == "@dave:hs.test"
        # The session still open in Sydent is completed on kith with Sydent's mailed token.
        assert http("POST", f"{v1}/validate/email/submitToken", {
            "sid": open_sid, "client_secret": "other",
            "token": carol_token.group(1)}) == {"success": True}
    finally:
        proc.kill(signal.SIGTERM)
