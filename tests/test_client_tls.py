"""TLS on the client API: served with the configured certificate, verified by a client
trusting the test CA, swapped on SIGHUP, and refused at startup when unusable."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest

from kith.config import ConfigError, load_config
from kith.server import KithServer
from tests.conftest import KithProcessFactory, write_config
from tests.federation.conftest import TestPki, _openssl
from tests.test_cli import kith as run_kith


def reissue(pki: TestPki, directory: Path) -> tuple[Path, Path]:
    """A second certificate for 127.0.0.1 from the same test CA, with a new key."""
    ca_dir = pki.ca_file.parent
    _openssl(*f"req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
             f" -keyout {directory}/new.key -out {directory}/new.csr -subj /CN=127.0.0.1".split(),
             cwd=ca_dir)
    _openssl(*f"x509 -req -in {directory}/new.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
             f" -out {directory}/new.pem -days 2 -extfile server.ext".split(), cwd=ca_dir)
    return directory / "new.pem", directory / "new.key"


def tls_config(directory: Path, pki: TestPki) -> Path:
    cert, key = directory / "tls.pem", directory / "tls.key"
    shutil.copy(pki.cert_file, cert)
    shutil.copy(pki.key_file, key)
    return write_config(directory, {"http": {"clientapi.https.certfile": cert,
                                             "clientapi.https.keyfile": key}})


def served_fingerprint(port: int, ca_file: Path) -> str:
    """SHA-256 of the certificate the server presents, after verifying it with the CA."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint_of(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


async def test_client_api_over_tls_verified_with_the_ca(tmp_path: Path, pki: TestPki) -> None:
    config = load_config(str(tls_config(tmp_path, pki)), env={})
    server = KithServer(config)
    await server.start()
    try:
        base = f"127.0.0.1:{config.http.client_port}"
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://{base}/_matrix/identity/v2", ssl=context) as resp:
                assert resp.status == 200
                assert await resp.json() == {}
            with pytest.raises(aiohttp.ClientError):  # no plain HTTP on a TLS port
                async with http.get(f"http://{base}/_matrix/identity/v2") as resp:
                    await resp.read()
            untrusting = ssl.create_default_context(cafile=str(pki.other_ca_file))
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(f"https://{base}/_matrix/identity/v2", ssl=untrusting):
                    pass
        # A blocking client, so in a thread: the server runs on this event loop.
        served = await asyncio.to_thread(served_fingerprint, config.http.client_port,
                                         pki.ca_file)
        assert served == fingerprint_of(pki.cert_file)

        # reload() is what SIGHUP calls: the same listener now presents the new certificate.
        new_cert, new_key = reissue(pki, tmp_path)
        shutil.copy(new_cert, config.http.client_https_certfile)
        shutil.copy(new_key, config.http.client_https_keyfile)
        await server.reload()
        served = await asyncio.to_thread(served_fingerprint, config.http.client_port,
                                         pki.ca_file)
        assert served == fingerprint_of(new_cert)
    finally:
        await server.stop()


def test_sighup_swaps_the_certificate_and_keeps_it_if_the_new_one_is_bad(
        tmp_path: Path, pki: TestPki, kith_process: KithProcessFactory) -> None:
    path = tls_config(tmp_path, pki)
    config = load_config(str(path), env={})
    port = config.http.client_port
    proc = kith_process(path)
    proc.start(port)
    assert served_fingerprint(port, pki.ca_file) == fingerprint_of(pki.cert_file)
    health = run_kith("--config", str(path), "healthcheck", cwd=tmp_path)
    assert health.returncode == 0 and "https://" in health.stdout, health.stderr

    new_cert, new_key = reissue(pki, tmp_path)
    shutil.copy(new_key, tmp_path / "tls.key")
    shutil.copy(new_cert, tmp_path / "tls.pem")
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while served_fingerprint(port, pki.ca_file) != fingerprint_of(new_cert):
        assert time.monotonic() < deadline, "SIGHUP did not swap the certificate"
        time.sleep(0.05)

    # A key that does not match the certificate: logged, and the working pair stays.
    shutil.copy(pki.key_file, tmp_path / "tls.key")
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    log = tmp_path / "kith.log"
    while "TLS certificate not reloaded" not in log.read_text():
        assert time.monotonic() < deadline, "no error logged for the bad key"
        time.sleep(0.05)
    assert proc.running
    assert served_fingerprint(port, pki.ca_file) == fingerprint_of(new_cert)
    proc.kill(signal.SIGTERM)


@pytest.mark.parametrize("problem", ["not pem", "wrong key", "missing"])
def test_unusable_certificate_stops_startup_with_one_line(
        tmp_path: Path, pki: TestPki, problem: str) -> None:
    path = tls_config(tmp_path, pki)
    if problem == "not pem":
        (tmp_path / "tls.pem").write_text("hello\n")
    elif problem == "wrong key":
        _openssl(*"genpkey -algorithm ec -pkeyopt ec_paramgen_curve:prime256v1"
                 " -out tls.key".split(), cwd=tmp_path)
    else:
        (tmp_path / "tls.key").unlink()
    result = run_kith("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kith:")]
    assert len(errors) == 1
    key = "keyfile" if problem == "missing" else "certfile"
    assert errors[0].startswith(f"kith: configuration error: [http] clientapi.https.{key}: ")


def test_keyfile_without_certfile_is_a_config_error(tmp_path: Path, pki: TestPki) -> None:
    path = write_config(tmp_path, {"http": {"clientapi.https.keyfile": pki.key_file}})
    with pytest.raises(ConfigError, match=r"clientapi.https.keyfile: needs"):
        load_config(str(path), env={})


async def test_key_in_the_certfile(tmp_path: Path, pki: TestPki) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_text(pki.cert_file.read_text() + pki.key_file.read_text())
    path = write_config(tmp_path, {"http": {"clientapi.https.certfile": combined}})
    config = load_config(str(path), env={})
    server = KithServer(config)
    await server.start()
    try:
        served = await asyncio.to_thread(served_fingerprint, config.http.client_port,
                                         pki.ca_file)
        assert served == fingerprint_of(pki.cert_file)
    finally:
        await server.stop()
