"""Taking over a real Sydent 2.6.1 installation: with `kith import-sydent`, and by
starting kith on Sydent's own sydent.conf.

Sydent (matrix-sydent 2.6.1 from PyPI, in its own venv) runs on loopback with its own
generated config; real data is made through its API; it is stopped; kith imports the
installation, or is simply started on Sydent's sydent.conf; then the same keys and
lookups must answer as before, and Sydent's database must be untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kith.threepid import lookup_hash
from tests.conftest import Homeserver, KithProcessFactory, SmtpSink, free_port
from tests.conftest import wait_for as wait_for_condition
from tests.federation.conftest import TestPki

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


def http(method: str, url: str, body: object | None = None,
         token: str | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
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
    sydent_python()  # skipped at once without the Sydent venv
    port, internal = free_port(), free_port()
    (tmp_path / "res" / "matrix-org").mkdir(parents=True)
    (tmp_path / "res" / "matrix-org" / "verification_template.eml").write_text(VERIFICATION)
    (tmp_path / "res" / "matrix-org" / "invite_template.eml").write_text(INVITE)
    with running_sydent(tmp_path, "sydent.test", port, internal, smtp_port=smtp.port,
                        http_keys="# The test's homeserver has a certificate from a "
                                  "throwaway CA.\nfederation.verifycerts = False\n"):
        yield tmp_path, port, internal


@contextlib.contextmanager
def running_sydent(directory: Path, server_name: str, port: int, internal: int, *,
                   smtp_port: int = 9, http_keys: str = "",
                   sections: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """Sydent 2.6.1 on loopback in `directory`, with its own sydent.conf (plus
    `http_keys` in [http] and further `sections`), until the block ends."""
    (directory / "sydent.conf").write_text(f"""[general]
server.name = {server_name}
pidfile.path = {directory}/sydent.pid
ip.whitelist = 127.0.0.1

[db]
db.file = sydent.db

[http]
clientapi.http.bind_address = 127.0.0.1
clientapi.http.port = {port}
internalapi.http.bind_address = 127.0.0.1
internalapi.http.port = {internal}
{http_keys}
{sections}
[email]
email.smtphost = 127.0.0.1
email.smtpport = {smtp_port}

