"""SMS providers against small loopback HTTP servers standing in for OpenMarket and Twilio."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kith.config import ConfigError, SmsConfig
from kith.delivery.sms import (
    OpenMarketSms,
    SmsSendError,
    TwilioSms,
    check_sms_rule,
    choose_originator,
    sms_body,
    sms_provider_from_config,
)
from kith.errors import M_DESTINATION_REJECTED, MatrixError
from tests.conftest import free_port

UK = "447700900123"  # digit sum 45
US = "12025550123"  # digit sum 21
FR = "33612345678"  # digit sum 48
BODY = "Your code is 424242"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Provider:
    """A loopback stand-in: records requests and answers what the test sets."""

    url: str = ""
    requests: list[tuple[web.Request, bytes]] = field(default_factory=list)
    status: int = 202
    answer: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request, await request.read()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response(self.answer, status=self.status, headers=self.headers)


ServeProvider = Callable[[str], Awaitable[Provider]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeProvider]:
    runners: list[web.AppRunner] = []

    async def start(path: str) -> Provider:
        provider = Provider()
        app = web.Application()
        app.router.add_route("*", path, provider.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        provider.url = f"http://127.0.0.1:{port}"
        return provider

    yield start
    for runner in runners:
        await runner.cleanup()


OPENMARKET = SmsConfig(
    username="om-user", password="om-pass",
    originators=(("44", (("long", "447700900000"), ("short", "12345"))),
                 ("1", (("short", "55555"),))),
)


# ------------------------------------------------------------------------- OpenMarket


async def test_openmarket_request(serve: ServeProvider, caplog: pytest.LogCaptureFixture) -> None:
    om = await serve("/sms/v4/mt")
    om.headers = {"Location": "https://smsc.openmarket.com/sms/v4/mt/TICKET-123"}
    with caplog.at_level(logging.DEBUG):
        await OpenMarketSms(OPENMARKET, base_url=om.url).send(UK, BODY)
    [(request, raw)] = om.requests
    assert request.method == "POST"
    assert request.headers["Authorization"] == basic("om-user", "om-pass")
    assert request.content_type == "application/json"
    # digit sum of 447700900123 is 45; two originators for +44: index 1 → short:12345
    assert await request.json() == {"mobileTerminate": {
        "message": {"content": BODY, "type": "text"},
        "destination": {"address": UK},
        "source": {"ton": 3, "address": "12345"},
    }}
    assert "TICKET-123" in caplog.text
    assert "424242" not in caplog.text and "om-pass" not in caplog.text


@pytest.mark.parametrize(("msisdn", "expected"), [
    ("447700900123", ("short", "12345")),  # digit sum 45 → index 1
    ("447700900124", ("long", "447700900000")),  # digit sum 46 → index 0
    (US, ("short", "55555")),  # the list for +1 has one entry
])
def test_originator_per_country_and_digit_sum(msisdn: str, expected: tuple[str, str]) -> None:
    assert choose_originator(OPENMARKET, msisdn) == expected


def test_originator_default_then_alpha_matrix() -> None:
    assert choose_originator(OPENMARKET, FR) == ("alpha", "Matrix")
    with_default = SmsConfig(originators=(("default", (("alpha", "Kith"), ("long", "1555"))),))
    assert choose_originator(with_default, FR) == ("alpha", "Kith")  # 48 % 2 == 0
    assert choose_originator(with_default, "33612345679") == ("long", "1555")


async def test_openmarket_sends_alpha_matrix_when_nothing_is_configured(
        serve: ServeProvider) -> None:
    om = await serve("/sms/v4/mt")
    await OpenMarketSms(OPENMARKET, base_url=om.url).send(FR, BODY)
    body = await om.requests[0][0].json()
    assert body["mobileTerminate"]["source"] == {"ton": 5, "address": "Matrix"}


@pytest.mark.parametrize("status", [200, 201, 204])
async def test_openmarket_any_2xx_is_success(serve: ServeProvider, status: int) -> None:
    om = await serve("/sms/v4/mt")
    om.status = status
    await OpenMarketSms(OPENMARKET, base_url=om.url).send(UK, BODY)


@pytest.mark.parametrize("status", [302, 400, 401, 500, 503])
async def test_openmarket_error_status(serve: ServeProvider, status: int) -> None:
    om = await serve("/sms/v4/mt")
    om.status = status
    om.headers = {"Location": "http://127.0.0.1:9/elsewhere"}
    with pytest.raises(SmsSendError, match=f"HTTP {status}") as raised:
        await OpenMarketSms(OPENMARKET, base_url=om.url).send(UK, BODY)
    assert "424242" not in str(raised.value)
    assert len(om.requests) == 1  # no redirect followed, no retry


async def test_openmarket_timeout(serve: ServeProvider) -> None:
    om = await serve("/sms/v4/mt")
    om.delay_s = 1.0
    started = time.monotonic()
    with pytest.raises(SmsSendError, match="no answer within 0.3 s"):
        await OpenMarketSms(OPENMARKET, base_url=om.url, timeout_s=0.3).send(UK, BODY)
    assert time.monotonic() - started < 2


async def test_provider_down() -> None:
    provider = OpenMarketSms(OPENMARKET, base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SmsSendError):
        await provider.send(UK, BODY)


async def test_shared_session_is_left_open(serve: ServeProvider) -> None:
    om = await serve("/sms/v4/mt")
    async with aiohttp.ClientSession() as session:
        provider = sms_provider_from_config(OPENMARKET, session, base_url=om.url)
        await provider.send(UK, BODY)
        await provider.send(US, BODY)
        assert not session.closed
    assert len(om.requests) == 2


@pytest.mark.parametrize("msisdn", ["+447700900123", "44 7700", "", "4477009001234567"])
async def test_bad_msisdn_is_refused_before_sending(serve: ServeProvider, msisdn: str) -> None:
    om = await serve("/sms/v4/mt")
    with pytest.raises(SmsSendError):
        await OpenMarketSms(OPENMARKET, base_url=om.url).send(msisdn, BODY)
    assert om.requests == []


# ----------------------------------------------------------------------------- Twilio

TWILIO = SmsConfig(provider="twilio", twilio_account_sid="AC123", twilio_auth_token="tw-token",
                   twilio_from="+15005550006")
MESSAGES = "/2010-04-01/Accounts/AC123/Messages.json"


async def test_twilio_request(serve: ServeProvider, caplog: pytest.LogCaptureFixture) -> None:
    tw = await serve(MESSAGES)
    tw.status, tw.answer = 201, {"sid": "SM0123456789", "status": "queued"}
    provider = sms_provider_from_config(TWILIO, base_url=tw.url)
    assert isinstance(provider, TwilioSms)
    with caplog.at_level(logging.INFO):
        await provider.send(UK, BODY)
    [(request, raw)] = tw.requests
    assert request.headers["Authorization"] == basic("AC123", "tw-token")
    assert request.content_type == "application/x-www-form-urlencoded"
    assert dict(await request.post()) == {"To": "+" + UK, "Body": BODY,
                                          "From": "+15005550006"}
    assert "SM0123456789" in caplog.text
    assert "424242" not in caplog.text and "tw-token" not in caplog.text


async def test_twilio_messaging_service(serve: ServeProvider) -> None:
    tw = await serve(MESSAGES)
    tw.status = 201
    config = SmsConfig(provider="twilio", twilio_account_sid="AC123",
                       twilio_auth_token="tw-token", twilio_messaging_service_sid="MG42")
    await TwilioSms(config, base_url=tw.url).send(US, BODY)
    form = dict(await tw.requests[0][0].post())
    assert form == {"To": "+" + US, "Body": BODY, "MessagingServiceSid": "MG42"}


async def test_twilio_error_carries_code_and_message(serve: ServeProvider) -> None:
    tw = await serve(MESSAGES)
    tw.status = 400
    tw.answer = {"code": 21211, "message": "The 'To' number is not a valid phone number.",
                 "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}
    with pytest.raises(SmsSendError, match="HTTP 400, error 21211: The 'To' number") as raised:
        await TwilioSms(TWILIO, base_url=tw.url).send(UK, BODY)
    assert "424242" not in str(raised.value) and "tw-token" not in str(raised.value)


async def test_twilio_non_json_error(serve: ServeProvider) -> None:
    tw = await serve(MESSAGES)
    tw.status = 502
    with pytest.raises(SmsSendError, match="HTTP 502"):
        await TwilioSms(TWILIO, base_url=tw.url).send(UK, BODY)


def test_twilio_needs_its_keys() -> None:
    with pytest.raises(ConfigError, match="twilio.auth_token"):
        sms_provider_from_config(SmsConfig(provider="twilio", twilio_account_sid="AC1"))
    with pytest.raises(ConfigError, match="twilio.from"):
        sms_provider_from_config(SmsConfig(provider="twilio", twilio_account_sid="AC1",
                                           twilio_auth_token="t"))


def test_provider_choice() -> None:
    assert isinstance(sms_provider_from_config(OPENMARKET), OpenMarketSms)
    assert isinstance(sms_provider_from_config(TWILIO), TwilioSms)


# ---------------------------------------------------------------------- rules and body


def test_smsrule_reject() -> None:
    config = SmsConfig(rules=(("33", "reject"), ("44", "allow")))
    with pytest.raises(MatrixError) as raised:
        check_sms_rule(config, FR)
    assert (raised.value.status, raised.value.errcode) == (400, M_DESTINATION_REJECTED)
    check_sms_rule(config, UK)
    check_sms_rule(config, US)


def test_sms_body() -> None:
    assert sms_body(SmsConfig(), "123456") == "Your code is 123456"
    assert sms_body(SmsConfig(body_template="{token} is your Kith code"), "9") == \
        "9 is your Kith code"
    with pytest.raises(SmsSendError):
        sms_body(SmsConfig(body_template="Code {token} for {user}"), "1")
