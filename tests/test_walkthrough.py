"""Sydent's README walkthrough, request for request, against kith's v1 API.

The requests are the curl commands of Sydent's README, run with curl against a kith
started on a freshly generated sydent.conf; only the ports (free ones instead of 8090 and
8091), the sid (the one the first answer returned) and the mailed token are filled in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from tests.conftest import KithProcessFactory, SmtpSink, free_port

WALKTHROUGH = """\
curl -XPOST 'http://localhost:8090/_matrix/identity/api/v1/validate/email/requestToken' -H "Content-Type: application/json" -d '{"email": "alice@example.com", "client_secret": "abcd", "send_attempt": 1}'
curl -XPOST 'http://localhost:8090/_matrix/identity/api/v1/validate/email/submitToken' -H "Content-Type: application/json" -d '{"token": "<from the mail>", "sid": "1", "client_secret": "abcd"}'
curl -XPOST 'http://localhost:8090/_matrix/identity/api/v1/3pid/bind' -H "Content-Type: application/json" -d '{"sid": "1", "client_secret": "abcd", "mxid": "@alice:example.com"}'
curl 'http://localhost:8090/_matrix/identity/api/v1/lookup?medium=email&address=alice@example.com'
curl http://localhost:8090/_matrix/identity/api/v1/pubkey/ed25519:0
curl -XPOST 'http://localhost:8091/_matrix/identity/internal/bind' -H "Content-Type: application/json" -d '{"address": "alice@example.com", "medium": "email", "mxid": "@alice:example.com"}'
curl -XPOST 'http://localhost:8091/_matrix/identity/internal/unbind' -H "Content-Type: application/json" -d '{"address": "alice@example.com", "medium": "email", "mxid": "@alice:example.com"}'
"""  # noqa: E501


def set_key(text: str, key: str, value: object) -> str:
    """Set `key` in a generated sydent.conf, whether it is written out or commented."""
    pattern = re.compile(rf"^#?\s*{re.escape(key)}\s*=.*$", re.MULTILINE)
    assert pattern.search(text), key
    return pattern.sub(f"{key} = {value}", text, count=1)


def curl(command: str, port: int, internal_port: int) -> dict[str, Any]:
    argv = shlex.split(command.replace("localhost:8090", f"localhost:{port}")
                       .replace("localhost:8091", f"localhost:{internal_port}"))
    out = subprocess.run([*argv, "-sS", "--max-time", "20"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return dict(json.loads(out))


async def test_sydent_readme_walkthrough(tmp_path: Path, smtp: SmtpSink,
                                         kith_process: KithProcessFactory) -> None:
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("curl is not installed (.ci/run installs it)")
        pytest.skip("curl is not installed")
    conf = tmp_path / "sydent.conf"
    subprocess.run([sys.executable, "-m", "kith", "--config", str(conf), "generate-config"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    port, internal_port = free_port(), free_port()
    text = conf.read_text()
    for key, value in (("server.name", "kith.test"), ("clientapi.http.port", port),
                       ("internalapi.http.port", internal_port),
                       ("email.smtphost", "127.0.0.1"), ("email.smtpport", smtp.port)):
        text = set_key(text, key, value)
    conf.write_text(text)
    proc = kith_process(conf)
    proc.start(port)
    try:
        commands = WALKTHROUGH.splitlines()
        answer = curl(commands[0], port, internal_port)
        sid = answer["sid"]
        assert isinstance(sid, str)
        token = re.search(r"token=([A-Za-z0-9]{32})", smtp.messages[-1][1])
        assert token and smtp.messages[-1][0] == ["alice@example.com"]
        submit = commands[1].replace("<from the mail>", token.group(1)).replace(
            '"sid": "1"', f'"sid": "{sid}"')
        assert curl(submit, port, internal_port) == {"success": True}
        bound = curl(commands[2].replace('"sid": "1"', f'"sid": "{sid}"'),
                     port, internal_port)
        assert (bound["address"], bound["medium"], bound["mxid"]) == (
            "alice@example.com", "email", "@alice:example.com")
        looked_up = curl(commands[3], port, internal_port)
        pubkey = curl(commands[4], port, internal_port)["public_key"]
        verify_key = decode_verify_key_bytes("ed25519:0", decode_base64(pubkey))
        for signed in (bound, looked_up):
            verify_signed_json(signed, "kith.test", verify_key)
        assert looked_up["mxid"] == "@alice:example.com"
        internal = curl(commands[5], port, internal_port)
        verify_signed_json(internal, "kith.test", verify_key)
        assert curl(commands[6], port, internal_port) == {}
        assert curl(commands[3], port, internal_port) == {}
    finally:
        proc.kill(signal.SIGTERM)
