"""Unbind authorised by the homeserver's X-Matrix signature, signed by Synapse's own code
(and, for the forms older homeservers sent, by kith's signer)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp import web
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey

from kith.federation.xmatrix import sign_x_matrix_header
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith, free_port, serving
from tests.peers.synapse_headers import UnbindToSign, synapse_auth_headers

UNBIND = "/_matrix/identity/v2/3pid/unbind"


@dataclass
class KeyServer:
    """A homeserver publishing its signing key at /_matrix/key/v2/server."""

    name: str
    key: SigningKey
    url: str = ""

    async def keys(self, _request: web.Request) -> web.Response:
        body = {
            "server_name": self.name,
            "valid_until_ts": int(time.time() * 1000) + 3600_000,
            "verify_keys": {f"ed25519:{self.key.version}": {
                "key": encode_verify_key_base64(get_verify_key(self.key))}},
            "old_verify_keys": {},
        }
        return web.json_response(sign_json(body, self.name, self.key))


@pytest.fixture
async def key_servers() -> AsyncIterator[dict[str, KeyServer]]:
    servers: dict[str, KeyServer] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name in ("hs.test", "other.test"):
            ks = KeyServer(name, generate_signing_key("a1"))
            app = web.Application()
            app.router.add_get("/_matrix/key/v2/server", ks.keys)
            ks.url = await stack.enter_async_context(serving(app))
            servers[name] = ks
        yield servers


@pytest.fixture
async def kith_with_homeservers(kith_factory: KithFactory,
                                key_servers: dict[str, KeyServer]) -> RunningKith:
    # stranger.test: a homeserver that is down (nothing listens on that port).
    overrides = ", ".join([f"{ks.name}={ks.url}" for ks in key_servers.values()]
                          + [f"stranger.test=http://127.0.0.1:{free_port()}"])
    return await kith_factory({  # type: ignore[no-any-return]
        "general": {"server.aliases": "id.kith.test"},
        "http": {"federation.test_overrides": overrides}})


def signed_unbind(signer: KeyServer, body: dict[str, Any], destination_is: str | None,
                  origin: str | None = None) -> dict[str, str]:
    """Signed by kith's signer with no `destination=` in the header (older homeservers)."""
    header = sign_x_matrix_header(signer.key, origin or signer.name, None, "POST", UNBIND,
                                  body, destination_is=destination_is)
    return {"Authorization": header, "Content-Type": "application/json"}


def synapse_signed(*requests: UnbindToSign) -> list[dict[str, str]]:
    """The headers Synapse's identity handler sends with each unbind."""
    return [{"Authorization": header, "Content-Type": "application/json"}
            for header in synapse_auth_headers(list(requests))]


async def is_bound(kith: RunningKith, address: str) -> bool:
    services = kith.server.services
    assert services is not None
    return services.index.get(lookup_hash("email", address, services.lookup.pepper)) is not None


BODY = {"mxid": "@alice:hs.test", "threepid": {"medium": "email",
                                               "address": "alice@example.com"}}


@pytest.mark.parametrize(("signer", "destination_is"), [
    ("synapse", "kith.test"), ("synapse", "id.kith.test"),
    ("no destination in header", "kith.test"), ("no destination at all", None)])
async def test_homeserver_signed_unbind(kith_with_homeservers: RunningKith,
                                        key_servers: dict[str, KeyServer], signer: str,
                                        destination_is: str | None) -> None:
    kith = kith_with_homeservers
    hs = key_servers["hs.test"]
    await kith.bind("alice@example.com", "@alice:hs.test")
    assert await is_bound(kith, "alice@example.com")
    if signer == "synapse":
        assert destination_is is not None
        (headers,) = synapse_signed(UnbindToSign(hs.key, hs.name, BODY, destination_is))
    else:
        headers = signed_unbind(hs, BODY, destination_is)
    async with kith.http.post(kith.base + UNBIND, data=msgspec.json.encode(BODY),
                              headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {}
    assert not await is_bound(kith, "alice@example.com")


async def test_refused_signatures(kith_with_homeservers: RunningKith,
                                  key_servers: dict[str, KeyServer]) -> None:
    kith = kith_with_homeservers
    await kith.bind("alice@example.com", "@alice:hs.test")
    hs, other = key_servers["hs.test"], key_servers["other.test"]

    async def unbind(headers: dict[str, str], body: dict[str, Any] = BODY) -> tuple[int, str]:
        async with kith.http.post(kith.base + UNBIND, data=msgspec.json.encode(body),
                                  headers=headers) as resp:
            return resp.status, (await resp.json())["errcode"]

    tampered = {**BODY, "mxid": "@bob:hs.test"}
    elsewhere, wrong_body, impostor, not_its_user = synapse_signed(
        # Signed for another identity server.
        UnbindToSign(hs.key, hs.name, BODY, "elsewhere.test"),
        # Signed over a different body than the one sent.
        UnbindToSign(hs.key, hs.name, tampered, "kith.test"),
        # other.test claims to be hs.test: its key is not hs.test's.
        UnbindToSign(other.key, "hs.test", BODY, "kith.test"),
        # other.test signs correctly, but alice is not its user.
        UnbindToSign(other.key, other.name, BODY, "kith.test"))
    assert await unbind(elsewhere) == (401, "M_UNAUTHORIZED")
    assert await unbind(wrong_body) == (401, "M_UNAUTHORIZED")
    assert await unbind(impostor) == (401, "M_UNAUTHORIZED")
    assert await unbind(not_its_user) == (403, "M_FORBIDDEN")
    # The same forms from an older homeserver (no destination in the header).
    assert await unbind(signed_unbind(hs, BODY, "elsewhere.test")) == (401, "M_UNAUTHORIZED")
    assert await unbind(signed_unbind(other, BODY, "kith.test", origin="hs.test")) == (
        401, "M_UNAUTHORIZED")
    # Garbage header.
    assert await unbind({"Authorization": "X-Matrix nonsense"}) == (401, "M_UNAUTHORIZED")
    assert await is_bound(kith, "alice@example.com")


async def test_unknown_origin_server_is_refused_quickly(kith_with_homeservers: RunningKith,
                                                        key_servers: object) -> None:
    kith = kith_with_homeservers
    stranger = KeyServer("stranger.test", generate_signing_key("x"))
    body = {"mxid": "@s:stranger.test", "threepid": BODY["threepid"]}
    started = time.monotonic()
    async with kith.http.post(kith.base + UNBIND, data=msgspec.json.encode(body),
                              headers=signed_unbind(stranger, body, "kith.test")) as resp:
        assert resp.status == 401
    assert time.monotonic() - started < 10
