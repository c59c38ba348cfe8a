"""OpenMarket's SMS API (`POST /sms/v4/mt`), as Sydent calls it.

Sydent's operators configure the sender per destination country (`originators.<cc>`);
kith keeps that choice exactly, so numbers keep receiving codes from the same sender.
"""

from __future__ import annotations

import logging

import aiohttp

from kith.config import SmsConfig
from kith.delivery.sms.base import (
    DEFAULT_TIMEOUT_S,
    basic_authorization,
    check_msisdn,
    country_code,
    failed,
    post,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://smsc.openmarket.com"
TYPE_OF_NUMBER = {"long": 1, "short": 3, "alpha": 5}
"""OpenMarket's `ton`: long number 1, short code 3, alphanumeric sender 5."""
FALLBACK_ORIGINATOR = ("alpha", "Matrix")

Originator = tuple[str, str]


def choose_originator(sms: SmsConfig, msisdn: str) -> Originator:
    """The list for the number's calling code, else `default`, else `alpha:Matrix`;
    the entry at (sum of the number's digits) mod (list length), so one number always
    hears from the same sender."""
    lists = dict(sms.originators)
    choices = lists.get(country_code(msisdn) or "") or lists.get("default")
    if not choices:
        return FALLBACK_ORIGINATOR
    return choices[sum(int(d) for d in msisdn) % len(choices)]


class OpenMarketSms:
    """An SmsProvider for OpenMarket (`[sms] username`, `password`, `originators.*`)."""

    name = "OpenMarket"

    def __init__(self, sms: SmsConfig, session: aiohttp.ClientSession | None = None, *,
                 base_url: str = DEFAULT_BASE_URL,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.sms = sms
        self.session = session
        self.url = base_url.rstrip("/") + "/sms/v4/mt"
        self.timeout_s = timeout_s
        self._authorization = basic_authorization(sms.username, sms.password)
        if not sms.username:
            log.warning("[sms] username is not set: OpenMarket will refuse to send")

    async def send(self, msisdn: str, body: str) -> None:
        check_msisdn(msisdn)
        ton_name, originator = choose_originator(self.sms, msisdn)
        request = {"mobileTerminate": {
            "message": {"content": body, "type": "text"},
            "destination": {"address": msisdn},
            "source": {"ton": TYPE_OF_NUMBER[ton_name], "address": originator},
        }}
        answer = await post(self.session, self.url, json=request,
                            authorization=self._authorization, timeout_s=self.timeout_s,
                            provider=self.name)
        if not 200 <= answer.status < 300:
            raise failed(self.name, f"HTTP {answer.status}")
        ticket = answer.headers.get("Location", "").rstrip("/").rpartition("/")[2]
        log.info("OpenMarket accepted an SMS to +%s… from %s:%s, ticket %s",
                 country_code(msisdn) or "?", ton_name, originator, ticket or "(none)")
