"""Email addresses beyond ASCII, through kith's API to a real SMTP server (aiosmtpd)
that offers SMTPUTF8, and one that does not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.test_invites import invite_body, mail_config, mailed_invite
from tests.api.test_validation import SECRET, call, mailed_token, request_email, submit
from tests.conftest import KithFactory, RunningKith, SmtpSink

JORAN = "jöran@example.org"


@pytest.fixture
def ascii_smtp() -> Iterator[SmtpSink]:
    """An SMTP server that does not offer SMTPUTF8."""
    sink = SmtpSink(smtputf8=False)
    sink.start()
    yield sink
    sink.stop()


async def test_a_non_ascii_local_part_validates_over_smtputf8(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith: RunningKith = await kith_factory(mail_config(smtp))
    token = await kith.register("joran")
    status, body = await request_email(kith, token, "Jöran@Example.org")
    assert status == 200, body
    [(recipients, _)] = smtp.messages
    assert recipients == [JORAN]
    assert await submit(kith, token, body["sid"], mailed_token(smtp)) == (
        200, {"success": True})
    status, answer = await call(kith, token, "GET", "/3pid/getValidated3pid",
                                params={"sid": body["sid"], "client_secret": SECRET})
    assert (status, answer["address"]) == (200, JORAN)


async def test_a_non_ascii_local_part_is_refused_before_anything_is_stored(
        kith_factory: KithFactory, ascii_smtp: SmtpSink) -> None:
    kith: RunningKith = await kith_factory(mail_config(ascii_smtp))
    token = await kith.register("joran")
    status, body = await request_email(kith, token, JORAN)
    assert (status, body["errcode"]) == (400, "M_INVALID_EMAIL"), body
    assert "non-ASCII" in body["error"]
    store = kith.server.store
    assert store is not None
    assert await store.sessions.find("email", JORAN, SECRET) is None
    status, body = await call(kith, token, "POST", "/store-invite",
                              invite_body(JORAN, sender="@joran:hs.test"))
    assert (status, body["errcode"]) == (400, "M_INVALID_EMAIL"), body
    assert not await store.invites.has_pending("email", JORAN)
    assert ascii_smtp.messages == []
    # an ASCII address and an internationalised domain still go through this server
    assert (await request_email(kith, token, "joran@example.org"))[0] == 200
    assert (await request_email(kith, token, "joran@bücher.example"))[0] == 200
    assert [recipients for recipients, _ in ascii_smtp.messages] == [
        ["joran@example.org"], ["joran@xn--bcher-kva.example"]]


async def test_an_invite_to_a_non_ascii_local_part_is_mailed_over_smtputf8(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith: RunningKith = await kith_factory(mail_config(smtp))
    token = await kith.register("alice")
    status, body = await call(kith, token, "POST", "/store-invite", invite_body(JORAN))
    assert status == 200, body
    [(recipients, _)] = smtp.messages
    assert recipients == [JORAN]
    invite_token, _ = mailed_invite(smtp)
    assert invite_token == body["token"]


async def test_a_domain_that_is_no_idna_name_is_refused(
        kith_factory: KithFactory, smtp: SmtpSink) -> None:
    kith: RunningKith = await kith_factory(mail_config(smtp))
    token = await kith.register("alice")
    status, body = await request_email(kith, token, "alice@☃.example")
    assert (status, body["errcode"]) == (400, "M_INVALID_EMAIL"), body
    assert smtp.messages == []
