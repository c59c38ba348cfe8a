"""Fixtures for delivery tests: a throwaway PKI and real SMTP servers on loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from kith.config import EmailConfig
from tests.conftest import free_port


@dataclass(frozen=True)
class TestPki:
    __test__ = False

    ca_file: Path
    other_ca_file: Path
    cert_file: Path  # for 127.0.0.1 and localhost, signed by ca_file
    key_file: Path
    localhost_only_cert: Path  # for "localhost" only: wrong name when dialling 127.0.0.1
    localhost_only_key: Path

    def server_context(self, cert: Path | None = None, key: Path | None = None
                       ) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert or self.cert_file, key or self.key_file)
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], san: str
               ) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.key", directory / f"{name}.csr",
                      directory / f"{name}.pem")
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=directory)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "kith-test-ca")
    other_ca = _make_ca(directory, "other-test-ca")
    cert, key = _make_leaf(directory, "smtp", ca, "IP:127.0.0.1,DNS:localhost")
    lo_cert, lo_key = _make_leaf(directory, "localhost-only", ca, "DNS:localhost")
    return TestPki(ca[0], other_ca[0], cert, key, lo_cert, lo_key)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    helo: str | None
    mail_options: list[str] = field(default_factory=list)


@dataclass
class Inbox:
    """What the test SMTP server received, and where it listens."""

    port: int
    messages: list[Received] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      envelope.content, session.host_name,
                                      list(envelope.mail_options)))
        return "250 OK"

    def authenticator(self, server: Any, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((login, password))
            if (login, password) == ("kith", "hunter2"):
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


SmtpFactory = Callable[..., Inbox]


@pytest.fixture
def smtp_server() -> Iterator[SmtpFactory]:
    """Start a real aiosmtpd server on 127.0.0.1: `smtp_server(tls_context=..., ...)`.

    `implicit_tls` (an SSLContext) makes it speak TLS from the first byte.
    """
    controllers: list[Controller] = []

    def start(implicit_tls: ssl.SSLContext | None = None, **smtp_kwargs: Any) -> Inbox:
        inbox = Inbox(port=free_port())
        controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port,
                                ssl_context=implicit_tls, server_hostname="smtp.test",
                                authenticator=inbox.authenticator, **smtp_kwargs)
        controller.start()
        controllers.append(controller)
        return inbox

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts TCP connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def email_config(port: int, **overrides: Any) -> EmailConfig:
    values: dict[str, Any] = {
        "sender": "Kith Test <noreply@kith.test>",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "hostname": "kith.test",
    }
    values.update(overrides)
    return EmailConfig(**values)
