"""Fixtures for federation tests: throwaway CAs and loopback-only HTTP(S) servers."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web


@dataclass(frozen=True)
class TestPki:
    __test__ = False

    ca_file: Path
    other_ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def certificate(self, common_name: str, *, ca: str = "ca",
                    usage: str = "serverAuth,clientAuth") -> Path:
        """A PEM file holding a new key and its certificate for `common_name` (valid for
        127.0.0.1 and localhost too), issued by `ca` ("ca" or "other-ca"): what a
        replication node presents as server and as client."""
        directory = self.ca_file.parent
        stem = f"{common_name}-{ca}-{usage.replace(',', '-')}"
        combined = directory / f"{stem}.pem"
        if combined.exists():
            return combined
        _openssl(*f"req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
                 f" -keyout {stem}.key -out {stem}.csr -subj /CN={common_name}".split(),
                 cwd=directory)
        (directory / f"{stem}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{common_name}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\n")
        _openssl(*f"x509 -req -in {stem}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial"
                 f" -out {stem}.crt -days 2 -extfile {stem}.ext".split(), cwd=directory)
        combined.write_text((directory / f"{stem}.key").read_text()
                            + (directory / f"{stem}.crt").read_text())
        return combined


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        *f"req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
        f" -keyout {name}.key -out {name}.pem -subj /CN={name}".split(),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A CA, a server cert for 127.0.0.1/localhost it signed, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _openssl(
        *"req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        " -keyout server.key -out server.csr -subj /CN=127.0.0.1".split(),
        cwd=directory,
    )
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        *"x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
        " -out server.pem -days 2 -extfile server.ext".split(),
        cwd=directory,
    )
    return TestPki(
        ca_file=directory / "ca.pem",
        other_ca_file=directory / "other-ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )


Serve = Callable[..., AbstractAsyncContextManager[int]]


@asynccontextmanager
async def _serve(
    routes: list[web.RouteDef], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Run an aiohttp app on 127.0.0.1 (never anything else); yields its port."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        await site.start()
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()
        sock.close()


@pytest.fixture
def serve() -> Serve:
    return _serve
