"""A mixed mesh: kith and a real Sydent 2.6.1 (from PyPI) replicate to each other.

Sydent runs on loopback with its replication listener on a certificate from the test
CA, and learns of kith as Sydent's documentation says: a row in its `peers` and
`peer_pubkeys` tables and a `[peer.<name>] base_replication_url` in sydent.conf.  kith
has Sydent in a `[peer.sydent.test]` section.  Binds and unbinds made through each
server's own API must then be found (or be gone) by lookups on the other.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kith.config import load_config
from kith.replication.status import peer_statuses
from kith.server import KithServer
from kith.threepid import lookup_hash, now_ms
from tests.conftest import Homeserver, KithFactory, RunningKith, free_port, write_config
from tests.conftest import wait_for as wait_until
from tests.e2e.test_sydent_import import http, running_sydent
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
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

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
    port, internal, replication = free_port(), free_port(), free_port()
    directory = tmp_path / "sydent"
    directory.mkdir()
    with running_sydent(
            directory, SYDENT, port, internal,
            http_keys=f"replication.https.certfile = {pki.certificate(SYDENT)}\n"
                      f"replication.https.cacert = {pki.ca_file}\n"
                      "replication.https.bind_address = 127.0.0.1\n"
                      f"replication.https.port = {replication}\n",
            sections=f"[peer.{node_a.name}]\nbase_replication_url = {node_a.url}\n") as proc:
        yield Sydent(directory, f"http://127.0.0.1:{internal}", f"http://127.0.0.1:{port}",
                     replication, proc)


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


async def meshed_with(sydent: Sydent, node_a: MeshNode,
                      kith_factory: KithFactory) -> RunningKith:
    """kith as node A, with Sydent as its peer and Sydent with it as its peer."""
    sections = node_a.sections()
    sections[f"peer.{SYDENT}"] = {
        "base_replication_url": f"https://127.0.0.1:{sydent.replication_port}/",
        "public_key": f"ed25519:0 {sydent.public_key()}"}
    kith: RunningKith = await kith_factory(sections)
    sydent.add_peer(node_a)
    return kith


async def test_kith_and_sydent_replicate_both_ways(sydent: Sydent, node_a: MeshNode,
                                                   kith_factory: KithFactory) -> None:
    kith = await meshed_with(sydent, node_a, kith_factory)
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
    # Each side acknowledged the other: Sydent moved its cursor for kith (it commits
    # the cursor after kith's answer, so a moment after kith has stored the push).
    def sydent_cursor() -> int | None:
        with sqlite3.connect(sydent.db) as conn:
            sent = conn.execute("SELECT lastSentVersion FROM peers WHERE name = ?",
                                (node_a.name,)).fetchone()[0]
        return sent if sent is not None and sent >= 2 else None

    assert await wait_until("Sydent to record kith's acknowledgement", sydent_cursor)


async def test_kith_takes_over_a_sydent_in_the_mesh_without_a_full_resend(
        sydent: Sydent, node_a: MeshNode, kith_factory: KithFactory, homeserver: Homeserver,
        pki: TestPki, tmp_path: Path) -> None:
    a = await meshed_with(sydent, node_a, kith_factory)
    token = await a.register()
    for name in ("x", "y", "z"):
        await asyncio.to_thread(sydent.bind, f"{name}@sydent.example", f"@{name}:hs.test")
    await asyncio.to_thread(sydent.unbind, "x@sydent.example", "@x:hs.test")
    for name in ("p", "q"):
        await a.bind(f"{name}@kith.example", f"@{name}:hs.test")
    await sydent_finds(sydent, "q@kith.example", "@q:hs.test")
    with sqlite3.connect(sydent.db) as conn:
        sydent_last = conn.execute("SELECT max(id) FROM local_threepid_associations").fetchone()[0]

    async def sydent_pushed_all() -> bool:
        def sent() -> object:
            with sqlite3.connect(sydent.db) as conn:
                return conn.execute("SELECT lastSentVersion FROM peers WHERE name = ?",
                                    (node_a.name,)).fetchone()[0]
        return bool(await asyncio.to_thread(sent) == sydent_last)

    await wait_until("Sydent to push all it has", sydent_pushed_all, timeout_s=40)
    await asyncio.to_thread(sydent.stop)

    # kith takes Sydent's place: its name, certificate, port, key, data and peers.
    directory = tmp_path / "successor"
    directory.mkdir()
    path = write_config(directory, {
        "general": {"server.name": SYDENT},
        "http": {"replication.https.certfile": pki.certificate(SYDENT),
                 "replication.https.cacert": pki.ca_file,
                 "replication.https.bind_address": "127.0.0.1",
                 "replication.https.port": sydent.replication_port,
                 "replication.max_retry_interval": 1,
                 "federation.test_overrides": f"hs.test={homeserver.url}"}})
    imported = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "kith", "--config", str(path), "import-sydent",
        str(sydent.directory / "sydent.conf")], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert "associations replicated from peers: 2" in imported.stdout
    successor = KithServer(load_config(str(path), env={}))
    await successor.start()
    try:
        s = RunningKith(successor.config, successor, a.http, homeserver)
        s_token = await s.register()
        assert successor.store is not None and successor.replication is not None
        assert {name: await looked_up(s, s_token, name) for name in (
            "x@sydent.example", "y@sydent.example", "p@kith.example", "q@kith.example")} == {
            "x@sydent.example": None, "y@sydent.example": "@y:hs.test",
            "p@kith.example": "@p:hs.test", "q@kith.example": "@q:hs.test"}
        # Nothing to resend: the peer's cursor carried over from Sydent's.
        (status,) = await peer_statuses(successor.store, successor.replication.peers, now_ms())
        assert (status.name, status.behind) == (node_a.name, 0)
        assert status.acknowledged_id is not None and status.acknowledged_id > sydent_last

        # The mesh carries on both ways.
        await s.bind("new@successor.example", "@new:hs.test")
        assert await wait_until("A to find the successor's bind", lambda: looked_up(
            a, token, "new@successor.example"), timeout_s=30) == "@new:hs.test"
        await a.bind("late@kith.example", "@late:hs.test")
        assert await wait_until("the successor to find A's bind", lambda: looked_up(
            s, s_token, "late@kith.example"), timeout_s=30) == "@late:hs.test"
    finally:
        await successor.stop()
