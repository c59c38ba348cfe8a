"""Session fixtures for the end-to-end tests: a real Synapse and a kith serving TLS,
both on loopback, both trusting one throwaway test CA, and a real SMTP server."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kith.config import KithConfig, load_config
from tests.conftest import KithProcess, SmtpSink, free_port, write_config
from tests.e2e.synapse import Synapse, call, synapse_python
from tests.federation.conftest import TestPki


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[Synapse]:
    """Synapse as `localhost:<port>`: federation over TLS (a cert from the test CA)."""
    directory = tmp_path_factory.mktemp("synapse")
    server = Synapse(synapse_python(), directory, pki.ca_file, free_port(), free_port())
    server.configure(pki.cert_file, pki.key_file)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def e2e_smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@dataclass
class TlsKith:
    """kith as a process serving its client API over TLS as `127.0.0.1:<port>`."""

    config: KithConfig
    process: KithProcess
    context: ssl.SSLContext

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.config.http.client_port}"

    def call(self, method: str, path: str, body: Any = None,
             token: str | None = None) -> tuple[int, Any]:
        return call(method, f"https://{self.server_name}/_matrix/identity/v2{path}", body,
                    token=token, context=self.context)

    def onbind_queue(self) -> str:
        """What `kith onbind` shows the operator: one line per queued delivery."""
        return subprocess.run(
            [sys.executable, "-m", "kith", "--config", self.config.path, "onbind"],
            capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture(scope="module")
def tls_kith(tmp_path_factory: pytest.TempPathFactory, pki: TestPki, synapse: Synapse,
             e2e_smtp: SmtpSink) -> Iterator[TlsKith]:
    directory = tmp_path_factory.mktemp("kith")
    port = free_port()
    name = f"127.0.0.1:{port}"
    path = write_config(directory, {
        # Synapse reaches an identity server only as https://<id_server>.
        "general": {"server.name": name, "ip.whitelist": "127.0.0.1, ::1"},
        "http": {"clientapi.http.port": port,
                 "clientapi.https.certfile": pki.cert_file,
                 "clientapi.https.keyfile": pki.key_file,
                 "client_http_base": f"https://{name}",
                 # Synapse's name has an explicit port: kith connects straight to it.
                 "federation.cafile": pki.ca_file,
                 "federation.timeout": 5},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": e2e_smtp.port,
                  "email.ratelimit_sender.burst": 100},
    })
    config = load_config(str(path), env={})
    process = KithProcess(path)
    process.start(port)
    yield TlsKith(config, process, ssl.create_default_context(cafile=str(pki.ca_file)))
    process.kill(signal.SIGTERM)


def kith_log(kith: TlsKith) -> str:
    return (Path(kith.config.path).parent / "kith.log").read_text(errors="replace")
