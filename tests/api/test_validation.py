"""Validation sessions against a real SMTP server (aiosmtpd) and an OpenMarket stand-in."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from kith.services.validation import SESSION_LIFETIME_MS
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, OpenMarket, RunningKith, SmtpSink, serving
from tests.delivery import conftest as delivery_fixtures
from tests.delivery.conftest import SmtpFactory
from tests.federation.conftest import TestPki

V2 = "/_matrix/identity/v2"
SECRET = "monkeys_are_GREAT"


@pytest.fixture
async def mail_kith(kith_factory: KithFactory, smtp: SmtpSink) -> RunningKith:
    return await kith_factory(mail_sections(smtp))  # type: ignore[no-any-return]


def mail_sections(smtp: SmtpSink) -> dict[str, dict[str, Any]]:
    return {"email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}}


async def call(kith: RunningKith, token: str | None, method: str, path: str,
               body: Any = None, *, data: bytes | None = None,
               params: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with kith.http.request(method, f"{kith.base}{V2}{path}", json=body, data=data,
                                 params=params, headers=headers,
                                 allow_redirects=False) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def request_email(kith: RunningKith, token: str, email: str = "alice@example.com",
                        send_attempt: int | str = 1, secret: str = SECRET,
                        **extra: Any) -> tuple[int, Any]:
    return await call(kith, token, "POST", "/validate/email/requestToken", {
        "client_secret": secret, "email": email, "send_attempt": send_attempt, **extra})


def mailed_token(smtp: SmtpSink, index: int = -1) -> str:
    match = re.search(r"token=([A-Za-z0-9]{32})", smtp.messages[index][1])
    assert match, smtp.messages[index][1]
    return match.group(1)


async def submit(kith: RunningKith, token: str, sid: str, code: str,
                 secret: str = SECRET) -> tuple[int, Any]:
    return await call(kith, token, "POST", "/validate/email/submitToken",
                      {"sid": sid, "client_secret": secret, "token": code})


async def validated(kith: RunningKith, token: str, sid: str,
                    secret: str = SECRET) -> tuple[int, Any]:
    return await call(kith, token, "GET", "/3pid/getValidated3pid",
                      params={"sid": sid, "client_secret": secret})


async def test_email_validation_mails_a_token_and_validates(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await request_email(mail_kith, token)
    assert status == 200, body
    sid = body["sid"]
    assert isinstance(sid, str)
    assert len(smtp.messages) == 1 and smtp.messages[0][0] == ["alice@example.com"]
    assert f"{V2}/validate/email/submitToken" in smtp.messages[0][1]
    code = mailed_token(smtp)
    assert (await validated(mail_kith, token, sid))[1]["errcode"] == "M_SESSION_NOT_VALIDATED"
    assert await submit(mail_kith, token, sid, code) == (200, {"success": True})
    status, body = await validated(mail_kith, token, sid)
    assert status == 200
    assert body["medium"] == "email" and body["address"] == "alice@example.com"
    assert abs(body["validated_at"] - time.time() * 1000) < 60_000


async def test_same_send_attempt_does_not_send_again(mail_kith: RunningKith,
                                                     smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    first = (await request_email(mail_kith, token, send_attempt=1))[1]["sid"]
    assert (await request_email(mail_kith, token, send_attempt=1))[1]["sid"] == first
    assert (await request_email(mail_kith, token, send_attempt=0))[1]["sid"] == first
    assert len(smtp.messages) == 1
    assert (await request_email(mail_kith, token, send_attempt=2))[1]["sid"] == first
    assert len(smtp.messages) == 2
    assert mailed_token(smtp, 0) == mailed_token(smtp, 1)
    other = (await request_email(mail_kith, token, secret="another-secret"))[1]["sid"]
    assert other != first and len(smtp.messages) == 3


async def test_send_attempt_as_a_string_of_digits(mail_kith: RunningKith,
                                                  smtp: SmtpSink) -> None:
    """As matrix-js-sdk sends it: "1", then "1" again (no second mail), then "2"."""
    token = await mail_kith.register("alice")
    status, body = await request_email(mail_kith, token, send_attempt="1")
    assert status == 200, body
    first = body["sid"]
    assert (await request_email(mail_kith, token, send_attempt=1))[1]["sid"] == first
    assert (await request_email(mail_kith, token, send_attempt="1"))[1]["sid"] == first
    assert len(smtp.messages) == 1
    assert (await request_email(mail_kith, token, send_attempt="02"))[1]["sid"] == first
    assert len(smtp.messages) == 2


async def test_email_is_casefolded(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token, email="Alice@Example.COM"))[1]["sid"]
    assert smtp.messages[0][0] == ["alice@example.com"]
    assert (await request_email(mail_kith, token, email="ALICE@example.com"))[1]["sid"] == sid
    await submit(mail_kith, token, sid, mailed_token(smtp))
    assert (await validated(mail_kith, token, sid))[1]["address"] == "alice@example.com"


async def test_wrong_tokens_are_refused_and_bounded(mail_kith: RunningKith,
                                                    smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    code = mailed_token(smtp)
    for _ in range(10):
        status, body = await submit(mail_kith, token, sid, "x" * 32)
        assert (status, body["errcode"]) == (400, "M_TOKEN_INCORRECT")
    status, body = await submit(mail_kith, token, sid, code)
    assert (status, body["errcode"]) == (400, "M_TOKEN_INCORRECT")
    assert (await validated(mail_kith, token, sid))[1]["errcode"] == "M_SESSION_NOT_VALIDATED"
    # Asking again starts a fresh session with a new token.
    new_sid = (await request_email(mail_kith, token, send_attempt=1))[1]["sid"]
    assert new_sid != sid and len(smtp.messages) == 2
    assert await submit(mail_kith, token, new_sid, mailed_token(smtp)) == (
        200, {"success": True})


async def test_unknown_session(mail_kith: RunningKith) -> None:
    token = await mail_kith.register("alice")
    for sid in ("12345", "not-a-number", "9" * 40):
        status, body = await submit(mail_kith, token, sid, "x")
        assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")
        status, body = await validated(mail_kith, token, sid)
        assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_wrong_client_secret(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    status, body = await submit(mail_kith, token, sid, mailed_token(smtp), secret="other")
    assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_expired_session(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    code = mailed_token(smtp)
    store = mail_kith.server.store
    assert store is not None
    old = int(time.time() * 1000) - SESSION_LIFETIME_MS - 1000
    await store.sessions.touch(int(sid), old)
    status, body = await submit(mail_kith, token, sid, code)
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")
    # validated, then left for a day: no longer usable for bind
    sid = (await request_email(mail_kith, token, send_attempt=1))[1]["sid"]
    await submit(mail_kith, token, sid, mailed_token(smtp))
    await store.sessions.touch(int(sid), old)
    status, body = await validated(mail_kith, token, sid)
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")
    status, body = await call(mail_kith, token, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": "@alice:hs.test"})
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")


async def test_expired_sessions_are_purged(kith_factory: KithFactory,
                                           smtp: SmtpSink) -> None:
    """At start and every 10 minutes, sessions expired for good are deleted."""
    kith = await kith_factory(mail_sections(smtp))
    token = await kith.register("alice")
    old_sid = (await request_email(kith, token))[1]["sid"]
    fresh_sid = (await request_email(kith, token, secret="fresh-secret"))[1]["sid"]
    store = kith.server.store
    assert store is not None and kith.server.services is not None
    await store.sessions.touch(int(old_sid), int(time.time() * 1000) - SESSION_LIFETIME_MS - 1)
    assert await kith.server.services.validation.purge_expired() == 1
    assert await store.sessions.get(int(old_sid)) is None
    assert await store.sessions.get(int(fresh_sid)) is not None
    status, body = await validated(kith, token, old_sid)
    assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")
    # A start purges what expired while kith was stopped.
    status, body = await validated(kith, token, fresh_sid, secret="fresh-secret")
    assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")
    await store.sessions.touch(int(fresh_sid), 0)
    await kith.server.stop()
    restarted = await kith_factory(mail_sections(smtp))  # the same directory and store
    status, body = await validated(restarted, token, fresh_sid, secret="fresh-secret")
    deadline = time.monotonic() + 10
    while body["errcode"] != "M_NO_VALID_SESSION" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status, body = await validated(restarted, token, fresh_sid, secret="fresh-secret")
    assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_smtp_down_then_retry(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    smtp.stop()
    started = time.monotonic()
    status, body = await request_email(mail_kith, token, send_attempt=1)
    assert (status, body["errcode"]) == (500, "M_EMAIL_SEND_ERROR")
    assert time.monotonic() - started < 5
    smtp.start()
    status, body = await request_email(mail_kith, token, send_attempt=2)
    assert status == 200, body
    assert len(smtp.messages) == 1
    assert await submit(mail_kith, token, body["sid"], mailed_token(smtp)) == (
        200, {"success": True})


async def test_email_rate_limit(kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory({"email": {
        "email.smtphost": "127.0.0.1", "email.smtpport": smtp.port,
        "email.ratelimit_sender.burst": 2}})
    token = await kith.register("alice")
    for attempt in (1, 2):
        assert (await request_email(kith, token, send_attempt=attempt))[0] == 200
    status, body = await request_email(kith, token, send_attempt=3)
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert len(smtp.messages) == 2


async def test_get_submit_token_renders_html_and_redirects(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    params = {"sid": sid, "client_secret": SECRET, "token": "wrong"}
    status, page = await call(mail_kith, token, "GET", "/validate/email/submitToken",
                              params=params)
    assert status == 400 and "Verification failed" in page
    params["token"] = mailed_token(smtp)
    status, page = await call(mail_kith, token, "GET", "/validate/email/submitToken",
                              params=params)
    assert status == 200 and "Verification successful" in page

    other = (await request_email(mail_kith, token, secret="s2",
                                 next_link="https://app.example/done"))[1]["sid"]
    params = {"sid": other, "client_secret": "s2", "token": mailed_token(smtp)}
    async with mail_kith.http.get(
            f"{mail_kith.base}{V2}/validate/email/submitToken", params=params,
            headers={"Authorization": f"Bearer {token}"}, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"https://app.example/done?sid={other}"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_long_next_link_still_makes_a_mail_that_leads_there(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    """The mail's link does not carry next_link (a line of a mail must stay under 1000
    bytes); the redirect leads to the stored one, with the sid appended as Sydent does."""
    token = await mail_kith.register("alice")
    next_link = "https://app.example/#/register?state=" + "a%20b" * 800  # 4037 characters
    status, body = await request_email(mail_kith, token, next_link=next_link)
    assert status == 200, body
    sid = body["sid"]
    assert max(len(line) for line in smtp.messages[-1][1].splitlines()) < 998
    params = {"sid": sid, "client_secret": SECRET, "token": mailed_token(smtp)}
    async with mail_kith.http.get(f"{mail_kith.base}{V2}/validate/email/submitToken",
                                  params=params, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{next_link}&sid={sid}"


async def test_get_submit_token_never_redirects_to_unsafe_links(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token,
                               next_link="javascript:alert(1)"))[1]["sid"]
    status, page = await call(mail_kith, token, "GET", "/validate/email/submitToken",
                              params={"sid": sid, "client_secret": SECRET,
                                      "token": mailed_token(smtp)})
    assert status == 200 and "Verification successful" in page


@pytest.mark.parametrize("path, method", [
    ("/validate/email/requestToken", "POST"),
    ("/validate/email/submitToken", "POST"),
    ("/validate/msisdn/requestToken", "POST"),
    ("/validate/msisdn/submitToken", "POST"),
    ("/3pid/getValidated3pid", "GET"),
    ("/3pid/bind", "POST"),
    ("/3pid/unbind", "POST"),
])
async def test_every_endpoint_needs_an_access_token(kith: RunningKith, path: str,
                                                    method: str) -> None:
    status, body = await call(kith, None, method, path, {})
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


EMAIL_OK = {"client_secret": SECRET, "email": "a@example.com", "send_attempt": 1}
MSISDN_OK = {"client_secret": SECRET, "country": "GB", "phone_number": "07911123456",
             "send_attempt": 1}
SUBMIT_OK = {"sid": "1", "client_secret": SECRET, "token": "abc"}
BIND_OK = {"sid": "1", "client_secret": SECRET, "mxid": "@alice:hs.test"}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# Integers and strings of decimal digits are send attempts (matrix-js-sdk sends "1");
# nothing else is.
BAD_SEND_ATTEMPTS: list[Any] = [
    -1, 2**31, 2**70, 1.5, True, None, [1], {}, "", " 1", "1 ", "+1", "-1", "1.0", "1e3",
    "0x1", "1_0", "one", "\u0661", "2147483648", "1" * 11]

BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("/validate/email/requestToken", without(EMAIL_OK, "email"), "M_MISSING_PARAMS"),
    ("/validate/email/requestToken", without(EMAIL_OK, "client_secret"), "M_MISSING_PARAMS"),
    ("/validate/email/requestToken", without(EMAIL_OK, "send_attempt"), "M_MISSING_PARAMS"),
    *(("/validate/email/requestToken", {**EMAIL_OK, "send_attempt": bad}, "M_INVALID_PARAM")
      for bad in BAD_SEND_ATTEMPTS),
    *(("/validate/msisdn/requestToken", {**MSISDN_OK, "send_attempt": bad}, "M_INVALID_PARAM")
      for bad in BAD_SEND_ATTEMPTS),
    ("/validate/email/requestToken", {**EMAIL_OK, "email": 5}, "M_INVALID_PARAM"),
    ("/validate/email/requestToken", {**EMAIL_OK, "next_link": []}, "M_INVALID_PARAM"),
    ("/validate/email/requestToken", {**EMAIL_OK, "client_secret": "a b"}, "M_INVALID_PARAM"),
    ("/validate/email/requestToken", {**EMAIL_OK, "client_secret": ""}, "M_INVALID_PARAM"),
    ("/validate/email/requestToken", {**EMAIL_OK, "client_secret": "x" * 256},
     "M_INVALID_PARAM"),
    ("/validate/email/requestToken", {**EMAIL_OK, "email": "not-an-email"},
     "M_INVALID_EMAIL"),
    ("/validate/email/requestToken", {**EMAIL_OK, "email": "a@b.c\r\nBcc: x@y.z"},
     "M_INVALID_EMAIL"),
    ("/validate/email/requestToken", {**EMAIL_OK, "email": "<a@b.c>"}, "M_INVALID_EMAIL"),
    ("/validate/email/requestToken", [], "M_BAD_JSON"),
    ("/validate/email/requestToken", b"{nope", "M_NOT_JSON"),
    ("/validate/msisdn/requestToken", without(MSISDN_OK, "country"), "M_MISSING_PARAMS"),
    ("/validate/msisdn/requestToken", without(MSISDN_OK, "phone_number"),
     "M_MISSING_PARAMS"),
    ("/validate/msisdn/requestToken", {**MSISDN_OK, "phone_number": 7700}, "M_INVALID_PARAM"),
    ("/validate/msisdn/requestToken", {**MSISDN_OK, "phone_number": "12"},
     "M_INVALID_ADDRESS"),
    ("/validate/msisdn/requestToken", {**MSISDN_OK, "country": "XX"}, "M_INVALID_ADDRESS"),
    ("/validate/msisdn/requestToken", {**MSISDN_OK, "client_secret": "é"}, "M_INVALID_PARAM"),
    ("/validate/msisdn/requestToken", b"", "M_NOT_JSON"),
    ("/validate/email/submitToken", without(SUBMIT_OK, "token"), "M_MISSING_PARAMS"),
    ("/validate/email/submitToken", without(SUBMIT_OK, "sid"), "M_MISSING_PARAMS"),
    ("/validate/email/submitToken", {**SUBMIT_OK, "token": 1}, "M_INVALID_PARAM"),
    ("/validate/email/submitToken", {**SUBMIT_OK, "client_secret": "a/b"}, "M_INVALID_PARAM"),
    ("/validate/email/submitToken", b"{\"sid\": ", "M_NOT_JSON"),
    ("/validate/msisdn/submitToken", {**SUBMIT_OK, "sid": None}, "M_INVALID_PARAM"),
    ("/3pid/bind", without(BIND_OK, "mxid"), "M_MISSING_PARAMS"),
    ("/3pid/bind", {**BIND_OK, "mxid": 1}, "M_INVALID_PARAM"),
    ("/3pid/bind", b"not json", "M_NOT_JSON"),
    ("/3pid/unbind", {"mxid": "@alice:hs.test"}, "M_MISSING_PARAMS"),
    ("/3pid/unbind", {"mxid": "@alice:hs.test", "threepid": {"medium": "email"}},
     "M_MISSING_PARAMS"),
    ("/3pid/unbind", {"mxid": "@alice:hs.test", "threepid": "a@b.c"}, "M_INVALID_PARAM"),
    ("/3pid/unbind", b"{", "M_NOT_JSON"),
]


@pytest.mark.parametrize("path, body, errcode", BAD_INPUTS)
async def test_bad_inputs(kith: RunningKith, token: str, path: str, body: Any,
                          errcode: str) -> None:
    if isinstance(body, bytes):
        status, answer = await call(kith, token, "POST", path, data=body)
    else:
        status, answer = await call(kith, token, "POST", path, body)
    assert status == 400, answer
    assert answer["errcode"] == errcode, answer


@pytest.mark.parametrize("path, params", [
    ("/validate/email/submitToken", {"sid": "1", "client_secret": SECRET}),
    ("/3pid/getValidated3pid", {"sid": "1"}),
    ("/3pid/getValidated3pid", {"client_secret": SECRET}),
])
async def test_missing_query_params(kith: RunningKith, token: str, path: str,
                                    params: dict[str, str]) -> None:
    status, body = await call(kith, token, "GET", path, params=params)
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")


async def test_bad_client_secret_in_query(kith: RunningKith, token: str) -> None:
    status, body = await validated(kith, token, "1", secret="no spaces")
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


# --------------------------------------------------------------------------- msisdn


@pytest.fixture
async def sms_kith(kith_factory: KithFactory, openmarket: OpenMarket) -> RunningKith:
    kith: RunningKith = await kith_factory({"sms": {
        "username": "om-user", "password": "om-pass", "smsrule.33": "reject",
        "base_url": openmarket.url}})
    return kith


async def test_msisdn_validation_flow(sms_kith: RunningKith, openmarket: OpenMarket) -> None:
    token = await sms_kith.register("alice")
    request = {"client_secret": SECRET, "country": "GB", "phone_number": "07911 123456",
               "send_attempt": 1}
    status, body = await call(sms_kith, token, "POST", "/validate/msisdn/requestToken",
                              request)
    assert status == 200, body
    assert body["msisdn"] == "447911123456" and body["intl_fmt"] == "+44 7911 123456"
    assert body["success"] is True and isinstance(body["sid"], str)
    auth, sent = openmarket.requests[0]
    assert auth.startswith("Basic ")
    assert sent["mobileTerminate"]["destination"]["address"] == "447911123456"
    code = openmarket.last_code()
    # the same attempt is not sent twice, given as matrix-js-sdk gives it ("1")
    again = await call(sms_kith, token, "POST", "/validate/msisdn/requestToken",
                       {**request, "send_attempt": "1"})
    assert again[1]["sid"] == body["sid"] and len(openmarket.requests) == 1
    status, answer = await call(sms_kith, token, "POST", "/validate/msisdn/submitToken", {
        "sid": body["sid"], "client_secret": SECRET, "token": "000000"
        if code != "000000" else "111111"})
    assert (status, answer["errcode"]) == (400, "M_TOKEN_INCORRECT")
    assert await call(sms_kith, token, "POST", "/validate/msisdn/submitToken", {
        "sid": body["sid"], "client_secret": SECRET, "token": code}) == (
        200, {"success": True})
    status, answer = await validated(sms_kith, token, body["sid"])
    assert answer["medium"] == "msisdn" and answer["address"] == "447911123456"
    status, signed = await call(sms_kith, token, "POST", "/3pid/bind", {
        "sid": body["sid"], "client_secret": SECRET, "mxid": "@alice:hs.test"})
    assert status == 200 and signed["address"] == "447911123456"


async def test_msisdn_provider_failure_and_rules(sms_kith: RunningKith,
                                                 openmarket: OpenMarket) -> None:
    token = await sms_kith.register("alice")
    openmarket.status = 500
    request = {"client_secret": SECRET, "country": "GB", "phone_number": "07911123456",
               "send_attempt": 1}
    status, body = await call(sms_kith, token, "POST", "/validate/msisdn/requestToken",
                              request)
    assert (status, body["errcode"]) == (500, "M_SEND_ERROR")
    openmarket.status = 202
    status, body = await call(sms_kith, token, "POST", "/validate/msisdn/requestToken",
                              {**request, "send_attempt": 2})
    assert status == 200 and len(openmarket.requests) == 2
    status, body = await call(sms_kith, token, "POST", "/validate/msisdn/requestToken", {
        **request, "country": "FR", "phone_number": "0612345678"})
    assert (status, body["errcode"]) == (400, "M_DESTINATION_REJECTED")
    assert len(openmarket.requests) == 2


class Twilio:
    """Loopback stand-in for Twilio's Messages API: records the forms it is sent."""

    def __init__(self) -> None:
        self.url = ""
        self.forms: list[dict[str, str]] = []
        self.status, self.answer = 201, {"sid": "SM1", "status": "queued"}

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("Basic ")
        self.forms.append({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response(self.answer, status=self.status)

    def last_code(self) -> str:
        match = re.search(r"\b([0-9]{6})\b", self.forms[-1]["Body"])
        assert match, self.forms[-1]
        return match.group(1)


@pytest.fixture
async def twilio() -> AsyncIterator[Twilio]:
    stub = Twilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/AC42/Messages.json", stub.handle)
    async with serving(app) as stub.url:
        yield stub


async def test_msisdn_validation_flow_with_twilio(kith_factory: KithFactory,
                                                  twilio: Twilio) -> None:
    kith: RunningKith = await kith_factory({"sms": {
        "provider": "twilio", "twilio.account_sid": "AC42", "twilio.auth_token": "tw-secret",
        "twilio.from": "+15005550006", "base_url": twilio.url}})
    token = await kith.register("alice")
    request = {"client_secret": SECRET, "country": "US", "phone_number": "(415) 555-0123",
               "send_attempt": 1}
    status, body = await call(kith, token, "POST", "/validate/msisdn/requestToken", request)
    assert status == 200, body
    assert body["msisdn"] == "14155550123"
    [form] = twilio.forms
    assert (form["To"], form["From"]) == ("+14155550123", "+15005550006")
    status, answer = await call(kith, token, "POST", "/validate/msisdn/submitToken", {
        "sid": body["sid"], "client_secret": SECRET, "token": twilio.last_code()})
    assert (status, answer) == (200, {"success": True})
    status, signed = await call(kith, token, "POST", "/3pid/bind", {
        "sid": body["sid"], "client_secret": SECRET, "mxid": "@alice:hs.test"})
    assert status == 200 and signed["medium"] == "msisdn"
    assert signed["address"] == "14155550123" and signed["mxid"] == "@alice:hs.test"
    # Twilio refusing the number: a clear error, and a later attempt still works.
    twilio.status = 400
    twilio.answer = {"code": "21211", "message": "Invalid 'To' number"}
    status, answer = await call(kith, token, "POST", "/validate/msisdn/requestToken",
                                {**request, "send_attempt": 2})
    assert (status, answer["errcode"]) == (500, "M_SEND_ERROR")
    twilio.status, twilio.answer = 201, {"sid": "SM2"}
    status, answer = await call(kith, token, "POST", "/validate/msisdn/requestToken",
                                {**request, "send_attempt": 3})
    assert status == 200 and len(twilio.forms) == 3


async def test_the_mailed_link_works_without_an_access_token(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    """A person clicks the link in the mail: no access token, the link is the proof."""
    token = await mail_kith.register("alice")
    sid = (await request_email(mail_kith, token))[1]["sid"]
    match = re.search(r"(/_matrix/identity/v2/validate/email/submitToken\?[^\s\"<]+)",
                      smtp.messages[-1][1])
    assert match, smtp.messages[-1][1]
    link = match.group(1).replace("&amp;", "&")
    async with mail_kith.http.get(mail_kith.base + link) as resp:
        assert resp.status == 200
        assert "Verification successful" in await resp.text()
    status, body = await call(mail_kith, token, "GET", "/3pid/getValidated3pid",
                              params={"sid": sid, "client_secret": SECRET})
    assert status == 200 and body["address"] == "alice@example.com"
    # A caller that does send a token must send a good one.
    async with mail_kith.http.get(mail_kith.base + link,
                                  headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401


# ------------------------------------------------ over STARTTLS, trusting a private CA

# The aiosmtpd server of the delivery tests (STARTTLS, logins) as a fixture here too.
smtp_server = delivery_fixtures.smtp_server


async def test_email_validation_over_starttls_with_a_private_ca(
        kith_factory: KithFactory, smtp_server: SmtpFactory, pki: TestPki) -> None:
    """`email.tls_cafile` makes kith trust the test CA for an SMTP server that insists
    on STARTTLS: requestToken, the mailed token, submitToken, bind, sha256 lookup."""
    inbox = smtp_server(tls_context=pki.server_context(), require_starttls=True)
    kith = await kith_factory({"email": {
        "email.smtphost": "127.0.0.1", "email.smtpport": inbox.port,
        "email.tlsmode": "STARTTLS", "email.tls_cafile": str(pki.ca_file)}})
    assert kith.config.email.tls_cafile == str(pki.ca_file)
    token = await kith.register("alice")
    status, body = await request_email(kith, token)
    assert status == 200, body
    sid = body["sid"]
    [received] = inbox.messages
    assert received.rcpt_tos == ["alice@example.com"]
    mail = SmtpSink()  # only as the container mailed_token reads
    mail.messages = [(received.rcpt_tos, received.content.decode())]
    assert await submit(kith, token, sid, mailed_token(mail)) == (200, {"success": True})
    status, signed = await call(kith, token, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": "@alice:hs.test"})
    assert status == 200, signed
    assert signed["address"] == "alice@example.com" and signed["mxid"] == "@alice:hs.test"
    _, details = await call(kith, token, "GET", "/hash_details")
    pepper = details["lookup_pepper"]
    h = lookup_hash("email", "alice@example.com", pepper)
    status, body = await call(kith, token, "POST", "/lookup", {
        "algorithm": "sha256", "pepper": pepper, "addresses": [h]})
    assert (status, body["mappings"]) == (200, {h: "@alice:hs.test"})


async def test_starttls_without_the_private_ca_is_a_send_error(
        kith_factory: KithFactory, smtp_server: SmtpFactory, pki: TestPki) -> None:
    inbox = smtp_server(tls_context=pki.server_context(), require_starttls=True)
    kith = await kith_factory({"email": {
        "email.smtphost": "127.0.0.1", "email.smtpport": inbox.port,
        "email.tlsmode": "STARTTLS", "email.tls_cafile": str(pki.other_ca_file)}})
    token = await kith.register("alice")
    status, body = await request_email(kith, token)
    assert (status, body["errcode"]) == (500, "M_EMAIL_SEND_ERROR")
    assert inbox.messages == []
