"""bind and unbind through validation sessions, end to end with a real SMTP server."""

from __future__ import annotations

from typing import Any

import pytest

from kith.threepid import lookup_hash
from tests.api.test_validation import (
    SECRET,
    call,
    mailed_token,
    request_email,
    submit,
)
from tests.conftest import KithFactory, RunningKith, SmtpSink

ALICE = "@alice:hs.test"


@pytest.fixture
async def mail_kith(kith_factory: KithFactory, smtp: SmtpSink) -> RunningKith:
    return await kith_factory(  # type: ignore[no-any-return]
        {"email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}})


async def validated_session(kith: RunningKith, token: str, smtp: SmtpSink,
                            email: str = "alice@example.com",
                            secret: str = SECRET) -> str:
    status, body = await request_email(kith, token, email=email, secret=secret)
    assert status == 200, body
    assert await submit(kith, token, body["sid"], mailed_token(smtp), secret) == (
        200, {"success": True})
    return str(body["sid"])


async def sha256_lookup(kith: RunningKith, token: str, address: str) -> dict[str, Any]:
    _, details = await call(kith, token, "GET", "/hash_details")
    h = lookup_hash("email", address, details["lookup_pepper"])
    status, body = await call(kith, token, "POST", "/lookup", {
        "algorithm": "sha256", "pepper": details["lookup_pepper"], "addresses": [h]})
    assert status == 200
    return dict(body["mappings"])


def unbind_body(sid: str | None, address: str = "alice@example.com",
                mxid: str = ALICE) -> dict[str, Any]:
    body: dict[str, Any] = {"mxid": mxid,
                            "threepid": {"medium": "email", "address": address}}
    if sid is not None:
        body |= {"sid": sid, "client_secret": SECRET}
    return body


async def test_bind_lookup_unbind(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = await validated_session(mail_kith, token, smtp, email="Alice@Example.com")
    status, signed = await call(mail_kith, token, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": ALICE})
    assert status == 200, signed
    assert signed["address"] == "alice@example.com" and signed["mxid"] == ALICE
    assert signed["medium"] == "email" and "kith.test" in signed["signatures"]
    assert await sha256_lookup(mail_kith, token, "alice@example.com") != {}
    status, body = await call(mail_kith, token, "POST", "/3pid/unbind",
                              unbind_body(sid, "ALICE@example.com"))
    assert (status, body) == (200, {})
    assert await sha256_lookup(mail_kith, token, "alice@example.com") == {}


async def test_bind_for_another_user_is_forbidden(mail_kith: RunningKith,
                                                  smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = await validated_session(mail_kith, token, smtp)
    status, body = await call(mail_kith, token, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": "@mallory:hs.test"})
    assert (status, body["errcode"]) == (403, "M_UNAUTHORIZED")
    assert await sha256_lookup(mail_kith, token, "alice@example.com") == {}


async def test_bind_needs_a_validated_session(mail_kith: RunningKith,
                                              smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    status, body = await call(mail_kith, token, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": ALICE})
    assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")
    status, body = await call(mail_kith, token, "POST", "/3pid/bind", {
        "sid": "424242", "client_secret": SECRET, "mxid": ALICE})
    assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_unbind_needs_a_validated_session_for_that_threepid(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    await mail_kith.bind("alice@example.com", ALICE)
    await mail_kith.bind("other@example.com", ALICE)
    unvalidated = (await request_email(mail_kith, token, secret="pending"))[1]["sid"]
    sid = await validated_session(mail_kith, token, smtp)
    refused = [
        unbind_body(None),
        {**unbind_body(unvalidated), "client_secret": "pending"},
        unbind_body(sid, address="other@example.com"),
        unbind_body(sid, mxid="@mallory:hs.test"),
        unbind_body("999999"),
    ]
    for body in refused:
        status, answer = await call(mail_kith, token, "POST", "/3pid/unbind", body)
        assert (status, answer["errcode"]) == (403, "M_FORBIDDEN"), body
    assert await sha256_lookup(mail_kith, token, "alice@example.com") == {
        lookup_key(await pepper(mail_kith, token), "alice@example.com"): ALICE}
    assert (await call(mail_kith, token, "POST", "/3pid/unbind", unbind_body(sid)))[0] == 200
    assert await sha256_lookup(mail_kith, token, "alice@example.com") == {}
    assert await sha256_lookup(mail_kith, token, "other@example.com") != {}


async def pepper(kith: RunningKith, token: str) -> str:
    return str((await call(kith, token, "GET", "/hash_details"))[1]["lookup_pepper"])


def lookup_key(pepper: str, address: str) -> str:
    return lookup_hash("email", address, pepper)
