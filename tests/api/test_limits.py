"""Abuse limits seen from a client: nothing is stored before the limits are checked,
stored and mailed strings are bounded, invites come from their sender, and mail, texts
and invites are limited per recipient and per client address (X-Forwarded-For behind
a proxy), on v2 and v1 alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from kith.store.schema import invite_tokens, rate_limits, threepid_validation_sessions
from tests.api.test_invites import ephemeral_valid, invite_body, parsed
from tests.api.test_validation import V2, call, request_email
from tests.conftest import KithFactory, OpenMarket, RunningKith, SmtpSink, wait_for

V1 = "/_matrix/identity/api/v1"


def mail(smtp: SmtpSink, **email: Any) -> dict[str, dict[str, Any]]:
    return {"email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port, **email}}


async def rows(kith: RunningKith, table: Any) -> int:
    async with kith.server.store.db.engine.connect() as conn:  # type: ignore[union-attr]
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def database_bytes(kith: RunningKith) -> int:
    """The SQLite file and its write-ahead log together."""
    path = Path(kith.config.db.file)
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


async def post(kith: RunningKith, path: str, body: Any, token: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    all_headers = {**({"Authorization": f"Bearer {token}"} if token else {}),
                   **(headers or {})}
    async with kith.http.post(f"{kith.base}{path}", json=body, headers=all_headers) as resp:
        return resp.status, await resp.json()


def assert_limited(status: int, body: Any) -> None:
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED"), body
    assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0


# ------------------------------------------------------------- limits before writes

async def test_refused_request_tokens_store_nothing(kith_factory: KithFactory,
                                                    smtp: SmtpSink) -> None:
    kith = await kith_factory(mail(smtp, **{"email.ratelimit_recipient.burst": 2}))
    token = await kith.register("alice")
    for n in range(2):
        status, body = await request_email(kith, token, secret=f"s{n}",
                                           next_link="https://app.example/#/register")
        assert status == 200, body
    before = database_bytes(kith)
    link = "https://app.example/#/register?" + "x" * 4000  # near the 4096 bound
    for n in range(60):
        assert_limited(*await request_email(kith, token, secret=f"big-{n}", next_link=link))
    assert len(smtp.messages) == 2
    assert await rows(kith, threepid_validation_sessions) == 2
    assert database_bytes(kith) - before < 4096  # under one page for 60 refusals


async def test_next_link_and_invite_fields_are_bounded(kith_factory: KithFactory,
                                                       smtp: SmtpSink) -> None:
    kith = await kith_factory(mail(smtp))
    token = await kith.register("alice")
    status, body = await request_email(kith, token, next_link="https://a.example/" +
                                       "x" * 500_000)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), body
    assert "next_link" in body["error"]
    for field, value in (("room_name", "n" * 1025), ("sender_display_name", "d" * 1025),
                         ("room_alias", "#" + "a" * 300 + ":hs.test"),
                         ("room_avatar_url", "mxc://hs.test/" + "m" * 5000),
                         ("room_id", "!" + "r" * 300 + ":hs.test"),
                         ("org.matrix.web_client_location", "https://" + "w" * 5000),
                         ("an_extra_field", "e" * 5000)):
        status, body = await call(kith, token, "POST", "/store-invite",
                                  invite_body(**{field: value}))
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), (field, body)
    assert smtp.messages == []
    assert await rows(kith, threepid_validation_sessions) == 0
    assert await rows(kith, invite_tokens) == 0


async def test_the_invite_mail_shows_only_the_start_of_names(kith_factory: KithFactory,
                                                             smtp: SmtpSink) -> None:
    kith = await kith_factory(mail(smtp))
    token = await kith.register("alice")
    paragraph = "Click here to claim your prize " * 30  # 930 characters: accepted
    status, body = await call(kith, token, "POST", "/store-invite", invite_body(
        room_name=paragraph, sender_display_name=paragraph))
    assert status == 200, body
    text = smtp.messages[-1][1]
    assert "Click here to claim your prize Click" not in text
    assert "Click here to claim your …" in text  # room name: 25 characters and "…"
    # display name: 19 characters and "…"
    assert parsed(smtp)["Subject"] == "Click here to claim… has invited you to chat"


# ---------------------------------------------------------------------- store-invite

async def test_v2_invites_come_from_the_authenticated_account(kith_factory: KithFactory,
                                                              smtp: SmtpSink) -> None:
    kith = await kith_factory(mail(smtp))
    token = await kith.register("alice")
    status, body = await call(kith, token, "POST", "/store-invite",
                              invite_body(sender="@mallory:hs.test"))
    assert (status, body["errcode"]) == (403, "M_UNAUTHORIZED"), body
    assert smtp.messages == [] and await rows(kith, invite_tokens) == 0


async def test_one_inbox_gets_at_most_the_recipient_burst(kith_factory: KithFactory,
                                                          smtp: SmtpSink) -> None:
    kith = await kith_factory(mail(smtp))  # 5 mails per address, then one per 5 min
    answers = []
    for n in range(8):  # eight senders, each well within its own limit
        token = await kith.register(f"sender{n}")
        answers.append(await call(kith, token, "POST", "/store-invite", invite_body(
            address="victim@example.com", sender=f"@sender{n}:hs.test")))
    assert [status for status, _ in answers] == [200] * 5 + [429] * 3
    assert_limited(*answers[-1])
    assert len(smtp.messages) == 5
    # Validation mails to the same inbox count too.
    token = await kith.register("sender0")
    assert_limited(*await request_email(kith, token, email="victim@example.com"))
    assert await rows(kith, invite_tokens) == 5


async def test_v1_invites_and_tokens_are_limited_per_client_address(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp), "general": {"client_ip.ratelimit.burst": 3}})
    answers = []
    for n in range(10):  # different senders and recipients: one address asks for all
        answers.append(await post(kith, f"{V1}/store-invite", invite_body(
            address=f"to{n}@example.com", sender=f"@spammer{n}:hs.test")))
    assert [status for status, _ in answers] == [200] * 3 + [429] * 7
    assert_limited(*answers[-1])
    assert_limited(*await post(kith, f"{V1}/validate/email/requestToken", {
        "client_secret": "s", "email": "else@example.com", "send_attempt": 1}))
    token = await kith.register("alice")  # an account does not escape its address
    assert_limited(*await request_email(kith, token, email="other@example.com"))
    assert len(smtp.messages) == 3


async def test_registrations_are_limited_per_client_address(kith_factory: KithFactory) -> None:
    """Each registration makes kith ask a homeserver: one address may do it only so often,
    counted apart from what it has kith send."""
    kith = await kith_factory({"general": {"client_ip.ratelimit.burst": 2}})
    for name in ("alice", "bob"):
        await kith.register(name)
    asked = kith.homeserver.calls
    status, body = await post(kith, f"{V2}/account/register", {
        "access_token": kith.homeserver.issue("carol"), "matrix_server_name": "hs.test"})
    assert_limited(status, body)
    assert kith.homeserver.calls == asked  # refused before asking anyone


async def test_many_recipients_from_one_address_are_limited(kith_factory: KithFactory,
                                                            smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp), "general": {"client_ip.ratelimit.burst": 4}})
    tokens = [await kith.register(f"user{n}") for n in range(3)]
    statuses = []
    for n in range(30):
        status, body = await request_email(kith, tokens[n % 3], email=f"r{n}@example.com",
                                           secret=f"s{n}")
        statuses.append(status)
    assert statuses == [200] * 4 + [429] * 26
    assert len(smtp.messages) == 4
    assert await rows(kith, threepid_validation_sessions) == 4


async def test_texts_are_limited_per_client_address(
        kith_factory: KithFactory, openmarket: OpenMarket) -> None:
    kith = await kith_factory({
        "sms": {"username": "om-user", "password": "om-pass", "base_url": openmarket.url},
        "general": {"client_ip.ratelimit.burst": 2}})
    token = await kith.register("alice")
    statuses = []
    for n in range(6):
        status, body = await call(kith, token, "POST", "/validate/msisdn/requestToken", {
            "client_secret": f"s{n}", "country": "GB", "phone_number": f"0791112345{n}",
            "send_attempt": 1})
        statuses.append(status)
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert len(openmarket.requests) == 2


# ------------------------------------------------------------------ X-Forwarded-For

async def test_behind_a_proxy_the_address_it_added_is_the_client(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp), "general": {"client_ip.ratelimit.burst": 1},
                               "http": {"obey_x_forwarded_for": "true"}})

    async def ask(forwarded: str, n: int) -> int:
        status, _ = await post(kith, f"{V1}/validate/email/requestToken", {
            "client_secret": f"s{n}", "email": f"to{n}@example.com", "send_attempt": 1},
            headers={"X-Forwarded-For": forwarded})
        return status

    assert await ask("203.0.113.9, 198.51.100.1", 0) == 200
    # What the client wrote left of the proxy's entry changes nothing.
    assert await ask("192.0.2.55, 198.51.100.1", 1) == 429
    assert await ask("198.51.100.2", 2) == 200
    # IPv6 clients are counted by /64.
    assert await ask("2001:db8:1:2::1", 3) == 200
    assert await ask("2001:db8:1:2:ffff::9", 4) == 429


async def test_without_the_setting_the_header_is_ignored(kith_factory: KithFactory,
                                                         smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp), "general": {"client_ip.ratelimit.burst": 1}})
    statuses = []
    for n in range(3):
        status, _ = await post(kith, f"{V1}/validate/email/requestToken", {
            "client_secret": f"s{n}", "email": f"to{n}@example.com", "send_attempt": 1},
            headers={"X-Forwarded-For": f"198.51.100.{n}"})
        statuses.append(status)
    assert statuses == [200, 429, 429]


# ---------------------------------------------------------------------- lookup budget

async def test_lookups_over_the_budget_are_refused_and_under_it_unchanged(
        kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"address_lookup_limit": 10,
                                           "lookup.budget.account": 30,
                                           "lookup.budget.ip": 45}})
    await kith.bind("bound@example.com", "@bound:hs.test")
    alice = await kith.register("alice")
    asked = ["bound@example.com email"] + [f"nobody{n}@example.com email" for n in range(9)]
    for _ in range(3):
        assert await kith.lookup(alice, "none", asked) == {
            "bound@example.com email": "@bound:hs.test"}
    pepper = kith.server.services.lookup.pepper
    status, body = await post(kith, f"{V2}/lookup", {
        "algorithm": "none", "pepper": pepper, "addresses": asked[:1]}, alice)
    assert_limited(status, body)
    assert 1_000 <= body["retry_after_ms"] <= 2_000  # 30 a minute: one per 2 s
    # Another account from the same address: its own budget, within the address's.
    bob = await kith.register("bob")
    assert await kith.lookup(bob, "none", asked[:10]) == {
        "bound@example.com email": "@bound:hs.test"}
    status, body = await post(kith, f"{V2}/lookup", {
        "algorithm": "none", "pepper": pepper, "addresses": asked}, bob)
    assert_limited(status, body)  # the address spent 40 of 45
    # v1 lookups count against the address's budget too.
    status, body = await post(kith, f"{V1}/bulk_lookup", {
        "threepids": [["email", "bound@example.com"]] * 10})
    assert_limited(status, body)
    async with kith.http.get(f"{kith.base}{V1}/lookup", params={
            "medium": "email", "address": "bound@example.com"}) as resp:
        assert resp.status == 200  # one address: still within it


# ------------------------------------------------------------------------- purging

async def test_expired_invites_and_their_keys_are_purged(kith_factory: KithFactory,
                                                         smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp), "general": {"invite.lifetime": 1}})
    token = await kith.register("alice")
    status, body = await call(kith, token, "POST", "/store-invite", invite_body())
    assert status == 200, body
    ephemeral = body["public_keys"][1]["public_key"]
    assert await ephemeral_valid(kith, ephemeral)
    invites = kith.server.services.invites
    assert await invites.purge_expired() == 0  # not a second old yet
    await wait_for("the invite to expire", invites.purge_expired)  # the token and key
    assert await rows(kith, invite_tokens) == 0
    assert not await ephemeral_valid(kith, ephemeral)


async def test_empty_rate_limit_buckets_are_purged(kith_factory: KithFactory,
                                                   smtp: SmtpSink) -> None:
    kith = await kith_factory({**mail(smtp, **{"email.ratelimit_sender.rate_hz": 5,
                                               "email.ratelimit_recipient.rate_hz": 5}),
                               "general": {"client_ip.ratelimit.rate_hz": 5}})
    token = await kith.register("alice")
    assert (await request_email(kith, token))[0] == 200
    # registering (per address), then the mail: sender, recipient, client address
    assert await rows(kith, rate_limits) == 4
    limits = kith.server.services.limits

    async def all_purged() -> bool:
        await limits.purge()
        return await rows(kith, rate_limits) == 0

    await wait_for("the buckets to drain and go", all_purged)  # 0.2 s each
