"""Sending the rendered email templates over SMTP, without blocking the event loop.

A template is a whole RFC 5322 message, so the sender adds nothing: what the operator
wrote is what the recipient gets (Sydent sends it as-is, and operators rely on that).
One connection per mail: mail is rare (rate limited) and a fresh connection never
trips over a server that dropped an idle one.  The whole exchange (connect, TLS,
login, send, quit) is bounded by one timeout, so a dead or silent SMTP server costs a
request at most that long and never hangs it.

Addresses beyond ASCII: a domain goes into the envelope as IDNA A-labels, which every
server reads; a local part beyond ASCII can only be sent with SMTPUTF8 (RFC 6531), so it
is refused, before anything is stored, unless the SMTP server offers that extension.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import secrets
import ssl
import string
import time
import urllib.parse
from collections.abc import Mapping
from email.header import Header

import aiosmtplib
import idna

from kith.config import EmailConfig
from kith.delivery.templates import INVITE_TEMPLATE, VERIFICATION_TEMPLATE, Templates
from kith.threepid import is_plain_email, now_ms

log = logging.getLogger(__name__)

IMPLICIT_TLS_MODES = ("SSL", "TLS")
STARTTLS_MODE = "STARTTLS"
DEFAULT_TIMEOUT_S = 15.0
# How long what the SMTP server said about SMTPUTF8 is believed.
EXTENSIONS_TTL_S = 600.0


class EmailSendError(Exception):
    """The mail could not be handed to the SMTP server (message holds no secrets)."""


class InvalidEmailAddress(EmailSendError):
    """The recipient is not a bare `local@domain` address that is safe in a header."""


def sender_header(config: EmailConfig) -> str:
    """`email.from`, with `{hostname}` replaced by `email.hostname`.

    Sydent left the placeholder of its own default in place, so mail went out as
    `noreply@{hostname}`, which most servers refuse; kith fills it in.
    """
    return config.sender.replace("{hostname}", config.hostname)


def check_email_address(address: str) -> None:
    """Refuse anything but a plain address: it goes into the `To:` header and the envelope.

    Raises InvalidEmailAddress.
    """
    if not is_plain_email(address):
        raise InvalidEmailAddress("not a valid email address")
    smtp_address(address)


def smtp_address(address: str) -> str:
    """A plain address as the envelope and the `To:` header carry it: a domain beyond
    ASCII in IDNA A-labels (IDNA 2008 with UTS 46 mapping, as registries use), the local
    part unchanged.  Raises InvalidEmailAddress if the domain is no valid IDNA name."""
    local, _, domain = address.rpartition("@")
    if domain.isascii():
        return address
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise InvalidEmailAddress("the domain is no valid internationalised domain name") \
            from None
    return f"{local}@{ascii_domain}"


def needs_smtputf8(address: str) -> bool:
    """Whether mail to `address` needs the SMTPUTF8 extension: a local part beyond ASCII."""
    return not address.rpartition("@")[0].isascii()


class EmailSender:
    """Hands rendered messages to the configured SMTP server (`[email]` keys)."""

    def __init__(self, config: EmailConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tls_cafile: str | None = None) -> None:
        """`tls_cafile`: extra CA certificates (PEM) trusted for the SMTP server;
        None: `config.tls_cafile` (`[email] email.tls_cafile`), if set."""
        self.host = config.smtp_host
        self.port = config.smtp_port
        self.local_hostname = config.hostname or None
        self.tls_mode = config.tls_mode
        self.timeout_s = timeout_s
        self.tls_cafile = tls_cafile if tls_cafile is not None else config.tls_cafile or None
        self._username = config.smtp_username
        self._password = config.smtp_password
        self._tls_context: ssl.SSLContext | None = None
        # (when, whether) the SMTP server last said it offers SMTPUTF8.
        self._smtputf8: tuple[float, bool] | None = None
        self.envelope_sender = email.utils.parseaddr(sender_header(config))[1]
        if not self.envelope_sender:
            log.warning("email.from %r holds no address: mail will be refused", config.sender)
        if self.tls_mode.upper() in (*IMPLICIT_TLS_MODES, STARTTLS_MODE) and \
                self.tls_mode not in (*IMPLICIT_TLS_MODES, STARTTLS_MODE):
            log.warning("email.tlsmode %r is case-sensitive: sending email in plaintext; "
                        "write %s", self.tls_mode, self.tls_mode.upper())
        if self._username and not self.uses_tls:
            log.warning("email.smtpusername is set but email.tlsmode is not SSL, TLS or "
                        "STARTTLS: the SMTP password is sent in plaintext")

    @property
    def uses_tls(self) -> bool:
        return self.tls_mode in (*IMPLICIT_TLS_MODES, STARTTLS_MODE)

    async def undeliverable(self, to_address: str) -> str | None:
        """Why mail cannot be sent to `to_address` (for the caller, before anything is
        stored for it), or None: not a plain address, a domain that is no IDNA name, a
        local part beyond ASCII when the SMTP server does not offer SMTPUTF8.  If the
        server cannot be asked, the address passes: sending fails as for any other."""
        try:
            check_email_address(to_address)
        except InvalidEmailAddress as e:
            return f"The email address is not valid: {e}"
        if needs_smtputf8(to_address) and await self._offers_smtputf8() is False:
            log.info("the SMTP server at %s:%d does not offer SMTPUTF8: refusing an address "
                     "whose local part is beyond ASCII", self.host, self.port)
            return "This server cannot send email to an address with non-ASCII characters " \
                "before the @"
        return None

    async def _offers_smtputf8(self) -> bool | None:
        """Whether the SMTP server offers SMTPUTF8 (asked at most every
        EXTENSIONS_TTL_S), or None if it cannot be asked now."""
        now = time.monotonic()
        if self._smtputf8 is not None and now - self._smtputf8[0] < EXTENSIONS_TTL_S:
            return self._smtputf8[1]
        try:
            smtp = await self._client(login=False)
        except EmailSendError:
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                await smtp.connect()
                if smtp.is_ehlo_or_helo_needed:
                    await smtp.ehlo()
                self._learn_extensions(smtp)
                await smtp.quit()
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ValueError) as e:
            log.info("cannot ask the SMTP server at %s:%d for its extensions: %s",
                     self.host, self.port, type(e).__name__)
        finally:
            smtp.close()
        return self._smtputf8[1] if self._smtputf8 is not None else None

    def _learn_extensions(self, smtp: aiosmtplib.SMTP) -> None:
        if smtp.last_ehlo_response is not None or smtp.last_helo_response is not None:
            self._smtputf8 = (time.monotonic(), smtp.supports_extension("smtputf8"))

    async def _client(self, *, login: bool = True) -> aiosmtplib.SMTP:
        """An unconnected client for the configured server (TLS as configured)."""
        try:
            tls_context = await self._context() if self.uses_tls else None
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise self._error(f"cannot load the CA file: {e}") from None
        login = login and bool(self._username)
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            use_tls=self.tls_mode in IMPLICIT_TLS_MODES,
            start_tls=self.tls_mode == STARTTLS_MODE,  # True: fail if not offered
            tls_context=tls_context,
            timeout=self.timeout_s,
            username=self._username if login else None,
            password=self._password if login else None,
        )

    async def send(self, to_address: str, message: str) -> None:
        """Send `message` (a whole RFC 5322 message) to `to_address`, unchanged.

        Raises EmailSendError (InvalidEmailAddress for a bad recipient) within
        `timeout_s`, whatever the server does.
        """
        check_email_address(to_address)
        if not self.envelope_sender:
            raise EmailSendError("email.from holds no address")
        smtp = await self._client()
        options = ["SMTPUTF8"] if needs_smtputf8(to_address) else []
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await smtp.connect()
                try:
                    await smtp.sendmail(self.envelope_sender, [smtp_address(to_address)],
                                        message.encode("utf-8"), mail_options=options)
                finally:
                    self._learn_extensions(smtp)
        except TimeoutError:
            smtp.close()
            raise self._error(f"no answer within {self.timeout_s:g} s") from None
        except (aiosmtplib.SMTPException, OSError, ValueError) as e:
            smtp.close()
            raise self._error(f"{type(e).__name__}: {e}") from None
        try:  # the server has taken the mail: a failed goodbye is no failure
            async with asyncio.timeout_at(deadline):
                await smtp.quit()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            pass
        finally:
            smtp.close()
        log.info("sent an email to %s via %s:%d in %.0f ms", to_address, self.host, self.port,
                 (time.monotonic() - started) * 1000)

    def _error(self, problem: str) -> EmailSendError:
        if self._password:
            problem = problem.replace(self._password, "***")
        message = f"sending email via {self.host}:{self.port} failed: {problem[:300]}"
        log.warning("%s", message)
        return EmailSendError(message)

    async def _context(self) -> ssl.SSLContext:
        """Verify certificate and hostname; loading CA files reads the disk: in a thread."""
        if self._tls_context is None:
            self._tls_context = await asyncio.to_thread(_tls_context, self.tls_cafile)
        return self._tls_context


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile:
        context.load_verify_locations(cafile=cafile)
    return context


# --------------------------------------------------------------------- message variables


def message_id(hostname: str) -> str:
    """`<{ms}{16 random letters}@{hostname}>`, as Sydent's."""
    letters = "".join(secrets.choice(string.ascii_letters) for _ in range(16))
    return f"<{now_ms()}{letters}@{hostname}>"


