"""Validation sessions: proving that a caller reads an email address or phone number.

A session is keyed by (medium, address, client_secret).  Asking again with the same
triple answers the same sid and token, and sends again only when `send_attempt` grows
(the spec; Sydent 2.6.1 re-sends every time).  A session lives 24 h after its last
change.  After MAX_FAILED_ATTEMPTS wrong tokens it is locked: even the right token is
refused with M_TOKEN_INCORRECT (the same answer as a wrong guess, so the lock is no
oracle), and the next requestToken for the triple starts a fresh session.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kith.config import SmsConfig
from kith.delivery.email import EmailSender, EmailSendError, EmailTemplates, validation_link
from kith.delivery.sms import SmsProvider, SmsSendError, check_sms_rule, country_code, sms_body
from kith.delivery.templates import TemplateError
from kith.errors import (
    M_EMAIL_SEND_ERROR,
    M_INVALID_EMAIL,
    M_INVALID_PARAM,
    M_NO_VALID_SESSION,
    M_SEND_ERROR,
    M_SESSION_EXPIRED,
    M_SESSION_NOT_VALIDATED,
    M_TOKEN_INCORRECT,
    MatrixError,
)
from kith.services.limits import Requester, SendLimits
from kith.store import Store, ValidationSessionRow
from kith.threepid import normalise_plain_email, now_ms, parse_msisdn

log = logging.getLogger(__name__)

SESSION_LIFETIME_MS = 24 * 60 * 60 * 1000
MAX_FAILED_ATTEMPTS = 10
EMAIL_TOKEN_LENGTH = 32
MSISDN_TOKEN_LENGTH = 6
V2_PREFIX = "/_matrix/identity/v2"

_CLIENT_SECRET = re.compile(r"^[0-9a-zA-Z.=_-]{1,255}$")
_SID = re.compile(r"[0-9]{1,19}")
MAX_SID = 2**63 - 1  # sids are positive 63-bit integers (new_sid)
_ALPHANUMERICS = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ValidatedThreepid:
    medium: str
    address: str
    validated_at: int


@dataclass(frozen=True, slots=True)
class MsisdnSession:
    sid: str
    msisdn: str
    intl_fmt: str


def check_client_secret(client_secret: str) -> None:
    if not _CLIENT_SECRET.match(client_secret):
        raise MatrixError(400, M_INVALID_PARAM,
                          "Invalid client_secret: must match [0-9a-zA-Z.=_-]{1,255}")


def new_token(medium: str) -> str:
    if medium == "msisdn":
        return "".join(secrets.choice(string.digits) for _ in range(MSISDN_TOKEN_LENGTH))
    return "".join(secrets.choice(_ALPHANUMERICS) for _ in range(EMAIL_TOKEN_LENGTH))


def new_sid() -> int:
    """A random positive 63-bit id: sids are not sequential, so not guessable."""
    return 1 + secrets.randbelow(MAX_SID)


def next_link_with_sid(next_link: str, sid: int | str) -> str:
    """Where the mail's link leads once it validated session `sid`: the session's
    next_link with `sid=<sid>` appended, as Sydent does (the client learns the sid only
    after the mail is sent)."""
    return next_link + ("&" if "?" in next_link else "?") + f"sid={quote(str(sid))}"


def no_valid_session() -> MatrixError:
    return MatrixError(404, M_NO_VALID_SESSION,
                       "No valid session was found matching that sid and client secret")


class ValidationService:
    def __init__(
        self,
        store: Store,
        *,
        email_sender: EmailSender,
        email_templates: EmailTemplates,
        limits: SendLimits,
        sms: SmsConfig,
        sms_provider: SmsProvider | None,
        client_http_base: str,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._email_sender = email_sender
        self._email_templates = email_templates
        self._limits = limits
        self._sms = sms
        self.sms_provider = sms_provider
        self._client_http_base = client_http_base.rstrip("/")
        self._clock = clock

    # ------------------------------------------------------------------ requestToken

    async def request_email_token(self, client_secret: str, email: str, send_attempt: int,
                                  next_link: str | None = None, brand: str | None = None,
                                  requester: Requester | None = None,
                                  requester_ip: str | None = None) -> str:
        """Create or reuse the session and mail its token when due; answers the sid.

        A mail counts against the sender's limit (the account on v2, the client address
        on v1, as Sydent), the recipient address's and the client address's."""
        check_client_secret(client_secret)
        address = normalise_plain_email(email)
        if address is None:
            raise MatrixError(400, M_INVALID_EMAIL, "The email address is not valid")
        if refused := await self._email_sender.undeliverable(address):
            raise MatrixError(400, M_INVALID_EMAIL, refused)
        asker = requester or Requester(ip=None)
        limits = self._limits
        session, due = await self._session_for(
            "email", address, client_secret, send_attempt, next_link,
            lambda: limits.hit((limits.email_sender, asker.user_id or asker.ip),
                               (limits.email_recipient, address),
                               (limits.client_ip, asker.ip)))
        if due:
            link = validation_link(self._client_http_base, token=session.token,
                                   client_secret=client_secret, sid=session.id,
                                   api_prefix=V2_PREFIX)
            try:
                message = await self._email_templates.verification(
                    address, token=session.token, link=link, ipaddress=requester_ip,
                    brand=brand)
                await self._email_sender.send(address, message)
            except (EmailSendError, TemplateError) as exc:
                log.warning("validation mail for session %d not sent: %s", session.id, exc)
                raise MatrixError(500, M_EMAIL_SEND_ERROR,
                                  "Failed to send the validation email") from None
            await self._store.sessions.touch(session.id, self._clock(), send_attempt)
        return str(session.id)

    async def request_msisdn_token(self, client_secret: str, country: str,
                                   phone_number: str, send_attempt: int,
                                   next_link: str | None = None,
                                   requester: Requester | None = None) -> MsisdnSession:
        """Create or reuse the session and text its token when due.

        A text counts against the number's limit, its calling code's (Sydent's) and the
        client address's."""
        check_client_secret(client_secret)
        msisdn, intl_fmt = parse_msisdn(country, phone_number)
        check_sms_rule(self._sms, msisdn)
        asker = requester or Requester(ip=None)
        limits = self._limits
        session, due = await self._session_for(
            "msisdn", msisdn, client_secret, send_attempt, next_link,
            lambda: limits.hit((limits.msisdn, msisdn),
                               (limits.country, country_code(msisdn) or ""),
                               (limits.client_ip, asker.ip)))
        if due:
            try:
                if self.sms_provider is None:
                    raise SmsSendError("no SMS provider is configured")
                await self.sms_provider.send(msisdn, sms_body(self._sms, session.token))
            except SmsSendError as exc:
                log.warning("validation SMS for session %d not sent: %s", session.id, exc)
                raise MatrixError(500, M_SEND_ERROR,
                                  "Failed to send the validation SMS") from None
            await self._store.sessions.touch(session.id, self._clock(), send_attempt)
        return MsisdnSession(str(session.id), msisdn, intl_fmt)

    async def _session_for(self, medium: str, address: str, client_secret: str,
                           send_attempt: int, next_link: str | None,
                           check_limits: Callable[[], Awaitable[None]]
                           ) -> tuple[ValidationSessionRow, bool]:
        """The live session for the triple (created if new; replaced if expired or
        locked), and whether its token is due to be sent for `send_attempt`.

        When a send is due, `check_limits` runs before anything is written: a refused
        request leaves no row behind.  The stored send_attempt advances only after a
        successful send, so a failed send is retried by any request with a send_attempt
        above the last one delivered.
        """
        stored = await self._store.sessions.find(medium, address, client_secret)
        live = None if stored is None or self._expired(stored) \
            or stored.failed_attempts >= MAX_FAILED_ATTEMPTS else stored
        if live is None or send_attempt > live.send_attempt:
            await check_limits()
        now = self._clock()
        if live is not None:
            await self._store.sessions.touch(live.id, now, next_link=next_link)
            session = live
            if next_link is not None:
                session = await self._store.sessions.get(live.id) or live
            return session, send_attempt > session.send_attempt
        fresh = ValidationSessionRow(
            id=new_sid(), medium=medium, address=address, client_secret=client_secret,
            validated_at=None, mtime=now, next_link=next_link, send_attempt=-1,
            token=new_token(medium), failed_attempts=0)
        if stored is None:
            session = await self._store.sessions.create(fresh)
        else:
            session = await self._store.sessions.replace(stored.id, fresh)
        return session, send_attempt > session.send_attempt

    # ------------------------------------------------------------------ submitToken

    async def submit_token(self, sid: str, client_secret: str,
                           token: str) -> ValidationSessionRow:
        """Mark the session validated if `token` is its token; answers the session."""
        session = await self._session(sid, client_secret)
        if self._expired(session):
            raise MatrixError(400, M_SESSION_EXPIRED, "This validation session has expired")
        locked = session.failed_attempts >= MAX_FAILED_ATTEMPTS
        right = hmac.compare_digest(token.encode(), session.token.encode())
        if locked or not right:
            if not locked:
                await self._store.sessions.count_failure(session.id)
            raise MatrixError(400, M_TOKEN_INCORRECT, "The token is incorrect")
        if not await self._store.sessions.mark_validated(session.id, self._clock(),
                                                          MAX_FAILED_ATTEMPTS):
            raise MatrixError(400, M_TOKEN_INCORRECT, "The token is incorrect")
        return session

    # ------------------------------------------------------------------ getValidated3pid

    async def get_validated(self, sid: str, client_secret: str) -> ValidatedThreepid:
        session = await self._session(sid, client_secret)
        if self._expired(session):
            raise MatrixError(400, M_SESSION_EXPIRED, "This validation session has expired")
        if session.validated_at is None:
            raise MatrixError(400, M_SESSION_NOT_VALIDATED,
                              "This validation session has not yet been completed")
        return ValidatedThreepid(session.medium, session.address, session.validated_at)

    async def _session(self, sid: str, client_secret: str) -> ValidationSessionRow:
        """The session `sid` if `client_secret` is its secret, else 404."""
        check_client_secret(client_secret)
        if not _SID.fullmatch(sid) or int(sid) > MAX_SID:
            raise no_valid_session()
        session = await self._store.sessions.get(int(sid))
        if session is None or not hmac.compare_digest(session.client_secret.encode(),
                                                      client_secret.encode()):
            raise no_valid_session()
        return session

    async def purge_expired(self) -> int:
        """Delete the sessions no one can use any more (expired); how many went."""
        return await self._store.sessions.delete_older_than(
            self._clock() - SESSION_LIFETIME_MS)

    def _expired(self, session: ValidationSessionRow) -> bool:
        return self._clock() - session.mtime > SESSION_LIFETIME_MS


def session_answer(session: MsisdnSession) -> dict[str, Any]:
    """The msisdn requestToken answer (Sydent adds `msisdn` and `intl_fmt`)."""
    return {"success": True, "sid": session.sid, "msisdn": session.msisdn,
            "intl_fmt": session.intl_fmt}