[crypto]
""")
    log = open(directory / "sydent.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sydent_python(), "-m", "sydent.sydent"], cwd=directory,
                            stdout=log, stderr=log,
                            env={**os.environ, "SYDENT_CONF": str(directory / "sydent.conf")})
    try:
        wait_for(f"http://127.0.0.1:{port}/_matrix/identity/versions", proc, "Sydent")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


async def test_kith_takes_over_a_sydent_installation(sydent_dir: tuple[Path, int, int],
                                               smtp: SmtpSink, homeserver: Homeserver,
                                               kith_process: KithProcessFactory) -> None:
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
    # Sydent answers lookups from its global table, which it fills from the local one in
    # the background: once the lookup answers, the binding is in both.
    deadline = time.monotonic() + 30
    while not (sydent_lookup := http(
            "GET", f"{v1}/lookup?medium=email&address=alice@example.com")).get("mxid"):
        assert time.monotonic() < deadline, "Sydent's lookup never found alice"
        time.sleep(0.1)
    assert sydent_lookup["mxid"] == "@alice:hs.test"

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


TOOK_OVER = "took over Sydent's database"


@contextlib.asynccontextmanager
async def tls_homeserver(pki: TestPki) -> AsyncIterator[Homeserver]:
    """The homeserver stand-in as `127.0.0.1:<port>` over TLS, as Sydent reaches a
    homeserver (`matrix://`, no discovery for an IP literal with a port)."""
    port = free_port()
    hs = Homeserver(server_name=f"127.0.0.1:{port}", url=f"https://127.0.0.1:{port}")
    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", hs.userinfo)
    app.router.add_post("/_matrix/federation/v1/3pid/onbind", hs.onbind)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=pki.server_context()).start()
    try:
        yield hs
    finally:
        await runner.cleanup()


def stop_by_pidfile(pidfile: Path) -> None:
    """SIGTERM the process named in `pidfile` (a child of this one), and wait for it."""
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop")
        time.sleep(0.05)


def files(directory: Path) -> dict[str, str]:
    return {p.name: "dir" if p.is_dir() else digest(p) for p in directory.iterdir()}


def counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("threepid_associations", "accounts", "account_tokens",
                              "invite_tokens", "ephemeral_public_keys",
                              "threepid_validation_sessions")}


def start_kith(conf: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    """`python -m kith --config <Sydent's sydent.conf>`, run where Sydent ran."""
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kith", "--config", str(conf)],
                                cwd=conf.parent, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for(f"http://127.0.0.1:{port}/_matrix/identity/versions", proc, "kith")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def test_kith_started_on_sydent_conf_takes_the_installation_over(
        sydent_dir: tuple[Path, int, int], smtp: SmtpSink, pki: TestPki,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    directory, port, internal = sydent_dir
    base, ibase = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{internal}"
    v1, v2 = f"{base}/_matrix/identity/api/v1", f"{base}/_matrix/identity/v2"
    logs = tmp_path_factory.mktemp("kith-logs")  # kith's stderr, away from Sydent's files
    async with tls_homeserver(pki) as hs:
        # Real data, made through Sydent's API: a binding, an account, an invite.
        http("POST", f"{ibase}/_matrix/identity/internal/bind", {
            "medium": "email", "address": "alice@example.com", "mxid": "@alice:hs.test"})
        registered = await asyncio.to_thread(http, "POST", f"{v2}/account/register", {
            "access_token": hs.issue("bob"), "token_type": "Bearer",
            "matrix_server_name": hs.server_name, "expires_in": 3600})
        token = registered["token"]
        pepper = http("GET", f"{v2}/hash_details", token=token)["lookup_pepper"]
        alice_hash = lookup_hash("email", "alice@example.com", pepper)
        sydent_mappings = http("POST", f"{v2}/lookup", {
            "algorithm": "sha256", "pepper": pepper, "addresses": [alice_hash]},
            token=token)["mappings"]
        assert sydent_mappings == {alice_hash: "@alice:hs.test"}
        invite = http("POST", f"{v2}/store-invite", {
            "medium": "email", "address": "dave@example.com", "room_id": "!room:hs.test",
            "sender": f"@bob:{hs.server_name}"}, token=token)
        ephemeral_key = invite["public_keys"][1]["public_key"]
        sydent_key = http("GET", f"{v2}/pubkey/ed25519:0")["public_key"]
        sydent_lookup = http("GET", f"{v1}/lookup?medium=email&address=alice@example.com")

        stop_by_pidfile(directory / "sydent.pid")
        conf, sydent_db = directory / "sydent.conf", directory / "sydent.db"
        before, conf_before = files(directory), conf.read_text()

        # Started on Sydent's own configuration, kith takes the installation over.
        proc = start_kith(conf, logs / "first.log", port)
        try:
            after = files(directory)
            assert after["sydent.db"] == before["sydent.db"]  # byte for byte
            new = set(after) - set(before)
            assert "kith.db" in new and new <= {"kith.db", "kith.db-wal", "kith.db-shm"}
            assert {name for name in before if after[name] != before[name]} <= {
                "sydent.conf", "sydent.pid"}  # and the pid file is kith's to write
            assert http("GET", f"{v2}/pubkey/ed25519:0")["public_key"] == sydent_key
            assert http("GET", f"{v1}/lookup?medium=email&address=alice@example.com")[
                "signatures"] == sydent_lookup["signatures"]
            # Sydent's access token, pepper and hashes still work.
            assert http("GET", f"{v2}/account", token=token) == {
                "user_id": f"@bob:{hs.server_name}"}
            assert http("GET", f"{v2}/hash_details", token=token)["lookup_pepper"] == pepper
            assert http("POST", f"{v2}/lookup", {
                "algorithm": "sha256", "pepper": pepper, "addresses": [alice_hash]},
                token=token)["mappings"] == sydent_mappings
            # Sydent's invite: its key checks out, and a bind delivers it to the homeserver.
            assert http("GET", f"{v1}/pubkey/ephemeral/isvalid?public_key={ephemeral_key}") \
                == {"valid": True}
            dave = f"@dave:{hs.server_name}"
            bound = await asyncio.to_thread(
                http, "POST", f"{ibase}/_matrix/identity/internal/bind",
                {"medium": "email", "address": "dave@example.com", "mxid": dave})
            assert [i["token"] for i in bound["invites"]] == [invite["token"]]
            await wait_for_condition("the onbind", lambda: hs.onbinds, timeout_s=30)
            assert [i["token"] for i in hs.onbinds[0]["invites"]] == [invite["token"]]
        finally:
            stop(proc)

        # The configuration now names kith's database, saying why; all else is as it was.
        lines = conf.read_text().splitlines()
        at = lines.index("db.file = kith.db")
        assert lines[at - 2].startswith("# kith took over Sydent's database sydent.db on ")
        assert lines[at - 1] == ("# kith.db and left sydent.db unchanged (kith does not use "
                                 "it any more).")
        assert lines[:at - 2] + ["db.file = sydent.db"] + lines[at + 1:] == \
            conf_before.splitlines()
        first_log = (logs / "first.log").read_text()
        assert first_log.count(TOOK_OVER) == 1, first_log
        assert f"{TOOK_OVER} {sydent_db}: imported it into {directory / 'kith.db'}" in first_log
        taken = counts(directory / "kith.db")
        assert taken["threepid_associations"] == 2 and taken["accounts"] == 1
        conf_taken, files_taken = conf.read_text(), files(directory)

        # A second start is a normal one: nothing imported again.
        proc = start_kith(conf, logs / "second.log", port)
        try:
            assert http("GET", f"{v2}/account", token=token)["user_id"] == f"@bob:{hs.server_name}"
        finally:
            stop(proc)
        assert TOOK_OVER not in (logs / "second.log").read_text()
        assert conf.read_text() == conf_taken
        assert counts(directory / "kith.db") == taken
        again = files(directory)
        assert again["sydent.db"] == before["sydent.db"]
        assert set(again) - {"kith.db-wal", "kith.db-shm"} == \
            set(files_taken) - {"kith.db-wal", "kith.db-shm"}
