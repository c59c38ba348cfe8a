"""A mixed mesh: kith and a real Sydent 2.6.1 (from PyPI) replicate to each other.

Sydent runs on loopback with its replication listener on a certificate from the test
CA, and learns of kith as Sydent's documentation says: a row in its `peers` and
`peer_pubkeys` tables and a `[peer.<name>] base_replication_url` in sydent.conf.  kith
has Sydent in a `[peer.sydent.test]` section.  Binds and unbinds made through each
server's own API must then be found (or be gone) by lookups on the other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith, free_port
from tests.conftest import wait_for as wait_until
from tests.e2e.test_sydent_import import http, sydent_python, wait_for
from tests.federation.conftest import TestPki
from tests.replication.conftest import MeshNode

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("homeserver")]

SYDENT = "sydent.test"


@dataclass
class Sydent:
    directory: Path
    internal: str  # base URL of its internal API
    client: str  # base URL of its client API
    replication_port: int

    @property
    def db(self) -> Path:
        return self.directory / "sydent.db"

    def public_key(self) -> str:
        return str(http("GET", f"{self.client}/_matrix/identity/api/v1/pubkey/ed25519:0")[
            "public_key"])

    def add_peer(self, peer: MeshNode) -> None:
        """Make `peer` a replication peer, the way Sydent's documentation says."""
        with sqlite3.connect(self.db) as conn:
            conn.execute("INSERT INTO peers (name, port, lastSentVersion, active) "
                         "VALUES (?, NULL, NULL, 1)", (peer.name,))
            conn.execute("INSERT INTO peer_pubkeys (peername, alg, key) VALUES (?, ?, ?)",
                         (peer.name, "ed25519", peer.public_key))

    def lookup(self, address: str) -> Any:
        return http("GET", f"{self.client}/_matrix/identity/api/v1/lookup?medium=email&"
                           f"address={address}").get("mxid")

    def bind(self, address: str, mxid: str) -> None:
        http("POST", f"{self.internal}/_matrix/identity/internal/bind",
             {"medium": "email", "address": address, "mxid": mxid})

    def unbind(self, address: str, mxid: str) -> None:
        http("POST", f"{self.internal}/_matrix/identity/internal/unbind",
             {"medium": "email", "address": address, "mxid": mxid})


@pytest.fixture
def node_a(pki: TestPki) -> MeshNode:
    return MeshNode("kith-a.test", pki)


@pytest.fixture
def sydent(tmp_path: Path, pki: TestPki, node_a: MeshNode) -> Iterator[Sydent]:
    python = sydent_python()
    port, internal, replication = free_port(), free_port(), free_port()
    directory = tmp_path / "sydent"
    directory.mkdir()
    (directory / "sydent.conf").write_text(f"""[general]
server.name = {SYDENT}
pidfile.path = {directory}/sydent.pid
ip.whitelist = 127.0.0.1

[db]
db.file = sydent.db

[http]
clientapi.http.bind_address = 127.0.0.1
clientapi.http.port = {port}
internalapi.http.bind_address = 127.0.0.1
internalapi.http.port = {internal}
replication.https.certfile = {pki.certificate(SYDENT)}
replication.https.cacert = {pki.ca_file}
replication.https.bind_address = 127.0.0.1
replication.https.port = {replication}

[peer.{node_a.name}]
base_replication_url = {node_a.url}

[email]
email.smtphost = 127.0.0.1
email.smtpport = 9

[crypto]
""")
    log = open(directory / "sydent.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([python, "-m", "sydent.sydent"], cwd=directory, stdout=log,
                            stderr=log, env={**os.environ,
                                             "SYDENT_CONF": str(directory / "sydent.conf")})
    try:
        wait_for(f"http://127.0.0.1:{port}/_matrix/identity/versions", proc, "Sydent")
        yield Sydent(directory, f"http://127.0.0.1:{internal}", f"http://127.0.0.1:{port}",
                     replication)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


async def looked_up(kith: RunningKith, token: str, address: str) -> str | None:
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    hash_ = lookup_hash("email", address, pepper)
    return (await kith.lookup(token, "sha256", [hash_])).get(hash_)


async def sydent_finds(sydent: Sydent, address: str, mxid: str | None,
                       timeout_s: float = 40) -> None:
    """Wait until Sydent's lookup of `address` answers `mxid` (the in-process kith keeps
    running meanwhile: Sydent is asked from a thread)."""
    deadline = time.monotonic() + timeout_s
    while (found := await asyncio.to_thread(sydent.lookup, address)) != mxid:
        assert time.monotonic() < deadline, f"Sydent's lookup of {address}: {found}"
        await asyncio.sleep(0.2)


async def test_kith_and_sydent_replicate_both_ways(sydent: Sydent, node_a: MeshNode,
                                                   kith_factory: KithFactory) -> None:
    sections = node_a.sections()
    sections[f"peer.{SYDENT}"] = {
        "base_replication_url": f"https://127.0.0.1:{sydent.replication_port}/",
        "public_key": f"ed25519:0 {sydent.public_key()}"}
    kith = await kith_factory(sections)
    sydent.add_peer(node_a)
    token = await kith.register()

    # Sydent -> kith (Sydent pushes every 10 s).
    await asyncio.to_thread(sydent.bind, "from-sydent@example.com", "@s:hs.test")
    assert await wait_until("kith to find Sydent's bind", lambda: looked_up(
        kith, token, "from-sydent@example.com"), timeout_s=40) == "@s:hs.test"
    # kith -> Sydent.
    await kith.bind("from-kith@example.com", "@k:hs.test")
    await sydent_finds(sydent, "from-kith@example.com", "@k:hs.test")

    # Unbinds travel too, as tombstones.
    await asyncio.to_thread(sydent.unbind, "from-sydent@example.com", "@s:hs.test")
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "from-kith@example.com",
            "mxid": "@k:hs.test"}) as resp:
        assert resp.status == 200
    await sydent_finds(sydent, "from-kith@example.com", None)

    async def gone() -> bool:
        return await looked_up(kith, token, "from-sydent@example.com") is None

    await wait_until("Sydent's unbind to reach kith", gone, timeout_s=40)
    # Each side acknowledged the other: Sydent moved its cursor for kith.
    with sqlite3.connect(sydent.db) as conn:
        sent = conn.execute("SELECT lastSentVersion FROM peers WHERE name = ?",
                            (node_a.name,)).fetchone()[0]
    assert sent is not None and sent >= 2