def common_variables(config: EmailConfig, to_address: str) -> dict[str, str]:
    """The variables of every mail: `messageid`, `date`, `to`, `from`."""
    return {
        "messageid": message_id(config.hostname),
        "date": email.utils.formatdate(localtime=False),
        "to": smtp_address(to_address),
        "from": sender_header(config),
    }


def validation_link(client_http_base: str, *, token: str, client_secret: str,
                    sid: int | str, api_prefix: str = "/_matrix/identity/api/v1") -> str:
    """The submitToken link of a verification mail.

    Sydent also puts the session's next_link into it (as `nextLink`) and redirects to
    whatever that parameter says; kith redirects to the next_link stored with the
    session, so the link stays short (a mail's lines must stay under 1000 bytes, and a
    URL-encoded next_link can triple in length) and cannot be made to redirect elsewhere.
    """
    quote = urllib.parse.quote
    return (f"{client_http_base}{api_prefix}/validate/email/submitToken"
            f"?token={quote(token)}&client_secret={quote(client_secret)}&sid={quote(str(sid))}")


INVITE_OPTIONAL_VARIABLES = (
    "room_id", "sender", "room_name", "room_type", "room_avatar_url", "sender_display_name",
    "sender_avatar_url", "guest_user_id", "guest_access_token",
)
# The names a person chose that the invite mail shows, shortened as Sydent shortens
# them (longer than `longest`: the first `kept` characters and an ellipsis), so an
# invite cannot carry a paragraph of its sender's text.  Sydent shortens the display
# name and the room name; the alias is a room's name too.
SHORTENED_NAMES = {  # variable: (longest, kept)
    "sender_display_name": (20, 19),
    "room_name": (30, 25),
    "room_alias": (30, 25),
}


