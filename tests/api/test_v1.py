"""The legacy v1 API (Identity Service r0.3.0): served when enable_v1_access is on."""

from __future__ import annotations

import pytest

from tests.conftest import KithFactory, RunningKith

V1 = "/_matrix/identity/api/v1"

V1_ROUTES = [
    ("GET", ""),
    ("POST", "validate/email/requestToken"), ("POST", "validate/email/submitToken"),
    ("GET", "validate/email/submitToken"), ("POST", "validate/msisdn/requestToken"),
    ("POST", "validate/msisdn/submitToken"), ("GET", "validate/msisdn/submitToken"),
    ("POST", "3pid/bind"), ("POST", "3pid/unbind"), ("GET", "3pid/getValidated3pid"),
    ("GET", "lookup"), ("POST", "bulk_lookup"), ("GET", "pubkey/ed25519:0"),
    ("GET", "pubkey/isvalid"), ("GET", "pubkey/ephemeral/isvalid"),
    ("POST", "store-invite"), ("POST", "sign-ed25519"),
]


@pytest.mark.parametrize("method,path", V1_ROUTES)
async def test_v1_off_means_404_everywhere(kith_factory: KithFactory, method: str,
                                           path: str) -> None:
    kith = await kith_factory({"general": {"enable_v1_access": "false"}})
    url = f"{kith.base}{V1}/{path}" if path else f"{kith.base}{V1}"
    async with kith.http.request(method, url, json={}) as resp:
        assert resp.status == 404
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


async def test_v1_status_check(kith: RunningKith) -> None:
    """Identity Service r0.3.0's "is this an identity server" check, as Sydent serves it."""
    async with kith.http.get(f"{kith.base}{V1}") as resp:
        assert (resp.status, await resp.json()) == (200, {})
        assert resp.content_type == "application/json"


async def test_v1_lookup_and_bulk_lookup_need_no_token(kith: RunningKith) -> None:
    await kith.bind("alice@example.com", "@alice:hs.test")
    await kith.bind("15555550100", "@bob:hs.test", medium="msisdn")
    async with kith.http.get(f"{kith.base}{V1}/lookup",
                             params={"medium": "email", "address": "alice@example.com"}) as r:
        signed = await r.json()
    assert r.status == 200
    assert (signed["mxid"], signed["address"]) == ("@alice:hs.test", "alice@example.com")
    assert "kith.test" in signed["signatures"]
    async with kith.http.get(f"{kith.base}{V1}/lookup",
                             params={"medium": "email", "address": "x@example.com"}) as r:
        assert (r.status, await r.json()) == (200, {})
    async with kith.http.post(f"{kith.base}{V1}/bulk_lookup", json={"threepids": [
            ["email", "alice@example.com"], ["msisdn", "15555550100"],
            ["email", "nobody@example.com"]]}) as r:
        assert await r.json() == {"threepids": [
            ["email", "alice@example.com", "@alice:hs.test"],
            ["msisdn", "15555550100", "@bob:hs.test"]]}


async def test_v1_pubkey(kith: RunningKith) -> None:
    async with kith.http.get(f"{kith.base}{V1}/pubkey/ed25519:0") as r:
        key = (await r.json())["public_key"]
    async with kith.http.get(f"{kith.base}{V1}/pubkey/isvalid",
                             params={"public_key": key}) as r:
        assert await r.json() == {"valid": True}


async def test_v1_bind_off_without_v1_associations(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"enable_v1_associations": "false"}})
    async with kith.http.post(f"{kith.base}{V1}/3pid/bind", json={}) as r:
        assert r.status == 404
    async with kith.http.get(f"{kith.base}{V1}/lookup",
                             params={"medium": "email", "address": "a@b.c"}) as r:
        assert r.status == 200


@pytest.mark.parametrize("params,errcode", [
    ({}, "M_MISSING_PARAMS"), ({"medium": "email"}, "M_MISSING_PARAMS"),
    ({"address": "a@b.c"}, "M_MISSING_PARAMS"),
])
async def test_v1_lookup_bad_queries(kith: RunningKith, params: dict[str, str],
                                     errcode: str) -> None:
    async with kith.http.get(f"{kith.base}{V1}/lookup", params=params) as r:
        assert (r.status, (await r.json())["errcode"]) == (400, errcode)


async def test_v1_lookup_unknown_medium_finds_nothing(kith: RunningKith) -> None:
    async with kith.http.get(f"{kith.base}{V1}/lookup",
                             params={"medium": "fax", "address": "1"}) as r:
        assert (r.status, await r.json()) == (200, {})


@pytest.mark.parametrize("body,errcode", [
    ({}, "M_MISSING_PARAMS"), ({"threepids": "email"}, "M_INVALID_PARAM"),
    ({"threepids": [["email"]]}, "M_INVALID_PARAM"),
    ({"threepids": [[1, 2]]}, "M_INVALID_PARAM"), ([], "M_BAD_JSON"),
])
async def test_v1_bulk_lookup_bad_bodies(kith: RunningKith, body: object,
                                         errcode: str) -> None:
    async with kith.http.post(f"{kith.base}{V1}/bulk_lookup", json=body) as r:
        assert (r.status, (await r.json())["errcode"]) == (400, errcode)


async def test_v1_bulk_lookup_limit(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"address_lookup_limit": 2}})
    async with kith.http.post(f"{kith.base}{V1}/bulk_lookup", json={"threepids": [
            ["email", "a@b.c"], ["email", "b@b.c"], ["email", "c@b.c"]]}) as r:
        assert (r.status, (await r.json())["errcode"]) == (400, "M_TOO_LARGE")
