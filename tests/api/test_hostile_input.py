"""Input an attacker sends on purpose: each gets a Matrix JSON 4xx, never a 500, and no
error (with a traceback) in the log."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.conftest import KithFactory, RunningKith, free_port

V2 = "/_matrix/identity/v2"
V1 = "/_matrix/identity/api/v1"

# Every POST endpoint that decodes a JSON body, with a body it would otherwise accept
# the shape of.
JSON_ENDPOINTS: list[tuple[str, dict[str, Any]]] = [
    (f"{V2}/account/register", {"access_token": "x", "matrix_server_name": "hs.test"}),
    (f"{V2}/terms", {"user_accepts": ["https://example.org/tos"]}),
    (f"{V2}/lookup", {"algorithm": "none", "pepper": "p", "addresses": ["a@b.c email"]}),
    (f"{V2}/validate/email/requestToken",
     {"email": "a@b.c", "client_secret": "s", "send_attempt": 1}),
    (f"{V2}/validate/msisdn/requestToken",
     {"country": "GB", "phone_number": "07911123456", "client_secret": "s", "send_attempt": 1}),
    (f"{V2}/validate/email/submitToken", {"sid": "1", "client_secret": "s", "token": "t"}),
    (f"{V2}/3pid/bind", {"sid": "1", "client_secret": "s", "mxid": "@a:hs.test"}),
    (f"{V2}/3pid/unbind", {"mxid": "@a:hs.test",
                           "threepid": {"medium": "email", "address": "a@b.c"}}),
    (f"{V2}/store-invite", {"medium": "email", "address": "a@b.c", "room_id": "!r:hs.test",
                            "sender": "@a:hs.test"}),
    (f"{V2}/sign-ed25519", {"mxid": "@a:hs.test", "token": "t", "private_key": "k"}),
    (f"{V1}/bulk_lookup", {"threepids": [["email", "a@b.c"]]}),
]
DEEP = 100_000


@pytest.fixture
async def kith(kith_factory: KithFactory) -> RunningKith:
    """Mail and SMS go to closed loopback ports: sending fails, nothing leaves the host."""
    return await kith_factory(  # type: ignore[no-any-return]
        {"sms": {"base_url": f"http://127.0.0.1:{free_port()}"}})


@pytest.fixture
async def token(kith: RunningKith) -> str:
    return await kith.register("alice")


async def post(kith: RunningKith, path: str, data: bytes, token: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with kith.http.post(kith.base + path, data=data, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            **(headers or {})}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


def with_value(body: dict[str, Any], raw_value: bytes) -> bytes:
    """`body` as JSON with one more field, `x`, whose value is `raw_value` as given."""
    return b'{"x": ' + raw_value + b", " + repr_json(body)[1:]


def repr_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.mark.parametrize(("path", "body"), JSON_ENDPOINTS, ids=[p for p, _ in JSON_ENDPOINTS])
async def test_invalid_utf8_inside_a_json_string(kith: RunningKith, token: str, path: str,
                                                 body: dict[str, Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    first_field = next(iter(body))
    in_a_field_read = repr_json({**body, first_field: "\0"}).replace(b"\\u0000", b"a\xff\xfeb")
    cut_sequence = repr_json({**body, first_field: "\0"}).replace(b"\\u0000", b"a\xc3")
    for raw in (in_a_field_read, cut_sequence):
        status, answer = await post(kith, path, raw, token)
        # (M_INVALID_PARAM where the field is not a string: its type is wrong first.)
        assert status == 400 and answer["errcode"] in ("M_NOT_JSON", "M_INVALID_PARAM"), (
            raw[:40], answer)
    # In a field kith skips unread, it answers what the rest of the request deserves.
    status, answer = await post(kith, path, with_value(body, b'"a\xff\xfeb"'), token)
    assert answer.get("errcode") != "M_UNKNOWN", answer
    no_errors_logged(caplog)


@pytest.mark.parametrize(("path", "body"), JSON_ENDPOINTS, ids=[p for p, _ in JSON_ENDPOINTS])
async def test_deeply_nested_arrays(kith: RunningKith, token: str, path: str,
                                    body: dict[str, Any],
                                    caplog: pytest.LogCaptureFixture) -> None:
    nested = b"[" * DEEP + b"]" * DEEP
    first_field = next(iter(body))
    for raw in (with_value(body, nested),  # in a field kith does not read
                repr_json({**body, first_field: 0}).replace(b"0", nested, 1),  # in one it does
                nested):  # the whole body
        status, answer = await post(kith, path, raw, token)
        assert 400 <= status < 500 and answer["errcode"] in (
            "M_BAD_JSON", "M_INVALID_PARAM", "M_NOT_JSON"), (path, status, answer)
    no_errors_logged(caplog)


async def test_homeserver_signed_unbind_with_deep_content(
        kith: RunningKith, caplog: pytest.LogCaptureFixture) -> None:
    """Nesting deep enough to decode, and then to stop a canonical JSON encoder."""
    body = {"mxid": "@a:hs.test", "threepid": {"medium": "email", "address": "a@b.c"}}
    for depth in (900, 5000, DEEP):
        raw = with_value(body, b"[" * depth + b"]" * depth)
        async with kith.http.post(kith.base + f"{V2}/3pid/unbind", data=raw, headers={
                "Authorization": 'X-Matrix origin="hs.test",key="ed25519:a",sig="AAAA"',
                "Content-Type": "application/json"}) as resp:
            answer = await resp.json()
            assert 400 <= resp.status < 500, (depth, answer)
    no_errors_logged(caplog)


@pytest.mark.parametrize("sid", ["9223372036854775808", "9999999999999999999", "0" * 19 + "1",
                                 "1\n", "-1", "١"])
async def test_sids_out_of_range_find_no_session(kith: RunningKith, token: str, sid: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with kith.http.get(kith.base + f"{V2}/3pid/getValidated3pid",
                             params={"sid": sid, "client_secret": "s"},
                             headers={"Authorization": f"Bearer {token}"}) as resp:
        assert (resp.status, (await resp.json())["errcode"]) == (404, "M_NO_VALID_SESSION")
    for path in (f"{V2}/validate/email/submitToken", f"{V2}/3pid/bind"):
        for value in (sid, int(sid) if sid.strip().lstrip("-").isascii()
                      and sid.strip().lstrip("-").isdigit() else sid):
            body = {"sid": value, "client_secret": "s", "token": "t", "mxid": "@alice:hs.test"}
            status, answer = await post(kith, path, repr_json(body), token)
            assert (status, answer["errcode"]) == (404, "M_NO_VALID_SESSION"), (path, value)
    no_errors_logged(caplog)
