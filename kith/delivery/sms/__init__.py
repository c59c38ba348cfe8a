"""Text messages: one small interface (`SmsProvider`), chosen by `[sms] provider`.

The rules that do not depend on the provider live here: which destinations the
operator refuses (`smsrule.<cc> = reject`) and the message text (`bodyTemplate`).
"""

from __future__ import annotations

import logging

import aiohttp

from kith.config import SmsConfig
from kith.delivery.sms.base import (
    DEFAULT_TIMEOUT_S,
    SmsProvider,
    SmsSendError,
    check_msisdn,
    country_code,
)
from kith.delivery.sms.openmarket import OpenMarketSms, choose_originator
from kith.delivery.sms.twilio import TwilioSms
from kith.errors import M_DESTINATION_REJECTED, MatrixError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "OpenMarketSms",
    "SmsProvider",
    "SmsSendError",
    "TwilioSms",
    "check_msisdn",
    "check_sms_rule",
    "choose_originator",
    "country_code",
    "sms_body",
    "sms_provider_from_config",
]

log = logging.getLogger(__name__)


def sms_provider_from_config(sms: SmsConfig, session: aiohttp.ClientSession | None = None,
                             *, base_url: str | None = None,
                             timeout_s: float = DEFAULT_TIMEOUT_S) -> SmsProvider:
    """The provider named by `sms.provider` ("openmarket" or "twilio").

    `session`: a shared client session the provider uses and never closes (None: one
    session per message).  `base_url` replaces the provider's API address (tests).
    Raises ConfigError when the provider's keys are incomplete.
    """
    if sms.provider == "twilio":
        if base_url is None:
            return TwilioSms(sms, session, timeout_s=timeout_s)
        return TwilioSms(sms, session, base_url=base_url, timeout_s=timeout_s)
    if sms.provider != "openmarket":
        raise ValueError(f"unknown SMS provider {sms.provider!r}")
    if base_url is None:
        return OpenMarketSms(sms, session, timeout_s=timeout_s)
    return OpenMarketSms(sms, session, base_url=base_url, timeout_s=timeout_s)


def check_sms_rule(sms: SmsConfig, msisdn: str) -> None:
    """Raise 400 M_DESTINATION_REJECTED when `smsrule.<calling code> = reject`."""
    rules = dict(sms.rules)
    code = country_code(msisdn)
    if code is not None and rules.get(code) == "reject":
        raise MatrixError(400, M_DESTINATION_REJECTED,
                          "This destination is not allowed to receive SMS messages")


def sms_body(sms: SmsConfig, token: str) -> str:
    """`bodyTemplate` with `{token}` filled in (str.format, as Sydent).

    A template with other `{...}` fields cannot be sent: raises SmsSendError.
    """
    try:
        return sms.body_template.format(token=token)
    except (KeyError, IndexError, ValueError, AttributeError):
        log.error("[sms] bodyTemplate %r is not a str.format template with only {token}",
                  sms.body_template)
        raise SmsSendError("[sms] bodyTemplate cannot be formatted") from None
