"""Session fixtures for the end-to-end tests: a real Synapse and a kith serving TLS,
both on loopback, both trusting one throwaway test CA, and a real SMTP server; for the
Element tests, matrix-js-sdk in node and an SMS provider stand-in."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kith.config import KithConfig, load_config
from tests.conftest import KithProcess, SmtpSink, free_port, write_config
from tests.e2e.element_sdk import ElementSdk
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
    kith = start_tls_kith(tmp_path_factory.mktemp("kith"), pki, e2e_smtp)
    yield kith
    kith.process.kill(signal.SIGTERM)


def start_tls_kith(directory: Path, pki: TestPki, smtp: SmtpSink,
                   extra: dict[str, dict[str, Any]] | None = None) -> TlsKith:
    """A kith process in `directory` that Synapse can reach as https://127.0.0.1:<port>,
    mailing through `smtp`; `extra` adds config sections and keys."""
    port = free_port()
    name = f"127.0.0.1:{port}"
    sections: dict[str, dict[str, Any]] = {
        # Synapse reaches an identity server only as https://<id_server>.
        "general": {"server.name": name, "ip.whitelist": "127.0.0.1, ::1"},
        "http": {"clientapi.http.port": port,
                 "clientapi.https.certfile": pki.cert_file,
                 "clientapi.https.keyfile": pki.key_file,
                 "client_http_base": f"https://{name}",
                 # Synapse's name has an explicit port: kith connects straight to it.
                 "federation.cafile": pki.ca_file,
                 "federation.timeout": 5},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port,
                  "email.ratelimit_sender.burst": 100},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    path = write_config(directory, sections)
    config = load_config(str(path), env={})
    process = KithProcess(path)
    try:
        process.start(port)
    except BaseException:
        process.kill(signal.SIGKILL)
        raise
    return TlsKith(config, process, ssl.create_default_context(cafile=str(pki.ca_file)))


def kith_log(kith: TlsKith) -> str:
    return (Path(kith.config.path).parent / "kith.log").read_text(errors="replace")


def poll(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Call `check` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


class OpenMarketStandIn:
    """OpenMarket's /sms/v4/mt on loopback (in a thread, for a kith process): keeps what
    kith asks it to send and accepts it as OpenMarket does, with 202 and a ticket."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []  # the `mobileTerminate` objects
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/sms/v4/mt" or not self.headers.get(
                        "Authorization", "").startswith("Basic "):
                    self.send_response(404)
                    self.end_headers()
                    return
                stand_in.messages.append(json.loads(body)["mobileTerminate"])
                self.send_response(202)
                self.send_header("Location", f"/sms/v4/mt/ticket-{len(stand_in.messages)}")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def sent_to(self, msisdn: str) -> list[str]:
        """The texts of the messages sent to `msisdn` (E.164 without '+')."""
        return [m["message"]["content"] for m in self.messages
                if m["destination"]["address"] == msisdn]

    @staticmethod
    def code_in(text: str) -> str:
        match = re.search(r"\b([0-9]{6})\b", text)
        assert match, text
        return match.group(1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def openmarket() -> Iterator[OpenMarketStandIn]:
    stand_in = OpenMarketStandIn()
    stand_in.start()
    yield stand_in
    stand_in.stop()


# Terms in Sydent's YAML format: two documents, each in two languages.
ELEMENT_TERMS = """
master_version: "2024-01"
docs:
  privacy_policy:
    version: "1.0"
    langs:
      en: {name: "Privacy Policy", url: "https://kith.example/privacy-1.0-en.html"}
      de: {name: "Datenschutz", url: "https://kith.example/privacy-1.0-de.html"}
  terms_of_service:
    version: "3.1"
    langs:
      en: {name: "Terms of Service", url: "https://kith.example/tos-3.1-en.html"}
      de: {name: "Nutzungsbedingungen", url: "https://kith.example/tos-3.1-de.html"}
"""


@pytest.fixture(scope="module")
def element_kith(tmp_path_factory: pytest.TempPathFactory, pki: TestPki, synapse: Synapse,
                 e2e_smtp: SmtpSink, openmarket: OpenMarketStandIn) -> Iterator[TlsKith]:
    """The TLS kith with what Element's flows meet: terms, and an SMS provider."""
    directory = tmp_path_factory.mktemp("element-kith")
    (directory / "terms.yaml").write_text(ELEMENT_TERMS)
    kith = start_tls_kith(directory, pki, e2e_smtp, {
        "general": {"terms.path": directory / "terms.yaml"},
        "sms": {"username": "om-user", "password": "om-pass", "base_url": openmarket.url},
    })
    yield kith
    kith.process.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def element_sdk(tmp_path_factory: pytest.TempPathFactory, pki: TestPki
                ) -> Iterator[ElementSdk]:
    sdk = ElementSdk(tmp_path_factory.mktemp("element-sdk") / "driver.log", pki.ca_file)
    sdk.start()
    yield sdk
    sdk.stop()