def shortened(text: str, longest: int, kept: int) -> str:
    return text if len(text) <= longest else text[:kept] + "…"


class EmailTemplates:
    """Renders kith's mails: the variables Sydent's templates expect, in the brand's template.

    Rendering reads template files, so it runs in a thread.
    """

    def __init__(self, templates: Templates, config: EmailConfig) -> None:
        self.templates = templates
        self.config = config

    async def verification(self, to_address: str, *, token: str, link: str,
                           ipaddress: str | None = None, brand: str | None = None) -> str:
        """The mail carrying an email validation token (`verification_template.eml`)."""
        check_email_address(to_address)
        variables = {
            "token": token,
            "link": link,
            "ipaddress": ipaddress or "an unknown location",
            **common_variables(self.config, to_address),
        }
        return await self.templates.render_async(VERIFICATION_TEMPLATE, variables, brand)

    async def invite(self, to_address: str, args: Mapping[str, object], *, token: str,
                     ephemeral_private_key: str, verified_sender: str | None = None,
                     sign_url: str = "", brand: str | None = None) -> str:
        """The mail inviting an email address to a room (`invite_template.eml`).

        `args` are the store-invite request's fields (strings are kept);
        `verified_sender` is the authenticated sender's MXID (v2 only);
        `sign_url` (kith) is where a client gets the invite signed, or "".
        """
        check_email_address(to_address)
        variables = invite_variables(
            self.config, to_address, args, token=token,
            ephemeral_private_key=ephemeral_private_key,
            verified_sender=verified_sender, sign_url=sign_url)
        return await self.templates.render_async(INVITE_TEMPLATE, variables, brand)


def invite_variables(config: EmailConfig, to_address: str, args: Mapping[str, object], *,
                     token: str, ephemeral_private_key: str,
                     verified_sender: str | None = None, sign_url: str = "") -> dict[str, str]:
    """Sydent's invite variables: the request's strings, shortened names, and extras."""
    values = {key: value for key, value in args.items() if isinstance(value, str)}
    for key in INVITE_OPTIONAL_VARIABLES:
        values.setdefault(key, "")
    for name, (longest, kept) in SHORTENED_NAMES.items():
        if name in values:
            values[name] = shortened(values[name], longest, kept)
    room_name = values["room_name"]
    values["bracketed_room_name"] = f"({room_name}) " if room_name else ""
    values["bracketed_verified_sender"] = f"({verified_sender}) " if verified_sender else ""
    values["web_client_location"] = _web_client_location(
        values.get("org.matrix.web_client_location", ""), config.default_web_client_location)
    values["token"] = token
    values["ephemeral_private_key"] = ephemeral_private_key
    values["sign_url"] = sign_url
    subject = (config.invite_subject_space if values["room_type"] == "m.space"
               else config.invite_subject)
    try:
        subject %= _LenientVariables(  # a subject never starts with " has invited you"
            values, sender_display_name=values["sender_display_name"] or values["sender"])
    except (ValueError, TypeError):
        log.warning("email.invite.subject is not a valid %%-format string: sent as written")
    values["subject_header_value"] = Header(subject, "utf-8").encode()
    values.update(common_variables(config, to_address))  # a request cannot set To or From
    return values


def _web_client_location(requested: str, default: str) -> str:
    """Only http(s) web clients: the location becomes a link in the mail."""
    if requested.startswith(("https://", "http://")):
        return requested.rstrip("/")
    return default.rstrip("/")


class _LenientVariables(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""
