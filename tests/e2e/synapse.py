"""A real Synapse homeserver for end-to-end tests, on loopback only.

Synapse and its dependencies live in their own virtualenv (`.venv-synapse`, pinned by
`requirements-synapse.lock`) so they never mix with kith's.  `make install-synapse`
creates it; the fixtures create it on first use when it is missing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signedjson.key import generate_signing_key, write_signing_keys

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_VERSION = "1.163.2"
SYNAPSE_VENV = Path(os.environ.get("KITH_SYNAPSE_VENV", ROOT / ".venv-synapse"))
SYNAPSE_LOCK = ROOT / "requirements-synapse.lock"
START_TIMEOUT_S = 90.0


def synapse_python() -> Path:
    """The pinned Synapse's interpreter; installs it into SYNAPSE_VENV if missing."""
    python = SYNAPSE_VENV / "bin" / "python"
    if not _has_pinned_synapse(python):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SYNAPSE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "-r", str(SYNAPSE_LOCK)], check=True)
    if not _has_pinned_synapse(python):
        raise RuntimeError(f"matrix-synapse {SYNAPSE_VERSION} is not installed in {SYNAPSE_VENV}")
    return python


def _has_pinned_synapse(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"],
        capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == SYNAPSE_VERSION


def homeserver_yaml(directory: Path, *, fed_port: int, client_port: int, cert: Path,
                    key: Path, shared_secret: str) -> dict[str, Any]:
    """A loopback-only Synapse: TLS federation listener, plain client listener, SQLite."""
    lots = {"per_second": 1000, "burst_count": 1000}
    return {
        "server_name": f"localhost:{fed_port}",
        "pid_file": str(directory / "homeserver.pid"),
        "report_stats": False,
        "listeners": [
            {"port": fed_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
             "resources": [{"names": ["federation", "keys"]}]},
            {"port": client_port, "bind_addresses": ["127.0.0.1"], "type": "http",
             "tls": False, "resources": [{"names": ["client"]}]},
        ],
        "tls_certificate_path": str(cert),
        "tls_private_key_path": str(key),
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "media_store_path": str(directory / "media"),
        "signing_key_path": str(directory / "signing.key"),
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "enable_registration": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        # Synapse refuses outbound requests to loopback (the identity server) without this.
        "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
        "federation_domain_whitelist": None,
        "rc_message": lots, "rc_registration": lots, "rc_login": {
            "address": lots, "account": lots, "failed_attempts": lots},
        "rc_joins": {"local": lots, "remote": lots},
        "rc_invites": {"per_room": lots, "per_user": lots, "per_issuer": lots},
        "rc_third_party_invite": lots,
        "rc_admin_redaction": lots,
        "rc_3pid_validation": lots,
    }


@dataclass
class Synapse:
    """One Synapse process: configured once, started and stopped (by PID) as often as needed."""

    python: Path
    directory: Path
    ca_file: Path
    fed_port: int
    client_port: int
    shared_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def server_name(self) -> str:
        return f"localhost:{self.fed_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def configure(self, cert: Path, key: Path) -> None:
        config = homeserver_yaml(self.directory, fed_port=self.fed_port,
                                 client_port=self.client_port, cert=cert, key=key,
                                 shared_secret=self.shared_secret)
        # JSON is YAML: no YAML writer needed on this side.
        (self.directory / "homeserver.yaml").write_text(json.dumps(config, indent=2))
        with open(self.directory / "signing.key", "w") as f:
            write_signing_keys(f, [generate_signing_key("a_kith")])

    def start(self) -> None:
        # Synapse calls the identity server over HTTPS; it trusts the test CA this way.
        env = {**os.environ, "SSL_CERT_FILE": str(self.ca_file)}
        log = open(self.directory / "homeserver.log", "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "synapse.app.homeserver",
             "-c", str(self.directory / "homeserver.yaml")],
            cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Synapse exited with {self.proc.returncode}; see "
                                   f"{self.directory / 'homeserver.log'}")
            try:
                status, _ = call("GET", f"{self.client_url}/_matrix/client/versions")
                if status == 200 and self._federation_up():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Synapse did not start in {START_TIMEOUT_S} s")

    def _federation_up(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        status, _ = call("GET", f"https://localhost:{self.fed_port}/_matrix/key/v2/server",
                         context=context)
        return status == 200

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def register(self, localpart: str, password: str = "correct horse") -> MatrixUser:
        """A user made with the admin API's shared-secret registration."""
        url = f"{self.client_url}/_synapse/admin/v1/register"
        _, body = call("GET", url)
        nonce = body["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"notadmin"]))
        status, body = call("POST", url, {
            "nonce": nonce, "username": localpart, "password": password, "admin": False,
            "mac": mac.hexdigest()})
        assert status == 200, body
        return MatrixUser(self, body["user_id"], body["access_token"])


@dataclass
class MatrixUser:
    """A Synapse user, driven through the client API as a client would."""

    synapse: Synapse
    user_id: str
    access_token: str

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return call(method, f"{self.synapse.client_url}{path}", body, token=self.access_token)

    def openid_token(self) -> dict[str, Any]:
        user = urllib.parse.quote(self.user_id)
        status, body = self.call(
            "POST", f"/_matrix/client/v3/user/{user}/openid/request_token", {})
        assert status == 200, body
        return dict(body)


def call(method: str, url: str, body: Any = None, *, token: str | None = None,
         context: ssl.SSLContext | None = None, timeout_s: float = 30.0) -> tuple[int, Any]:
    """(status, body) of one request: JSON decoded, any other body as text.  HTTP errors
    are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
            return resp.status, _decoded(resp.read(), resp.headers.get_content_type())
    except urllib.error.HTTPError as exc:
        return exc.code, _decoded(exc.read(), exc.headers.get_content_type())


def _decoded(raw: bytes, content_type: str) -> Any:
    if content_type == "application/json" or not raw:
        try:
            return json.loads(raw or b"null")
        except ValueError:
            pass
    return raw.decode(errors="replace")
