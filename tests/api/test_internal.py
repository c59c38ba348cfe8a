"""The internal bind/unbind API: signed associations, bad inputs, and its own listener."""

from __future__ import annotations

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from tests.conftest import RunningKith

INTERNAL = "/_matrix/identity/internal"


async def test_bind_answers_a_signed_association(kith: RunningKith) -> None:
    signed = await kith.bind("alice@example.com", "@alice:hs.test")
    assert {k: signed[k] for k in ("address", "medium", "mxid")} == {
        "address": "alice@example.com", "medium": "email", "mxid": "@alice:hs.test"}
    assert signed["not_before"] == signed["ts"]
    assert signed["not_after"] > signed["ts"]
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/pubkey/ed25519:0") as resp:
        public_key = (await resp.json())["public_key"]
    verify_key = decode_verify_key_bytes("ed25519:0", decode_base64(public_key))
    verify_signed_json(signed, "kith.test", verify_key)


async def test_internal_api_is_not_on_the_client_port(kith: RunningKith) -> None:
    async with kith.http.post(f"{kith.base}{INTERNAL}/bind", json={
            "medium": "email", "address": "a@b.c", "mxid": "@a:hs.test"}) as resp:
        assert resp.status == 404


async def test_unbind_of_someone_else_changes_nothing(kith: RunningKith) -> None:
    await kith.bind("alice@example.com", "@alice:hs.test")
    async with kith.http.post(f"{kith.internal}{INTERNAL}/unbind", json={
            "medium": "email", "address": "alice@example.com",
            "mxid": "@mallory:hs.test"}) as resp:
        assert resp.status == 200
    assert kith.server.services is not None
    assert len(kith.server.services.index) == 1


@pytest.mark.parametrize("body,errcode", [
    ({}, "M_MISSING_PARAMS"),
    ({"medium": "email", "address": "a@b.c"}, "M_MISSING_PARAMS"),
    ({"medium": "email", "mxid": "@a:b.c"}, "M_MISSING_PARAMS"),
    ({"medium": "email", "address": 5, "mxid": "@a:b.c"}, "M_INVALID_PARAM"),
    ({"medium": "fax", "address": "123", "mxid": "@a:b.c"}, "M_INVALID_PARAM"),
    ({"medium": "email", "address": "not-an-email", "mxid": "@a:b.c"}, "M_INVALID_PARAM"),
    ({"medium": "msisdn", "address": "12ab", "mxid": "@a:b.c"}, "M_INVALID_PARAM"),
    ({"medium": "email", "address": "a@b.c", "mxid": "alice"}, "M_INVALID_PARAM"),
    ({"medium": "email", "address": "a@b.c", "mxid": "@alice:bad host!"}, "M_INVALID_PARAM"),
    (["x"], "M_BAD_JSON"),
])
@pytest.mark.parametrize("op", ["bind", "unbind"])
async def test_bad_bodies(kith: RunningKith, op: str, body: object, errcode: str) -> None:
    async with kith.http.post(f"{kith.internal}{INTERNAL}/{op}", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == errcode


async def test_not_json(kith: RunningKith) -> None:
    async with kith.http.post(f"{kith.internal}{INTERNAL}/bind", data=b"{{") as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == "M_NOT_JSON"


async def test_wrong_method(kith: RunningKith) -> None:
    async with kith.http.get(f"{kith.internal}{INTERNAL}/bind") as resp:
        assert resp.status == 405
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"
