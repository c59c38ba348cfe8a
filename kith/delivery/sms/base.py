"""What every SMS provider shares: the interface, its error, and one bounded HTTP POST.

Providers are HTTP APIs called with credentials: every call has a total timeout,
follows no redirect (a redirect would carry the credentials elsewhere) and reads a
bounded answer.  No retry: a second POST after an unclear failure can send the code
twice, and the client asks again with a higher `send_attempt` anyway.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from kith.threepid import is_msisdn, number_from_msisdn

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 64 * 1024


class SmsSendError(Exception):
    """The provider did not accept the message (the text holds no token or credential)."""


class SmsProvider(Protocol):
    """Sends one text message; raises SmsSendError."""

    async def send(self, msisdn: str, body: str) -> None:
        """`msisdn`: the E.164 number as digits, without '+'."""
        ...


def check_msisdn(msisdn: str) -> None:
    if not is_msisdn(msisdn):
        raise SmsSendError("not an E.164 number (digits without '+')")


def country_code(msisdn: str) -> str | None:
    """The number's country calling code (`"44"`), or None when it does not parse."""
    number = number_from_msisdn(msisdn.removeprefix("+"))
    return None if number is None else str(number.country_code)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def post(session: aiohttp.ClientSession | None, url: str, *,
               authorization: str, timeout_s: float, provider: str,
               json: Any = None, data: Mapping[str, str] | None = None) -> Answer:
    """POST once; raises SmsSendError on a network failure or timeout (not on a status).

    `session`: the caller's (kept open), or None for a session of this call only.
    """
    owned = session is None
    if session is None:
        session = aiohttp.ClientSession()
    try:
        async with session.post(url, json=json, data=data,
                                headers={"Authorization": authorization},
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await _read_bounded(resp)
            return Answer(resp.status, resp.headers, body)
    except TimeoutError:
        raise failed(provider, f"no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise failed(provider, f"{type(e).__name__}: {e}"[:300]) from None
    finally:
        if owned:
            await session.close()


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    while len(body) < MAX_ANSWER_BYTES:
        chunk = await resp.content.read(MAX_ANSWER_BYTES - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def basic_authorization(user: str, password: str) -> str:
    """An HTTP Basic `Authorization` value (UTF-8, as both providers expect)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def failed(provider: str, problem: str) -> SmsSendError:
    """An SmsSendError for `provider`, logged (callers keep bodies and tokens out)."""
    message = f"sending an SMS via {provider} failed: {problem}"
    log.warning("%s", message)
    return SmsSendError(message)
