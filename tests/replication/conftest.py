"""Replication test nodes: a name, a signing key, a certificate from the test CA, a
replication port; the config sections of a kith playing one, and a stand-in peer that
pushes what a test makes it push."""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from signedjson.key import encode_signing_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from kith.replication.peers import PUSH_PATH
from tests.conftest import free_port
from tests.federation.conftest import TestPki


@dataclass
class MeshNode:
    name: str
    pki: TestPki
    signing_key: SigningKey = field(default_factory=lambda: generate_signing_key("0"))
    port: int = field(default_factory=free_port)

    @property
    def certificate(self) -> Path:
        return self.pki.certificate(self.name)

    @property
    def public_key(self) -> str:
        return encode_base64(get_verify_key(self.signing_key).encode())

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def sections(self, *peers: MeshNode) -> dict[str, dict[str, Any]]:
        """A kith's config sections for this node, replicating with `peers`."""
        sections: dict[str, dict[str, Any]] = {
            "general": {"server.name": self.name},
            "crypto": {"ed25519.signingkey":
                       f"ed25519 0 {encode_signing_key_base64(self.signing_key)}"},
            "http": {"replication.https.certfile": self.certificate,
                     "replication.https.cacert": self.pki.ca_file,
                     "replication.https.bind_address": "127.0.0.1",
                     "replication.https.port": self.port,
                     "replication.max_retry_interval": 1},
        }
        for peer in peers:
            sections[f"peer.{peer.name}"] = {"base_replication_url": peer.url,
                                             "public_key": f"ed25519:0 {peer.public_key}"}
        return sections

    def sign(self, association: dict[str, Any]) -> dict[str, Any]:
        signed: dict[str, Any] = sign_json(dict(association), self.name, self.signing_key)
        return signed

    def client_context(self, certificate: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.ca_file)
        context.load_cert_chain(certificate or self.certificate)
        return context

    async def push(self, target: MeshNode, sg_assocs: dict[str, Any] | None = None, *,
                   body: bytes | None = None, certificate: Path | None = None,
                   content_type: str = "application/json",
                   path: str = "/" + PUSH_PATH) -> tuple[int, Any]:
        """POST a push to `target`'s replication listener as this node (or with another
        `certificate`); (status, JSON body or text)."""
        if body is None:
            body = json.dumps({"sgAssocs": sg_assocs}).encode()
        async with aiohttp.ClientSession() as session, session.post(
                f"https://127.0.0.1:{target.port}{path}", data=body,
                headers={"Content-Type": content_type},
                ssl=self.client_context(certificate)) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, await resp.text()


def association(address: str, mxid: str | None, ts: int, medium: str = "email") -> dict[str, Any]:
    """An association as Sydent signs it (a tombstone when `mxid` is None)."""
    return {"medium": medium, "address": address, "mxid": mxid, "ts": ts,
            "not_before": ts if mxid else None,
            "not_after": ts + 100 * 365 * 86400 * 1000 if mxid else None}


Databases = Callable[[], dict[str, dict[str, Any]]]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest) -> Iterator[Databases]:
    """Config sections giving each node a database of its own: the SQLite file the test
    config has by default, or a new PostgreSQL database (dropped at the end).  Ask for it
    before the kith fixtures, so that it outlives the nodes using it."""
    if request.param == "sqlite":
        yield dict
        return
    server = request.getfixturevalue("postgresql_server")
    created: list[str] = []

    def new() -> dict[str, dict[str, Any]]:
        name = "kith_test_" + secrets.token_hex(6)
        server.psql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return {"db": {"db.url": server.url(name)}}

    yield new
    for name in created:
        server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def node_a(pki: TestPki) -> MeshNode:
    return MeshNode("kith-a.test", pki)


@pytest.fixture
def node_b(pki: TestPki) -> MeshNode:
    return MeshNode("kith-b.test", pki)


@pytest.fixture
def stand_in(pki: TestPki) -> MeshNode:
    """A peer the test drives by hand."""
    return MeshNode("peer.test", pki)
