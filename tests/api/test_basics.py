"""versions, status, pubkey, and the rules every route follows (errors, CORS, limits)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from signedjson.key import decode_verify_key_bytes
from unpaddedbase64 import decode_base64

from tests.conftest import KithFactory, RunningKith

V2 = "/_matrix/identity/v2"


async def get(kith: RunningKith, path: str,
              **kw: object) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with kith.http.get(kith.base + path, **kw) as resp:  # type: ignore[arg-type]
        assert resp.headers["Content-Type"] == "application/json"
        return resp.status, await resp.json(), dict(resp.headers)


async def test_versions_lists_v1_1_to_v1_19(kith: RunningKith) -> None:
    status, body, _ = await get(kith, "/_matrix/identity/versions")
    assert status == 200
    assert body["versions"][0] == "v1.1" and body["versions"][-1] == "v1.19"
    assert len(body["versions"]) == 19


async def test_status_check(kith: RunningKith) -> None:
    assert (await get(kith, V2))[:2] == (200, {})


async def test_pubkey_is_the_configured_signing_key(kith: RunningKith) -> None:
    status, body, _ = await get(kith, f"{V2}/pubkey/ed25519:0")
    assert status == 200
    # An ed25519 public key: 32 bytes in unpadded standard base64.
    decode_verify_key_bytes("ed25519:0", decode_base64(body["public_key"]))
    assert kith.server.services is not None
    assert body["public_key"] == kith.server.services.keys.public_key
    status, valid, _ = await get(kith, f"{V2}/pubkey/isvalid",
                                 params={"public_key": body["public_key"]})
    assert (status, valid) == (200, {"valid": True})
    status, valid, _ = await get(kith, f"{V2}/pubkey/isvalid", params={"public_key": "AAAA"})
    assert (status, valid) == (200, {"valid": False})


async def test_unknown_key_is_404_not_found(kith: RunningKith) -> None:
    status, body, _ = await get(kith, f"{V2}/pubkey/ed25519:1")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"


async def test_isvalid_needs_public_key(kith: RunningKith) -> None:
    for path in ("pubkey/isvalid", "pubkey/ephemeral/isvalid"):
        status, body, _ = await get(kith, f"{V2}/{path}")
        assert status == 400 and body["errcode"] == "M_MISSING_PARAMS"


async def test_ephemeral_isvalid_false_without_invites(kith: RunningKith) -> None:
    status, body, _ = await get(kith, f"{V2}/pubkey/ephemeral/isvalid",
                                params={"public_key": "abc"})
    assert (status, body) == (200, {"valid": False})


@pytest.mark.parametrize("path", ["/", "/_matrix/identity/v3", f"{V2}/nope",
                                  "/_matrix/identity/api/v1/nope", f"{V2}/lookup/extra"])
async def test_unknown_path_is_404_unrecognized(kith: RunningKith, path: str) -> None:
    status, body, headers = await get(kith, path)
    assert status == 404 and body["errcode"] == "M_UNRECOGNIZED"
    assert headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("method,path", [
    ("POST", "/_matrix/identity/versions"), ("PUT", f"{V2}/lookup"), ("GET", f"{V2}/lookup"),
    ("DELETE", f"{V2}/terms"), ("PATCH", f"{V2}/account"), ("GET", f"{V2}/account/register"),
    ("TRACE", f"{V2}/hash_details"), ("QUERY", f"{V2}/lookup"),
])
async def test_wrong_method_is_405_unrecognized(kith: RunningKith, method: str,
                                                path: str) -> None:
    async with kith.http.request(method, kith.base + path) as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"] == "application/json"
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


@pytest.mark.parametrize("path", [f"{V2}/lookup", f"{V2}/account/register", "/anything"])
async def test_cors_preflight(kith: RunningKith, path: str) -> None:
    async with kith.http.options(kith.base + path, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]


async def test_cors_on_ordinary_answers(kith: RunningKith) -> None:
    _, _, headers = await get(kith, "/_matrix/identity/versions")
    assert headers["Access-Control-Allow-Origin"] == "*"
    async with kith.http.get(f"{kith.base}{V2}/validate/email/submitToken", params={
            "sid": "1", "client_secret": "abc", "token": "nope"}) as resp:
        assert (resp.status, resp.content_type) == (400, "text/html")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_oversized_body_is_refused_with_413(kith: RunningKith) -> None:
    body = b'{"addresses": ["' + b"a" * (600 * 1024) + b'"]}'
    async with kith.http.post(f"{kith.base}{V2}/account/register", data=body,
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert (await resp.json())["errcode"] == "M_TOO_LARGE"


async def raw_answer(kith: RunningKith, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send `request` in one write on a new connection: (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return status, json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    finally:
        writer.close()


async def test_a_chunked_body_that_arrives_whole_is_held_to_the_limit(
        kith_factory: KithFactory) -> None:
    """A body without a Content-Length that arrives with its head is refused past the
    limit too (kith takes such a body straight from aiohttp's buffer)."""
    kith = await kith_factory({"http": {"client.max_body_bytes": 1024}})
    body = b'{"x": "' + b"a" * 2000 + b'"}'
    head = (f"POST {V2}/account/register HTTP/1.1\r\nHost: kith.test\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (body[:700], body[700:])) + b"0\r\n\r\n"
    status, answer = await raw_answer(kith, head + chunked)
    assert (status, answer["errcode"]) == (413, "M_TOO_LARGE")
    # under the limit, the same way: read whole (the body is no JSON object: 400)
    small = b"%x\r\n[1]\r\n0\r\n\r\n" % 3
    status, answer = await raw_answer(kith, head + small)
    assert (status, answer["errcode"]) == (400, "M_BAD_JSON")


async def test_a_gzip_compressed_body_is_read_uncompressed(kith: RunningKith) -> None:
    body = gzip.compress(b'{"access_token": 5}')
    async with kith.http.post(f"{kith.base}{V2}/account/register", data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
        # decompressed and decoded: the token's type is what is wrong
        assert resp.status == 400
        assert (await resp.json())["errcode"] in ("M_INVALID_PARAM", "M_MISSING_PARAMS")


async def test_oversized_chunked_body_is_refused_with_413(kith: RunningKith) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 10240

    async with kith.http.post(f"{kith.base}{V2}/account/register", data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["errcode"] == "M_TOO_LARGE"
