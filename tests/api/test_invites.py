"""store-invite, sign-ed25519 and ephemeral keys, with a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import email
import email.policy
import re
from typing import Any

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from kith.services.invites import redact, redact_email_address
from tests.api.test_validation import call
from tests.conftest import KithFactory, RunningKith, SmtpSink

V1 = "/_matrix/identity/api/v1"
ALICE = "@alice:hs.test"
ROOM = "!room:hs.test"


def mail_config(smtp: SmtpSink, **email_keys: Any) -> dict[str, dict[str, Any]]:
    return {"email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port,
                      **email_keys}}


@pytest.fixture
async def mail_kith(kith_factory: KithFactory, smtp: SmtpSink) -> RunningKith:
    return await kith_factory(mail_config(smtp))  # type: ignore[no-any-return]


def invite_body(address: str = "bob.smith@example.com", **extra: Any) -> dict[str, Any]:
    return {"medium": "email", "address": address, "room_id": ROOM, "sender": ALICE,
            "room_name": "Plans", "sender_display_name": "Alice", **extra}


async def store_invite(kith: RunningKith, token: str | None,
                       body: Any = None, **extra: Any) -> tuple[int, Any]:
    return await call(kith, token, "POST", "/store-invite",
                      invite_body(**extra) if body is None else body)


def parsed(smtp: SmtpSink, index: int = -1) -> email.message.EmailMessage:
    message = email.message_from_string(smtp.messages[index][1], policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def mailed_invite(smtp: SmtpSink, index: int = -1) -> tuple[str, str]:
    """(token, ephemeral private key) from the sign URL in the invite mail."""
    text = smtp.messages[index][1]
    token = re.search(r"token%3D([A-Za-z]{128})", text)
    key = re.search(r"private_key%3D([A-Za-z0-9_-]{43})", text)
    assert token and key, text
    return token.group(1), key.group(1)


async def server_key(kith: RunningKith) -> str:
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/pubkey/ed25519:0") as r:
        return str((await r.json())["public_key"])


async def ephemeral_valid(kith: RunningKith, public_key: str) -> bool:
    status, body = await call(kith, None, "GET", "/pubkey/ephemeral/isvalid",
                              params={"public_key": public_key})
    assert status == 200
    return bool(body["valid"])


# --------------------------------------------------------------------------- the flow

async def test_store_invite_mails_the_invite_and_answers_keys(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(mail_kith, token)
    assert status == 200, body
    assert set(body) == {"token", "public_key", "public_keys", "display_name"}
    assert body["display_name"] == "bob...@exa..."
    key = await server_key(mail_kith)
    assert body["public_key"] == key
    server, ephemeral = body["public_keys"]
    # No client_http_base: the URLs are built from server.name, and are absolute.
    assert server == {"public_key": key, "key_validity_url":
                      "https://kith.test/_matrix/identity/v2/pubkey/isvalid"}
    assert ephemeral["key_validity_url"] == \
        "https://kith.test/_matrix/identity/v2/pubkey/ephemeral/isvalid"
    assert re.fullmatch(r"[A-Za-z]{128}", body["token"])

    assert len(smtp.messages) == 1
    recipients, _ = smtp.messages[0]
    assert recipients == ["bob.smith@example.com"]
    mail = parsed(smtp)
    assert mail["Subject"] == "Alice has invited you to chat"
    assert mail["To"] == "bob.smith@example.com"
    text = smtp.messages[0][1]
    assert "Plans" in text and f"({ALICE})" in text
    mailed_token, private_key = mailed_invite(smtp)
    assert mailed_token == body["token"]

    # The ephemeral key is valid (either base64 alphabet); others are not.
    assert await ephemeral_valid(mail_kith, ephemeral["public_key"])
    std = ephemeral["public_key"].replace("-", "+").replace("_", "/")
    assert await ephemeral_valid(mail_kith, std)
    assert not await ephemeral_valid(mail_kith, key)

    # The private key from the mail signs {mxid, sender, token} for the invitee.
    status, signed = await call(mail_kith, token, "POST", "/sign-ed25519", {
        "mxid": "@bob:hs.test", "token": body["token"], "private_key": private_key})
    assert status == 200, signed
    assert {k: signed[k] for k in ("mxid", "sender", "token")} == {
        "mxid": "@bob:hs.test", "sender": ALICE, "token": body["token"]}
    verify_key = decode_verify_key_bytes("ed25519:0", decode_base64(ephemeral["public_key"]))
    verify_signed_json(signed, "kith.test", verify_key)


async def test_space_invites_use_the_space_subject(mail_kith: RunningKith,
                                                   smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(mail_kith, token, room_type="m.space")
    assert status == 200, body
    assert parsed(smtp)["Subject"] == "Alice has invited you to a space"


async def test_web_client_location_and_extra_fields_reach_the_mail(
        mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(
        mail_kith, token, **{"org.matrix.web_client_location": "https://chat.example.org"})
    assert status == 200, body
    assert "https://chat.example.org/#/room/" in smtp.messages[-1][1]
    status, body = await store_invite(mail_kith, token, address="c@example.com")
    assert status == 200, body
    assert "https://app.element.io/#/room/" in smtp.messages[-1][1]


async def test_client_http_base_makes_the_key_validity_urls(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail_config(smtp),
                               "http": {"client_http_base": "https://id.example.org/"}})
    token = await kith.register("alice")
    status, body = await store_invite(kith, token)
    assert status == 200, body
    assert [k["key_validity_url"] for k in body["public_keys"]] == [
        "https://id.example.org/_matrix/identity/v2/pubkey/isvalid",
        "https://id.example.org/_matrix/identity/v2/pubkey/ephemeral/isvalid"]


async def test_obfuscation_settings_shape_the_display_name(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory(mail_config(
        smtp, **{"email.third_party_invite_username_obfuscate_characters": 5,
                 "email.third_party_invite_domain_obfuscate_characters": 1}))
    token = await kith.register("alice")
    status, body = await store_invite(kith, token, address="Bob.Smith@Example.com")
    assert status == 200, body
    assert body["display_name"] == "Bob.S...@E..."


def test_redaction_rule() -> None:
    assert redact("bob.smith", 3) == "bob..."
    assert redact("bob", 3) == "b..."          # not longer than 3, not longer than 5
    assert redact("robert", 10) == "rob..."    # longer than 5
    assert redact("b", 3) == "..."
    assert redact("", 3) == "..."
    assert redact_email_address("ab@example.com", 3, 3) == "a...@exa..."


async def test_web_client_signs_through_the_v1_sign_url(mail_kith: RunningKith,
                                                        smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(mail_kith, token)
    assert status == 200, body
    link = re.search(r"signurl=([^&\s]+)", smtp.messages[-1][1])
    assert link, smtp.messages[-1][1]
    from urllib.parse import unquote
    sign_url = unquote(link.group(1))
    assert sign_url.startswith(f"https://kith.test{V1}/sign-ed25519?token=")
    # Element POSTs the sign URL with `mxid` added and no body (and no IS token).
    query = sign_url.split("?", 1)[1] + "&mxid=%40bob%3Ahs.test"
    async with mail_kith.http.post(f"{mail_kith.base}{V1}/sign-ed25519?{query}") as r:
        signed = await r.json()
        assert r.status == 200, signed
    assert (signed["mxid"], signed["token"]) == ("@bob:hs.test", body["token"])


# ---------------------------------------------------------------------------- refusals

async def test_bound_address_is_threepid_in_use(mail_kith: RunningKith,
                                                smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    await mail_kith.bind("carol@example.com", "@carol:hs.test")
    status, body = await store_invite(mail_kith, token, address="Carol@Example.com")
    assert status == 400
    assert body["errcode"] == "M_THREEPID_IN_USE" and body["mxid"] == "@carol:hs.test"
    assert smtp.messages == []


async def test_msisdn_is_unrecognized(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(mail_kith, token,
                                      medium="msisdn", address="15555550100")
    assert (status, body["errcode"]) == (400, "M_UNRECOGNIZED")
    assert smtp.messages == []


@pytest.mark.parametrize("field,value", [
    ("sender", "@mallory:evil.test"),
    ("room_id", "!room:badrooms.test"),
    ("room_name", "Big CASINO night"),
    ("sender_display_name", "free-Casino"),
])
async def test_blocklists_refuse_with_403(kith_factory: KithFactory, smtp: SmtpSink,
                                          field: str, value: str) -> None:
    kith = await kith_factory(mail_config(smtp, **{
        "email.third_party_invite_homeserver_blocklist": "other.test\n  evil.test",
        "email.third_party_invite_room_blocklist": "badrooms.test",
        "email.third_party_invite_keyword_blocklist": "casino",
    }))
    token = await kith.register("alice")
    status, body = await store_invite(kith, token, **{field: value})
    assert (status, body["errcode"]) == (403, "M_UNAUTHORIZED"), body
    assert smtp.messages == []
    status, body = await store_invite(kith, token)
    assert status == 200, body


async def test_sender_is_rate_limited(kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory(mail_config(smtp, **{"email.ratelimit_sender.burst": 2}))
    token = await kith.register("alice")
    for n in range(2):
        status, body = await store_invite(kith, token, address=f"x{n}@example.com")
        assert status == 200, body
    status, body = await store_invite(kith, token, address="x3@example.com")
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert len(smtp.messages) == 2
    dave = await kith.register("dave")
    status, body = await store_invite(kith, dave, address="x4@example.com",
                                      sender="@dave:hs.test")
    assert status == 200, body


async def test_store_invite_needs_a_token(mail_kith: RunningKith) -> None:
    status, body = await store_invite(mail_kith, None)
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")
    status, body = await store_invite(mail_kith, "not-a-token")
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


@pytest.mark.parametrize("body,errcode", [
    ([1, 2], "M_BAD_JSON"),
    ("text", "M_BAD_JSON"),
    ({"medium": "email", "address": "b@example.com", "room_id": ROOM}, "M_MISSING_PARAMS"),
    ({"medium": "email", "address": "b@example.com", "sender": ALICE}, "M_MISSING_PARAMS"),
    ({"address": "b@example.com", "room_id": ROOM, "sender": ALICE}, "M_MISSING_PARAMS"),
    ({**invite_body(), "address": 5}, "M_INVALID_PARAM"),
    (invite_body(room_id=None), "M_INVALID_PARAM"),
    (invite_body(room_name=["x"]), "M_INVALID_PARAM"),
    (invite_body(address="not an address"), "M_INVALID_EMAIL"),
    (invite_body(address="a@b.c\r\nBcc: x@y.z"), "M_INVALID_EMAIL"),
    (invite_body(sender="alice"), "M_INVALID_PARAM"),
    (invite_body(room_id="#alias:hs.test"), "M_INVALID_PARAM"),
])
async def test_bad_store_invite_requests(mail_kith: RunningKith, smtp: SmtpSink,
                                         body: Any, errcode: str) -> None:
    token = await mail_kith.register("alice")
    status, answer = await store_invite(mail_kith, token, body)
    assert (status, answer["errcode"]) == (400, errcode), answer
    assert smtp.messages == []


async def test_non_json_body_is_not_json(mail_kith: RunningKith) -> None:
    token = await mail_kith.register("alice")
    for path in ("/store-invite", "/sign-ed25519"):
        status, body = await call(mail_kith, token, "POST", path, data=b"{nope")
        assert (status, body["errcode"]) == (400, "M_NOT_JSON")


async def test_mail_failure_stores_nothing(kith: RunningKith) -> None:
    # The default test config points SMTP at a closed port.
    token = await kith.register("alice")
    status, body = await store_invite(kith, token)
    assert (status, body["errcode"]) == (500, "M_EMAIL_SEND_ERROR")
    async with kith.server.store.db.engine.connect() as conn:  # type: ignore[union-attr]
        from sqlalchemy import text
        count = (await conn.execute(text("SELECT count(*) FROM invite_tokens"))).scalar()
        keys = (await conn.execute(text("SELECT count(*) FROM ephemeral_public_keys"))).scalar()
    assert (count, keys) == (0, 0)


# ------------------------------------------------------------------------ sign-ed25519

async def test_sign_ed25519_refusals(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    token = await mail_kith.register("alice")
    status, body = await store_invite(mail_kith, token)
    assert status == 200
    _, private_key = mailed_invite(smtp)
    good = {"mxid": "@bob:hs.test", "token": body["token"], "private_key": private_key}

    status, answer = await call(mail_kith, None, "POST", "/sign-ed25519", good)
    assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")
    status, answer = await call(mail_kith, token, "POST", "/sign-ed25519",
                                {**good, "token": "nope"})
    assert (status, answer["errcode"]) == (404, "M_UNRECOGNIZED")
    for bad in ({"private_key": "!!!"}, {"private_key": "AAAA"}, {"mxid": "bob"},
                {"mxid": 5}):
        status, answer = await call(mail_kith, token, "POST", "/sign-ed25519",
                                    {**good, **bad})
        assert (status, answer["errcode"]) == (400, "M_INVALID_PARAM"), (bad, answer)
    status, answer = await call(mail_kith, token, "POST", "/sign-ed25519",
                                {"mxid": "@bob:hs.test", "token": body["token"]})
    assert (status, answer["errcode"]) == (400, "M_MISSING_PARAMS")
    status, answer = await call(mail_kith, token, "POST", "/sign-ed25519", [good])
    assert (status, answer["errcode"]) == (400, "M_BAD_JSON")


async def test_store_invite_is_post_only(mail_kith: RunningKith) -> None:
    status, body = await call(mail_kith, None, "GET", "/store-invite")
    assert (status, body["errcode"]) == (405, "M_UNRECOGNIZED")


async def test_v1_store_invite_needs_no_token(mail_kith: RunningKith, smtp: SmtpSink) -> None:
    async with mail_kith.http.post(f"{mail_kith.base}{V1}/store-invite",
                                   json=invite_body()) as r:
        body = await r.json()
        assert r.status == 200, body
    assert body["display_name"] == "bob...@exa..."
    assert f"({ALICE})" not in smtp.messages[-1][1]  # no verified sender on v1


async def test_without_v1_the_mail_has_no_sign_url(kith_factory: KithFactory,
                                                   smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail_config(smtp), "general": {"enable_v1_access": "false"}})
    token = await kith.register("alice")
    status, body = await store_invite(kith, token)
    assert status == 200, body
    assert "signurl=" not in smtp.messages[-1][1]
