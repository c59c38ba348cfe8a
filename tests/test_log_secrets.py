"""No secret in kith's log, at any level: the main flows against a kith process logging
at DEBUG, then its whole log searched for every token, secret and password used."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from unpaddedbase64 import encode_base64

from kith.config import load_config, parse_signing_key
from tests import log_audit
from tests.api.test_invites import mailed_invite
from tests.api.test_validation import mailed_token
from tests.conftest import (
    Homeserver,
    KithProcessFactory,
    OpenMarket,
    SmtpSink,
    wait_for,
    write_config,
)

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"
SMTP_LOGIN, SMTP_PASSWORD = "kith-mailer", "smtp-" + secrets.token_hex(12)
SMS_LOGIN, SMS_PASSWORD = "kith-sms", "sms-" + secrets.token_hex(12)


class AuthSmtpSink(SmtpSink):
    """The SMTP sink, wanting a login (over plain text: the test is on loopback)."""

    def start(self) -> None:
        self._controller = Controller(
            self, hostname="127.0.0.1", port=self.port, authenticator=self.authenticate,
            auth_require_tls=False)
        self._controller.start()

    @staticmethod
    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode(), auth_data.password.decode()) == (SMTP_LOGIN,
                                                                       SMTP_PASSWORD)
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_with_login() -> Iterator[SmtpSink]:
    sink = AuthSmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"db.file": tmp_path / "kith.db"}
    return {"db.url": request.getfixturevalue("postgresql_url")}


class Flows:
    """Calls to kith's API, remembering every secret that went over the wire."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.secrets: dict[str, str] = {}

    def secret(self, what: str, value: str) -> str:
        self.secrets[what] = value
        log_audit.remember(what, value)
        return value

    async def call(self, method: str, path: str, body: Any = None, *, auth: str = "",
                   expect: int = 200, query: dict[str, str] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        async with self.http.request(method, self.base + path, json=body, params=query,
                                     headers=headers, allow_redirects=False) as resp:
            answer = (await resp.json() if resp.content_type == "application/json"
                      else await resp.text())
            assert resp.status == expect, (method, path, resp.status, answer)
            return answer


async def test_no_secret_reaches_the_log_at_debug(
        tmp_path: Path, kith_process: KithProcessFactory, homeserver: Homeserver,
        smtp_with_login: SmtpSink, openmarket: OpenMarket,
        db_section: dict[str, Any]) -> None:
    path = write_config(tmp_path, {
        "general": {"log.level": "DEBUG"},
        "db": db_section,
        "http": {"federation.test_overrides": f"{homeserver.server_name}={homeserver.url}"},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp_with_login.port,
                  "email.smtpusername": SMTP_LOGIN, "email.smtppassword": SMTP_PASSWORD},
        "sms": {"username": SMS_LOGIN, "password": SMS_PASSWORD,
                "base_url": openmarket.url},
    })
    config = load_config(str(path), env={})  # writes the signing key kith then reads
    seed = encode_base64(parse_signing_key(config.crypto.signing_key).encode())
    kith = kith_process(path)
    kith.start(config.http.client_port)
    async with aiohttp.ClientSession() as http:
        flows = Flows(http, f"http://127.0.0.1:{config.http.client_port}")
        await run_the_main_flows(flows, homeserver, smtp_with_login, openmarket)
    kith.kill(15)

    known = {
        **flows.secrets, "signing key seed": seed,
        "SMTP password": SMTP_PASSWORD, "SMS password": SMS_PASSWORD,
        "SMTP AUTH PLAIN": base64.b64encode(
            f"\0{SMTP_LOGIN}\0{SMTP_PASSWORD}".encode()).decode(),
        "SMTP AUTH LOGIN password": base64.b64encode(SMTP_PASSWORD.encode()).decode(),
        "SMS basic auth": base64.b64encode(f"{SMS_LOGIN}:{SMS_PASSWORD}".encode()).decode(),
    }
    log = (tmp_path / "kith.log").read_text(encoding="utf-8")
    assert " DEBUG " in log and "kith started" in log, log[-2000:]
    leaked = [what for what, value in known.items()
              if re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", log)]
    assert leaked == [], f"in the log: {leaked}"


async def run_the_main_flows(flows: Flows, hs: Homeserver, smtp: SmtpSink,
                             sms: OpenMarket) -> None:
    """register, store-invite, sign-ed25519 (v2 body, v1 query), requestToken for email
    and msisdn, submitToken by POST and by the mailed GET link, bind (with the onbind
    callback), lookup, the query-string access token, unbind, logout."""
    openid = flows.secret("OpenID token", secrets.token_urlsafe(24))
    hs.tokens[openid] = "@alice:hs.test"
    register = await flows.call("POST", f"{V2}/account/register", {
        "access_token": openid, "token_type": "Bearer",
        "matrix_server_name": hs.server_name, "expires_in": 3600})
    token = flows.secret("access token", register["token"])
    address = "alice.invitee@example.org"

    await flows.call("POST", f"{V2}/store-invite", {
        "medium": "email", "address": address, "room_id": "!room:hs.test",
        "sender": "@alice:hs.test"}, auth=token)
    invite_token, private_key = mailed_invite(smtp)
    flows.secret("invite token", invite_token)
    flows.secret("ephemeral private key", private_key)
    await flows.call("POST", f"{V2}/sign-ed25519", {
        "mxid": "@alice:hs.test", "token": invite_token, "private_key": private_key},
        auth=token)
    await flows.call("POST", f"{V1}/sign-ed25519", query={
        "mxid": "@alice:hs.test", "token": invite_token, "private_key": private_key})

    first = flows.secret("client secret 1", secrets.token_urlsafe(18))
    sid = (await flows.call("POST", f"{V2}/validate/email/requestToken", {
        "client_secret": first, "email": address, "send_attempt": 1}, auth=token))["sid"]
    wrong = flows.secret("a wrong validation token", secrets.token_hex(16))
    await flows.call("POST", f"{V2}/validate/email/submitToken", {
        "sid": sid, "client_secret": first, "token": wrong}, auth=token, expect=400)
    code = flows.secret("email validation token", mailed_token(smtp))
    await flows.call("POST", f"{V2}/validate/email/submitToken", {
        "sid": sid, "client_secret": first, "token": code}, auth=token)
    await flows.call("POST", f"{V2}/3pid/bind", {
        "sid": sid, "client_secret": first, "mxid": "@alice:hs.test"}, auth=token)
    await wait_for("the onbind callback", lambda: hs.onbinds)

    details = await flows.call("GET", f"{V2}/hash_details", query={"access_token": token})
    digest = hashlib.sha256(f"{address} email {details['lookup_pepper']}".encode()).digest()
    lookup = await flows.call("POST", f"{V2}/lookup", {
        "algorithm": "sha256", "pepper": details["lookup_pepper"],
        "addresses": [base64.urlsafe_b64encode(digest).rstrip(b"=").decode()]},
        auth=token)
    assert list(lookup["mappings"].values()) == ["@alice:hs.test"]

    second = flows.secret("client secret 2", secrets.token_urlsafe(18))
    sid2 = (await flows.call("POST", f"{V2}/validate/email/requestToken", {
        "client_secret": second, "email": "alice.work@example.org", "send_attempt": 1},
        auth=token))["sid"]
    link = re.search(r"(/_matrix/\S+/validate/email/submitToken\?\S+)", smtp.messages[-1][1])
    assert link is not None
    flows.secret("email validation token 2", mailed_token(smtp))
    await flows.call("GET", link.group(1).replace("&amp;", "&").replace("=3D", "="))
    assert sid2

    third = flows.secret("client secret 3", secrets.token_urlsafe(18))
    msisdn = await flows.call("POST", f"{V2}/validate/msisdn/requestToken", {
        "client_secret": third, "country": "GB", "phone_number": "07911 123456",
        "send_attempt": 1}, auth=token)
    sms_code = flows.secret("SMS code", sms.last_code())
    await flows.call("POST", f"{V2}/validate/msisdn/submitToken", {
        "sid": msisdn["sid"], "client_secret": third, "token": sms_code}, auth=token)
    await flows.call("POST", f"{V2}/3pid/bind", {
        "sid": msisdn["sid"], "client_secret": third, "mxid": "@alice:hs.test"},
        auth=token)

    await flows.call("POST", f"{V2}/3pid/unbind", {
        "sid": sid, "client_secret": first, "mxid": "@alice:hs.test",
        "threepid": {"medium": "email", "address": address}}, auth=token)
    await flows.call("POST", f"{V2}/account/logout", {}, auth=token)
    await flows.call("GET", f"{V2}/account", auth=token, expect=401)

