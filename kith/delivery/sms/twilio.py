"""Twilio's Programmable Messaging API (`POST /2010-04-01/Accounts/{sid}/Messages.json`).

kith's first provider beyond Sydent's OpenMarket: operators asked for one they can sign
up to in minutes.  The sender is a Twilio number (`twilio.from`) or a Messaging
Service (`twilio.messaging_service_sid`), which picks the number itself.
"""

from __future__ import annotations

import json
import logging

import aiohttp

from kith.config import ConfigError, SmsConfig
from kith.delivery.sms.base import (
    DEFAULT_TIMEOUT_S,
    basic_authorization,
    check_msisdn,
    country_code,
    failed,
    post,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.twilio.com"


class TwilioSms:
    """An SmsProvider for Twilio (`[sms] twilio.*` keys)."""

    name = "Twilio"

    def __init__(self, sms: SmsConfig, session: aiohttp.ClientSession | None = None, *,
                 base_url: str = DEFAULT_BASE_URL,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not (sms.twilio_account_sid and sms.twilio_auth_token):
            raise ConfigError("[sms] twilio.account_sid and twilio.auth_token must be set")
        if not (sms.twilio_from or sms.twilio_messaging_service_sid):
            raise ConfigError("[sms] provider = twilio needs twilio.from or "
                              "twilio.messaging_service_sid")
        self.session = session
        self.url = (f"{base_url.rstrip('/')}/2010-04-01/Accounts/"
                    f"{sms.twilio_account_sid}/Messages.json")
        self.timeout_s = timeout_s
        self._authorization = basic_authorization(sms.twilio_account_sid,
                                                  sms.twilio_auth_token)
        self._sender = (("MessagingServiceSid", sms.twilio_messaging_service_sid)
                        if sms.twilio_messaging_service_sid else ("From", sms.twilio_from))

    async def send(self, msisdn: str, body: str) -> None:
        check_msisdn(msisdn)
        form = {"To": "+" + msisdn, "Body": body, self._sender[0]: self._sender[1]}
        answer = await post(self.session, self.url, data=form,
                            authorization=self._authorization, timeout_s=self.timeout_s,
                            provider=self.name)
        reply = _json_object(answer.body)
        if not 200 <= answer.status < 300:
            code, message = reply.get("code"), reply.get("message")
            detail = f"error {code}: {str(message)[:200]}" if code or message else "no detail"
            raise failed(self.name, f"HTTP {answer.status}, {detail}")
        log.info("Twilio accepted an SMS to +%s…, message %s", country_code(msisdn) or "?",
                 reply.get("sid", "(no sid)"))


def _json_object(body: bytes) -> dict[str, object]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
