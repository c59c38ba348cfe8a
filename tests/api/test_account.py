"""account/register against a homeserver stand-in, /account, /account/logout."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Homeserver, KithFactory, RunningKith, free_port, serving

V2 = "/_matrix/identity/v2"


async def register(kith: RunningKith, body: object) -> tuple[int, dict[str, Any]]:
    async with kith.http.post(f"{kith.base}{V2}/account/register", json=body) as resp:
        return resp.status, await resp.json()


async def test_register_then_account_then_logout(kith: RunningKith) -> None:
    token = await kith.register("alice")
    auth = {"Authorization": f"Bearer {token}"}
    async with kith.http.get(f"{kith.base}{V2}/account", headers=auth) as resp:
        assert resp.status == 200
        assert await resp.json() == {"user_id": "@alice:hs.test"}
    async with kith.http.post(f"{kith.base}{V2}/account/logout", headers=auth) as resp:
        assert (resp.status, await resp.json()) == (200, {})
    async with kith.http.get(f"{kith.base}{V2}/account", headers=auth) as resp:
        assert resp.status == 401
        assert (await resp.json())["errcode"] == "M_UNAUTHORIZED"
    async with kith.http.post(f"{kith.base}{V2}/account/logout", headers=auth) as resp:
        assert resp.status == 401


async def test_token_in_query_string_is_accepted(kith: RunningKith) -> None:
    token = await kith.register("alice")
    async with kith.http.get(f"{kith.base}{V2}/account",
                             params={"access_token": token}) as resp:
        assert resp.status == 200


async def test_query_string_token_can_be_turned_off(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"access_token.query_param": "false"}})
    token = await kith.register("alice")
    async with kith.http.get(f"{kith.base}{V2}/account",
                             params={"access_token": token}) as resp:
        assert resp.status == 401


async def test_the_token_is_stored_only_as_a_hash(kith: RunningKith) -> None:
    token = await kith.register("alice")
    data = open(kith.config.db.file, "rb").read()
    wal = kith.config.db.file + "-wal"
    try:
        data += open(wal, "rb").read()
    except FileNotFoundError:
        pass
    assert token.encode() not in data


@pytest.mark.parametrize("header", [
    None, "Bearer", "Bearer nope", "Basic abc", "bearer ", "Token x",
])
async def test_bad_or_missing_token_is_401(kith: RunningKith, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, path in (("GET", "account"), ("POST", "account/logout"),
                         ("GET", "hash_details"), ("POST", "lookup"), ("POST", "terms")):
        async with kith.http.request(method, f"{kith.base}{V2}/{path}", headers=headers,
                                     json={}) as resp:
            assert resp.status == 401, (method, path)
            assert (await resp.json())["errcode"] == "M_UNAUTHORIZED"


async def test_openid_token_rejected_by_homeserver_is_401(kith: RunningKith) -> None:
    status, body = await register(kith, {"access_token": "forged", "token_type": "Bearer",
                                         "matrix_server_name": "hs.test", "expires_in": 60})
    assert status == 401 and body["errcode"] == "M_UNAUTHORIZED"


async def test_sub_of_another_server_is_refused(kith: RunningKith) -> None:
    kith.homeserver.tokens["evil"] = "@mallory:other.test"
    status, body = await register(kith, {"access_token": "evil",
                                         "matrix_server_name": "hs.test"})
    assert status == 401 and body["errcode"] == "M_UNAUTHORIZED"


async def test_sub_that_is_not_a_user_id_is_refused(kith: RunningKith) -> None:
    kith.homeserver.tokens["junk"] = "not a user id"
    status, body = await register(kith, {"access_token": "junk",
                                         "matrix_server_name": "hs.test"})
    assert status == 401


async def test_server_name_with_port(kith_factory: KithFactory) -> None:
    kith = await kith_factory()
    kith.homeserver.server_name = "127.0.0.1:8448"
    openid = kith.homeserver.issue("bob")
    # Not reachable on 8448 without an override: the stand-in must be named explicitly.
    kith2 = await kith_factory(
        {"http": {"federation.test_overrides": f"127.0.0.1:8448={kith.homeserver.url}"}},
        name="second")
    status, body = await register(kith2, {"access_token": openid,
                                          "matrix_server_name": "127.0.0.1:8448"})
    assert status == 200, body
    async with kith2.http.get(f"{kith2.base}{V2}/account",
                              headers={"Authorization": f"Bearer {body['token']}"}) as resp:
        assert await resp.json() == {"user_id": "@bob:127.0.0.1:8448"}


async def test_homeserver_down_gives_a_clear_error_quickly(kith_factory: KithFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    kith = await kith_factory({"http": {"federation.test_overrides": f"hs.test={dead}"}})
    started = time.monotonic()
    status, body = await register(kith, {"access_token": "x", "matrix_server_name": "hs.test"})
    assert status == 502 and body["errcode"] == "M_UNKNOWN"
    assert time.monotonic() - started < 5


async def test_homeserver_that_hangs_times_out(kith: RunningKith) -> None:
    kith.homeserver.delay_s = 30
    token = kith.homeserver.issue("slow")
    started = time.monotonic()
    status, body = await register(kith, {"access_token": token,
                                         "matrix_server_name": "hs.test"})
    assert status == 502 and body["errcode"] == "M_UNKNOWN"
    assert time.monotonic() - started < 6  # federation.timeout = 2 in tests


async def test_redirect_is_not_followed(kith_factory: KithFactory,
                                       homeserver: Homeserver) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(homeserver.url + request.path_qs)

    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", redirect)
    async with serving(app) as url:
        kith = await kith_factory({"http": {"federation.test_overrides": f"hs.test={url}"}})
        token = homeserver.issue("alice")
        status, body = await register(kith, {"access_token": token,
                                             "matrix_server_name": "hs.test"})
        assert status == 502 and body["errcode"] == "M_UNKNOWN"
        assert homeserver.calls == 0


async def test_private_address_refused_without_whitelist(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"ip.whitelist": ""}})
    token = kith.homeserver.issue("alice")
    status, body = await register(kith, {"access_token": token,
                                         "matrix_server_name": "hs.test"})
    assert status == 502 and body["errcode"] == "M_UNKNOWN"
    assert kith.homeserver.calls == 0


async def test_homeserver_allow_list(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"homeserver_allow_list": "other.test",
                                           "enable_v1_access": "false"}})
    token = kith.homeserver.issue("alice")
    status, body = await register(kith, {"access_token": token,
                                         "matrix_server_name": "hs.test"})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    assert kith.homeserver.calls == 0


@pytest.mark.parametrize("body,errcode", [
    ({}, "M_MISSING_PARAMS"),
    ({"access_token": "x"}, "M_MISSING_PARAMS"),
    ({"matrix_server_name": "hs.test"}, "M_MISSING_PARAMS"),
    ({"access_token": 1, "matrix_server_name": "hs.test"}, "M_INVALID_PARAM"),
    ({"access_token": "x", "matrix_server_name": ["hs.test"]}, "M_INVALID_PARAM"),
    ({"access_token": "x", "matrix_server_name": "bad name!"}, "M_INVALID_PARAM"),
    ({"access_token": "x", "matrix_server_name": "hs.test", "expires_in": "soon"},
     "M_INVALID_PARAM"),
    ([], "M_BAD_JSON"),
    ("a string", "M_BAD_JSON"),
])
async def test_register_bad_bodies(kith: RunningKith, body: object, errcode: str) -> None:
    status, answer = await register(kith, body)
    assert (status, answer["errcode"]) == (400, errcode)
    assert kith.homeserver.calls == 0


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe", b'{"a": }'])
async def test_register_not_json(kith: RunningKith, raw: bytes) -> None:
    async with kith.http.post(f"{kith.base}{V2}/account/register", data=raw,
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == "M_NOT_JSON"
