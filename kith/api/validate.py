"""requestToken and submitToken for email and msisdn: starting and completing validation.

The POST forms answer JSON; GET submitToken is the link in the verification mail and
answers the brand's HTML page, or a 302 to the session's next_link on success.
"""

from __future__ import annotations

import re
import urllib.parse

import msgspec
from aiohttp import web

from kith.api.fields import Url
from kith.api.http import (
    access_token,
    caller,
    client_ip,
    json_body,
    json_response,
    requester,
    services_of,
)
from kith.errors import MatrixError, invalid_param, missing_params
from kith.services.validation import next_link_with_sid, session_answer

V2 = "/_matrix/identity/v2"
MAX_SEND_ATTEMPT = 2**31 - 1
_DECIMAL_DIGITS = re.compile(r"[0-9]{1,10}")

# What a person reads after clicking the mailed link: what happened and what to do next.
VALIDATED_MESSAGE = ("Verification successful! Your email address is confirmed. Please "
                     "return to your Matrix client to continue; you can close this page.")
FAILED_MESSAGE = ("Verification failed: this link has expired, was used already or is "
                  "incomplete. Ask your Matrix client to send a new verification email, "
                  "and open the link in the newest one.")


class EmailRequestToken(msgspec.Struct):
    client_secret: str
    email: str
    send_attempt: int | str
    next_link: Url | None = None


class MsisdnRequestToken(msgspec.Struct):
    client_secret: str
    country: str
    phone_number: str
    send_attempt: int | str
    next_link: Url | None = None


class SubmitToken(msgspec.Struct):
    sid: str | int
    client_secret: str
    token: str


def send_attempt_of(value: int | str) -> int:
    """The spec's integer, or a string of decimal digits: matrix-js-sdk (Element) sends
    `"1"`, and Sydent accepts it (docs/decisions.md)."""
    if isinstance(value, str):
        if not _DECIMAL_DIGITS.fullmatch(value):
            raise invalid_param(f"send_attempt must be an integer, not {value[:20]!r}")
        value = int(value)
    if not 0 <= value <= MAX_SEND_ATTEMPT:
        raise invalid_param(f"send_attempt must be between 0 and {MAX_SEND_ATTEMPT}")
    return value


def query_params(request: web.Request, *names: str) -> list[str]:
    missing = [name for name in names if not request.query.get(name)]
    if missing:
        raise missing_params(*missing)
    return [request.query[name] for name in names]


def is_safe_redirect(link: str | None) -> bool:
    """Only http(s) links with a host: never javascript:, data:, file: and the like."""
    if not link:
        return False
    parsed = urllib.parse.urlsplit(link)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


async def email_request_token(request: web.Request) -> web.Response:
    account = await caller(request)
    body = await json_body(request, EmailRequestToken)
    sid = await services_of(request).validation.request_email_token(
        body.client_secret, body.email, send_attempt_of(body.send_attempt), body.next_link,
        brand=request.query.get("brand"), requester=requester(request, account),
        requester_ip=client_ip(request))
    return json_response({"sid": sid})


async def msisdn_request_token(request: web.Request) -> web.Response:
    account = await caller(request)
    body = await json_body(request, MsisdnRequestToken)
    session = await services_of(request).validation.request_msisdn_token(
        body.client_secret, body.country, body.phone_number,
        send_attempt_of(body.send_attempt), body.next_link,
        requester=requester(request, account))
    return json_response(session_answer(session))


async def submit_token_post(request: web.Request) -> web.Response:
    await caller(request)
    body = await json_body(request, SubmitToken)
    await services_of(request).validation.submit_token(
        str(body.sid), body.client_secret, body.token)
    return json_response({"success": True})


# The page needs no script: none may run on it, whatever a brand's template holds (it
# carries a token in its URL).  Styles, pictures and fonts a template names may load.
PAGE_POLICY = ("default-src 'none'; script-src 'none'; style-src 'unsafe-inline' https:; "
               "img-src 'self' data: https:; font-src 'self' data: https:; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def html_page(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers={
        "Content-Security-Policy": PAGE_POLICY, "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store"})


async def submit_token_get(request: web.Request) -> web.Response:
    """The mail's link: an HTML page for a person, or a 302 to next_link.

    A person clicking the link in a mail has no access token: the token, sid and client
    secret in the link are the proof. A caller that does send a token is checked.
    """
    if access_token(request) is not None:
        await caller(request)
    sid, client_secret, token = query_params(request, "sid", "client_secret", "token")
    brand = request.query.get("brand")
    templates = services_of(request).templates
    try:
        session = await services_of(request).validation.submit_token(sid, client_secret, token)
    except MatrixError as exc:
        if exc.status >= 500:
            raise
        page = await templates.render_verify_response_async(FAILED_MESSAGE, brand)
        return html_page(page, status=400)
    if session.next_link is not None and is_safe_redirect(session.next_link):
        raise web.HTTPFound(next_link_with_sid(session.next_link, sid))
    page = await templates.render_verify_response_async(VALIDATED_MESSAGE, brand)
    return html_page(page)


def add_routes(router: web.UrlDispatcher, prefix: str = V2) -> None:
    """The same handlers serve v2 and, under the v1 prefix, the legacy API."""
    router.add_post(f"{prefix}/validate/email/requestToken", email_request_token)
    router.add_post(f"{prefix}/validate/email/submitToken", submit_token_post)
    router.add_get(f"{prefix}/validate/email/submitToken", submit_token_get, allow_head=False)
    router.add_post(f"{prefix}/validate/msisdn/requestToken", msisdn_request_token)
    router.add_post(f"{prefix}/validate/msisdn/submitToken", submit_token_post)
    router.add_get(f"{prefix}/validate/msisdn/submitToken", submit_token_get, allow_head=False)
