"""EmailSender against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import email
import email.policy
import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from kith.delivery.email import (
    EmailSender,
    EmailSendError,
    EmailTemplates,
    InvalidEmailAddress,
    smtp_address,
    validation_link,
)
from kith.delivery.templates import PACKAGED_TEMPLATES, Templates
from tests.conftest import free_port

from .conftest import SmtpFactory, TestPki, email_config

TO = "alice@example.org"
TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def parse(raw: bytes | str) -> EmailMessage:
    data = raw.encode() if isinstance(raw, str) else raw
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def verification_mail(port: int, brand: str | None = None) -> str:
    config = email_config(port)
    templates = EmailTemplates(Templates(str(PACKAGED_TEMPLATES), "matrix-org"), config)
    link = validation_link("https://id.kith.test", token=TOKEN, client_secret="cs", sid=7)
    return await templates.verification(TO, token=TOKEN, link=link, ipaddress="192.0.2.7",
                                        brand=brand)


async def test_verification_mail_arrives_as_rendered(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server()
    rendered = await verification_mail(inbox.port)
    await EmailSender(email_config(inbox.port)).send(TO, rendered)

    [received] = inbox.messages
    assert received.mail_from == "noreply@kith.test"
    assert received.rcpt_tos == [TO]
    assert received.helo == "kith.test"
    message, template = parse(received.content), parse(rendered)
    # exactly the template's headers: kith adds none of its own
    assert message.items() == template.items()
    assert [name for name, _ in message.items()] == [
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    assert message["To"] == TO
    assert message["From"] == "Kith Test <noreply@kith.test>"
    assert re.fullmatch(r"<\d{13}[A-Za-z]{16}@kith\.test>", message["Message-ID"])
    assert message.get_content_type() == "multipart/alternative"
    assert len(message.get_boundary() or "") == 32

    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    plain = text.get_content()
    codes = [line for line in plain.splitlines() if re.fullmatch(r"[A-Za-z0-9]{32}", line)]
    assert codes == [TOKEN]
    assert "192.0.2.7" in plain
    expected_link = ("https://id.kith.test/_matrix/identity/api/v1/validate/email/submitToken"
                     f"?token={TOKEN}&client_secret=cs&sid=7")
    assert expected_link in plain
    assert expected_link.replace("&", "&amp;") in html.get_content()


async def test_vector_im_brand() -> None:
    rendered = await verification_mail(free_port(), brand="vector-im")
    assert "Element" in parse(rendered)["Subject"]
    rendered = await verification_mail(free_port(), brand="../etc")
    assert "Matrix" in parse(rendered)["Subject"]


async def test_starttls_verified_with_the_test_ca(smtp_server: SmtpFactory, pki: TestPki) -> None:
    inbox = smtp_server(tls_context=pki.server_context(), require_starttls=True)
    sender = EmailSender(email_config(inbox.port, tls_mode="STARTTLS"), tls_cafile=str(pki.ca_file))
    await sender.send(TO, await verification_mail(inbox.port))
    assert len(inbox.messages) == 1


async def test_starttls_with_a_wrong_ca_fails(smtp_server: SmtpFactory, pki: TestPki) -> None:
    inbox = smtp_server(tls_context=pki.server_context(), require_starttls=True)
    sender = EmailSender(email_config(inbox.port, tls_mode="STARTTLS"),
                         tls_cafile=str(pki.other_ca_file))
    with pytest.raises(EmailSendError, match="CERTIFICATE_VERIFY_FAILED"):
        await sender.send(TO, await verification_mail(inbox.port))
    assert inbox.messages == []


async def test_starttls_checks_the_hostname(smtp_server: SmtpFactory, pki: TestPki) -> None:
    context = pki.server_context(pki.localhost_only_cert, pki.localhost_only_key)
    inbox = smtp_server(tls_context=context, require_starttls=True)
    sender = EmailSender(email_config(inbox.port, tls_mode="STARTTLS"), tls_cafile=str(pki.ca_file))
    with pytest.raises(EmailSendError, match="CERTIFICATE_VERIFY_FAILED"):
        await sender.send(TO, await verification_mail(inbox.port))
    assert inbox.messages == []


async def test_unreadable_ca_file_is_a_send_error(tmp_path: Path) -> None:
    sender = EmailSender(email_config(free_port(), tls_mode="STARTTLS"),
                         tls_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(EmailSendError, match="CA file"):
        await sender.send(TO, "Subject: x\n\nbody\n")


async def test_starttls_not_offered_fails(smtp_server: SmtpFactory, pki: TestPki) -> None:
    inbox = smtp_server()
    sender = EmailSender(email_config(inbox.port, tls_mode="STARTTLS"), tls_cafile=str(pki.ca_file))
    with pytest.raises(EmailSendError, match="STARTTLS"):
        await sender.send(TO, await verification_mail(inbox.port))
    assert inbox.messages == []


async def test_plaintext_mode_does_not_upgrade(smtp_server: SmtpFactory, pki: TestPki) -> None:
    # The server offers STARTTLS with a certificate kith cannot verify: mode 0 ignores it.
    inbox = smtp_server(tls_context=pki.server_context())
    await EmailSender(email_config(inbox.port)).send(TO, await verification_mail(inbox.port))
    assert len(inbox.messages) == 1


@pytest.mark.parametrize("mode", ["SSL", "TLS"])
async def test_implicit_tls(smtp_server: SmtpFactory, pki: TestPki, mode: str) -> None:
    inbox = smtp_server(implicit_tls=pki.server_context())
    sender = EmailSender(email_config(inbox.port, tls_mode=mode), tls_cafile=str(pki.ca_file))
    await sender.send(TO, await verification_mail(inbox.port))
    assert len(inbox.messages) == 1

    wrong = EmailSender(email_config(inbox.port, tls_mode=mode), tls_cafile=str(pki.other_ca_file))
    with pytest.raises(EmailSendError):
        await wrong.send(TO, await verification_mail(inbox.port))
    assert len(inbox.messages) == 1


async def test_login_over_starttls(smtp_server: SmtpFactory, pki: TestPki) -> None:
    inbox = smtp_server(tls_context=pki.server_context(), require_starttls=True,
                        auth_required=True)
    config = email_config(inbox.port, tls_mode="STARTTLS", smtp_username="kith",
                          smtp_password="hunter2")
    await EmailSender(config, tls_cafile=str(pki.ca_file)).send(
        TO, await verification_mail(inbox.port))
    assert inbox.logins == [("kith", "hunter2")]
    assert len(inbox.messages) == 1


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_wrong_password_fails_without_showing_it(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server(auth_required=True, auth_require_tls=False)
    config = email_config(inbox.port, smtp_username="kith", smtp_password="wrong-s3cret")
    with pytest.raises(EmailSendError) as raised:
        await EmailSender(config).send(TO, await verification_mail(inbox.port))
    assert "wrong-s3cret" not in str(raised.value)
    assert inbox.logins and set(inbox.logins) == {("kith", "wrong-s3cret")}
    assert inbox.messages == []


async def test_no_login_without_a_username(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server(auth_require_tls=False)
    config = email_config(inbox.port, smtp_password="unused")
    await EmailSender(config).send(TO, await verification_mail(inbox.port))
    assert inbox.logins == []
    assert len(inbox.messages) == 1


async def test_smtp_down_fails_fast() -> None:
    sender = EmailSender(email_config(free_port()), timeout_s=2)
    started = time.monotonic()
    with pytest.raises(EmailSendError, match="failed"):
        await sender.send(TO, "Subject: x\n\nbody\n")
    assert time.monotonic() - started < 2


async def test_silent_smtp_server_fails_within_the_timeout(silent_server: int) -> None:
    sender = EmailSender(email_config(silent_server), timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(EmailSendError, match="within 0.5 s"):
        await sender.send(TO, "Subject: x\n\nbody\n")
    assert 0.4 < time.monotonic() - started < 1.5


async def test_silent_implicit_tls_server_fails_within_the_timeout(
        silent_server: int, pki: TestPki) -> None:
    sender = EmailSender(email_config(silent_server, tls_mode="SSL"), timeout_s=0.5,
                         tls_cafile=str(pki.ca_file))
    started = time.monotonic()
    with pytest.raises(EmailSendError):
        await sender.send(TO, "Subject: x\n\nbody\n")
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("address", [
    "alice@example.org\r\nBcc: eve@example.org", "Alice <alice@example.org>",
    "not-an-address", "a@b.org, c@d.org", "",
])
async def test_invalid_recipients_are_refused(address: str, smtp_server: SmtpFactory) -> None:
    inbox = smtp_server()
    with pytest.raises(InvalidEmailAddress):
        await EmailSender(email_config(inbox.port)).send(address, "Subject: x\n\nbody\n")
    with pytest.raises(InvalidEmailAddress):
        await verification_mail_to(address)
    assert inbox.messages == []


async def verification_mail_to(address: str) -> str:
    config = email_config(25)
    templates = EmailTemplates(Templates(str(PACKAGED_TEMPLATES), "matrix-org"), config)
    return await templates.verification(address, token=TOKEN, link="https://x")


async def test_hostname_placeholder_in_from_is_filled(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server()
    config = email_config(inbox.port, sender="Sydent Validation <noreply@{hostname}>")
    templates = EmailTemplates(Templates(str(PACKAGED_TEMPLATES), "matrix-org"), config)
    rendered = await templates.verification(TO, token=TOKEN, link="https://x")
    await EmailSender(config).send(TO, rendered)
    [received] = inbox.messages
    assert received.mail_from == "noreply@kith.test"
    assert parse(received.content)["From"] == "Sydent Validation <noreply@kith.test>"


async def test_non_ascii_mail_is_sent_as_utf8(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server()
    message = "Subject: café\nContent-Type: text/plain; charset=UTF-8\n\nhéllo ☃\n"
    await EmailSender(email_config(inbox.port)).send(TO, message)
    [received] = inbox.messages
    assert "héllo ☃".encode() in received.content


def test_validation_link() -> None:
    link = validation_link("https://id.test", token="t", client_secret="c s", sid=12)
    assert link == ("https://id.test/_matrix/identity/api/v1/validate/email/submitToken"
                    "?token=t&client_secret=c%20s&sid=12")


# ------------------------------------------------------------- addresses beyond ASCII

UTF8_LOCAL = "jöran@example.org"


def plain_mail(to: str) -> str:
    return f"From: noreply@kith.test\nTo: {to}\nSubject: hej\n\nHej {to}\n"


async def test_a_non_ascii_local_part_is_sent_with_smtputf8(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server()  # aiosmtpd's Controller offers SMTPUTF8 unless told not to
    sender = EmailSender(email_config(inbox.port))
    assert await sender.undeliverable(UTF8_LOCAL) is None
    await sender.send(UTF8_LOCAL, plain_mail(UTF8_LOCAL))
    [received] = inbox.messages
    assert received.rcpt_tos == [UTF8_LOCAL]
    assert "SMTPUTF8" in received.mail_options
    assert parse(received.content)["To"] == UTF8_LOCAL


async def test_a_non_ascii_local_part_is_refused_without_smtputf8(
        smtp_server: SmtpFactory) -> None:
    inbox = smtp_server(enable_SMTPUTF8=False)
    sender = EmailSender(email_config(inbox.port))
    refused = await sender.undeliverable(UTF8_LOCAL)
    assert refused is not None and "non-ASCII" in refused
    with pytest.raises(EmailSendError, match="SMTPUTF8"):
        await sender.send(UTF8_LOCAL, plain_mail(UTF8_LOCAL))
    assert inbox.messages == []
    # plain addresses go as before
    assert await sender.undeliverable(TO) is None


async def test_what_the_server_offers_is_remembered(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server(enable_SMTPUTF8=False)
    # a login would fail here (no AUTH without TLS): asking for extensions needs none
    sender = EmailSender(email_config(inbox.port, smtp_username="kith",
                                      smtp_password="hunter2"))
    assert await sender.undeliverable(UTF8_LOCAL) is not None
    assert inbox.logins == [] and inbox.messages == []
    # not asked again at once: with the server gone, the answer stands
    sender.port = free_port()
    assert await sender.undeliverable(UTF8_LOCAL) is not None


async def test_an_unreachable_server_does_not_refuse_the_address() -> None:
    sender = EmailSender(email_config(free_port()), timeout_s=2)
    assert await sender.undeliverable(UTF8_LOCAL) is None


async def test_a_non_ascii_domain_goes_as_idna_a_labels(smtp_server: SmtpFactory) -> None:
    inbox = smtp_server(enable_SMTPUTF8=False)  # not needed for a domain
    sender = EmailSender(email_config(inbox.port))
    address = "alice@bücher.example"
    assert await sender.undeliverable(address) is None
    await sender.send(address, await EmailTemplates(
        Templates(str(PACKAGED_TEMPLATES), "matrix-org"), email_config(inbox.port),
    ).verification(address, token=TOKEN, link="https://id.kith.test/v"))
    [received] = inbox.messages
    assert received.rcpt_tos == ["alice@xn--bcher-kva.example"]
    assert "SMTPUTF8" not in received.mail_options
    assert parse(received.content)["To"] == "alice@xn--bcher-kva.example"
    # IDNA 2008: ß is its own letter, not "ss"
    assert smtp_address("straße@straße.de") == "straße@xn--strae-oqa.de"


@pytest.mark.parametrize("address", ["alice@☃.example", "alice@bücher..example",
                                     "alice@-bücher.example"])
async def test_a_domain_that_is_no_idna_name_is_refused(address: str) -> None:
    sender = EmailSender(email_config(free_port()))  # never contacted
    refused = await sender.undeliverable(address)
    assert refused is not None and "not valid" in refused
    with pytest.raises(InvalidEmailAddress):
        await sender.send(address, plain_mail("x@example.org"))
