"""The kith command: help, configuration errors, healthcheck, offline bind/unbind, onbind."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kith.cli import _status_lines
from kith.config import load_config
from kith.server import KithServer, ListenError
from kith.services.pepper import PepperRotation, rotate_when_due
from kith.services.status import ServerStatus
from kith.store import InviteTokenRow, Store
from tests.conftest import KithProcessFactory, free_port, write_config


def kith(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kith", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_help_explains_every_subcommand(tmp_path: Path) -> None:
    out = kith("--help", cwd=tmp_path).stdout
    for command in ("serve", "generate-config", "check-config", "healthcheck", "bind",
                    "unbind", "onbind", "peers", "import-sydent", "forget", "status"):
        assert command in out


def test_generate_config_writes_sydent_conf(tmp_path: Path) -> None:
    result = kith("generate-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "sydent.conf").read_text()
    assert "clientapi.http.port = 8090" in text
    assert "ed25519.signingkey = ed25519 0 " in text


def test_wrong_value_stops_with_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "sydent.conf").write_text("[http]\nclientapi.http.port = abc\n")
    result = kith("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kith:")]
    assert errors == ["kith: configuration error: [http] clientapi.http.port: "
                      "'abc' is not a port number (1-65535)"]


@pytest.mark.parametrize(("command", "sections", "error"), [
    ("check-config", {"ldap": {"base": "dc=x"}},
     "[ldap] uri: is required: base set without it"),
    ("serve", {"ldap": {"base": "dc=x"}}, "[ldap] uri: is required: base set without it"),
    ("check-config", {"ldap": {"uri": "ldap://127.0.0.1", "base": "dc=x",
                               "msisdn_default_region": "UK"}},
     "[ldap] msisdn_default_region: 'UK' is not an ISO 3166 alpha-2 region code with a "
     "telephone numbering plan (e.g. GB, US, DE)"),
    ("check-config", {"ldap": {"uri": "ldap://127.0.0.1", "base": "dc=x",
                               "bind_dn": "cn=kith"}},
     "[ldap] bind_dn: needs bind_pw, bind_pw_file or $KITH_LDAP_BIND_PW"),
    ("check-config", {"proxy": {"identity": "https://upstream.example", "mediums": "fax"}},
     "[proxy] mediums: 'fax' is not one of email, msisdn"),
    ("check-config", {"proxy": {"precedence": "ldap, local"}},
     "[proxy] precedence: must name ldap, local and upstream, each once"),
    ("check-config", {"peer.b.example": {"public_key": "ed25519:0 c2hvcnQ"}},
     "[peer.b.example] public_key: the key is not 32 bytes of base64 (or hex)"),
])
def test_bad_ldap_proxy_or_peer_section_is_one_line_naming_the_key(
        tmp_path: Path, command: str, sections: dict[str, dict[str, str]], error: str) -> None:
    path = write_config(tmp_path, sections)
    result = kith("--config", str(path), command, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kith:")]
    assert errors == [f"kith: configuration error: {error}"]


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_unusable_terms_file_is_one_line(tmp_path: Path, command: str) -> None:
    terms = tmp_path / "terms.yaml"
    terms.write_text("master_version: '1'\ndocs: [privacy]\n")
    path = write_config(tmp_path, {"general": {"terms.path": terms}})
    result = kith("--config", str(path), command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kith:")]
    assert errors == ["kith: configuration error: [general] terms.path: needs "
                      "`master_version` and a `docs` mapping"]


def test_check_config_accepts_ldap_and_proxy_and_lists_unknown_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "ldap": {"uri": "ldap://127.0.0.1", "base": "dc=x", "bind_dn": "cn=kith",
                 "msisdn_default_region": "GB", "colour": "blue"},
        "proxy": {"identity": "https://upstream.example", "precedence": "local, ldap, upstream"},
    })
    result = kith("--config", str(path), "check-config", cwd=tmp_path, KITH_LDAP_BIND_PW="pw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{path}: OK", "ignored: ldap.colour"]


def test_check_config_refuses_an_unusable_replication_certificate(tmp_path: Path) -> None:
    not_pem = tmp_path / "replication.pem"
    not_pem.write_text("not a certificate\n")
    path = write_config(tmp_path, {"http": {"replication.https.certfile": not_pem}})
    result = kith("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("kith:")]
    assert len(errors) == 1
    assert errors[0].startswith("kith: configuration error: [http] replication.https.certfile "
                                "/ cacert: not a usable PEM certificate and matching private key")


def test_port_in_use_is_one_clear_line(tmp_path: Path,
                                       kith_process: KithProcessFactory) -> None:
    path = write_config(tmp_path, {})
    config = load_config(str(path), env={})
    first = kith_process(path)
    first.start(config.http.client_port)
    try:
        other = tmp_path / "other"
        other.mkdir()
        second = write_config(other, {"http": {
            "clientapi.http.port": config.http.client_port,
            "internalapi.http.port": free_port()}})
        result = kith("--config", str(second), cwd=other)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"cannot listen on [127.0.0.1]:{config.http.client_port}" in result.stderr
    finally:
        first.kill(signal.SIGTERM)


async def test_client_port_opens_after_the_private_ports(tmp_path: Path) -> None:
    """A client port that answers means the whole instance is up: with the internal port
    taken, start fails before the client port ever listens."""
    path = write_config(tmp_path, {})
    config = load_config(str(path), env={})
    assert config.http.internal_port is not None
    taken = socket.create_server(("127.0.0.1", config.http.internal_port))
    server = KithServer(config)
    try:
        with pytest.raises(ListenError, match=f":{config.http.internal_port}"):
            await server.start()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", config.http.client_port), timeout=1).close()
    finally:
        await server.stop()
        taken.close()


async def test_status_says_whether_a_pepper_change_is_unfinished(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"general": {"lookup_pepper.rotation": 86400}})
    store = await Store.open(load_config(str(path), env={}).db)
    try:
        await rotate_when_due(store, 86400)  # the first period starts
        started_ms = int((await store.state.get("lookup_pepper.rotated_at")) or 0)
        assert started_ms

        def pepper_line() -> str:
            result = kith("--config", str(path), "status", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            (line,) = [x for x in result.stdout.splitlines() if x.startswith("pepper:")]
            return line

        due = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_ms / 1000 + 86400))
        assert pepper_line() == f"pepper:    no change under way, the next periodic " \
                                f"change due {due}"
        rotation = await PepperRotation.begin(store)  # and then nothing: interrupted
        assert rotation is not None
        assert pepper_line().startswith("pepper:    a change is under way, or was "
                                        "interrupted ")
        await rotation.complete()
        assert pepper_line().startswith("pepper:    no change under way, the next periodic "
                                        "change due ")
    finally:
        await store.close()


def test_status_says_how_lookups_are_answered(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    result = kith("--config", str(path), "status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lookups:   answered by the compiled probe" in result.stdout.splitlines()
    as_json = kith("--config", str(path), "status", "--json", cwd=tmp_path)
    assert json.loads(as_json.stdout)["compiled_probe"] is True
    # An installation without a C compiler (the field is this installation's, read by
    # the command itself) says what that costs.
    status = ServerStatus(bindings={}, sessions_waiting=0, sessions_validated=0,
                          invites_pending=0, onbind={}, onbind_oldest_pending_age_s=None,
                          peers=[], ldap_configured=False, ldap_sync=None,
                          pepper_change_unfinished=False, pepper_change_due_ts=None,
                          compiled_probe=False)
    (line,) = [x for x in _status_lines(status) if x.startswith("lookups:")]
    assert line.startswith("lookups:   kith._probe is not built")


def test_healthcheck(tmp_path: Path, kith_process: KithProcessFactory) -> None:
    path = write_config(tmp_path, {})
    config = load_config(str(path), env={})
    assert kith("--config", str(path), "healthcheck", cwd=tmp_path).returncode == 1
    proc = kith_process(path)
    proc.start(config.http.client_port)
    try:
        result = kith("--config", str(path), "healthcheck", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    finally:
        proc.kill(signal.SIGTERM)


def test_offline_bind_and_unbind(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    result = kith("--config", str(path), "bind", "email", "Alice@Example.com",
                  "@alice:hs.test", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"address": "alice@example.com"' in result.stdout
    assert '"signatures"' in result.stdout
    result = kith("--config", str(path), "unbind", "email", "alice@example.com",
                  "@alice:hs.test", cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "unbound")
    result = kith("--config", str(path), "bind", "fax", "1", "@a:hs.test", cwd=tmp_path)
    assert result.returncode == 2  # argparse refuses the medium
    result = kith("--config", str(path), "bind", "email", "nope", "@a:hs.test", cwd=tmp_path)
    assert result.returncode == 1 and "M_INVALID_PARAM" in result.stderr


def test_onbind_lists_and_retries_deliveries(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    db = load_config(str(path), env={}).db

    def invite(token: str, address: str) -> InviteTokenRow:
        return InviteTokenRow(medium="email", address=address, room_id="!r:hs.test",
                              sender="@alice:hs.test", token=token, received_ts=1_000)

    async def queue() -> None:
        store = await Store.open(db)
        try:
            for token, address in (("t1", "bob@example.com"), ("t2", "carol@example.com")):
                await store.invites.add(invite(token, address), f"pk-{token}")
                await store.invites.queue_onbind("email", address, "hs.test",
                                                 f"@{address[:3]}:hs.test", 5_000,
                                                 lambda invites: {"invites": []})
            first, second = await store.invites.due_deliveries(5_000, 10)
            waiting = await store.invites.claim(first, 5_000, 60_000)
            assert waiting is not None
            await store.invites.failed(waiting, next_attempt_ts=9_999_999_999_999,
                                       error="HTTP 502")
            stuck = await store.invites.claim(second, 5_000, 60_000)
            assert stuck is not None
            await store.invites.gave_up(stuck, 6_000, "connection refused")
        finally:
            await store.close()

    asyncio.run(queue())
    listed = kith("--config", str(path), "onbind", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("#1 pending to hs.test for @bob:hs.test: 1 attempts")
    assert "next attempt 2286-" in lines[0] and "last error: HTTP 502" in lines[0]
    assert lines[1].startswith("#2 gave_up to hs.test for @car:hs.test: 1 attempts")
    assert "finished 1970-01-01T00:00:06Z" in lines[1]

    before = int(time.time() * 1000)
    retried = kith("--config", str(path), "onbind", "--retry", cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("1 pending deliveries are due now; 1 that had given up")

    async def states() -> list[tuple[str, int]]:
        store = await Store.open(db)
        try:
            return [(d.state, d.next_attempt_ts) for d in await store.invites.report()]
        finally:
            await store.close()

    after = asyncio.run(states())
    assert [state for state, _ in after] == ["pending", "pending"]
    assert all(before <= due <= int(time.time() * 1000) for _, due in after)
