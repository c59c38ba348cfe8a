"""Template lookup per brand and rendering, Sydent-compatible."""

from __future__ import annotations

import email
import email.policy
import logging
import re
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path

import pytest

from kith.config import EmailConfig
from kith.delivery.email import EmailTemplates, invite_variables
from kith.delivery.templates import (
    INVITE_TEMPLATE,
    PACKAGED_TEMPLATES,
    VERIFICATION_TEMPLATE,
    VERIFY_RESPONSE_TEMPLATE,
    TemplateError,
    Templates,
)

NAME = VERIFICATION_TEMPLATE


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def res(tmp_path: Path) -> Path:
    """An operator's Sydent-style templates folder with two brands."""
    root = tmp_path / "res"
    write(root / "acme" / NAME, "acme percent %(token)s\n")
    write(root / "globex" / NAME, "globex percent %(token)s\n")
    write(root / "globex" / f"{NAME}.j2", "globex jinja {{ token }}\n")
    return root


def test_percent_template(res: Path) -> None:
    assert Templates(str(res), "acme").render(NAME, {"token": "t1"}) == "acme percent t1\n"


def test_j2_wins_over_the_plain_file(res: Path) -> None:
    assert Templates(str(res), "acme").render(NAME, {"token": "t1"}, "globex") == \
        "globex jinja t1"


@pytest.mark.parametrize("hint", [None, "", "nope", "../res/globex", "globex/..", ".."])
def test_unknown_brand_falls_back_to_the_default(res: Path, hint: str | None) -> None:
    templates = Templates(str(res), "acme")
    assert templates.brand(hint) == "acme"
    assert templates.render(NAME, {"token": "t"}, hint) == "acme percent t\n"


def test_brands_are_the_subfolders(res: Path) -> None:
    (res / "not-a-brand.txt").write_text("x")
    assert Templates(str(res), "acme").brands == frozenset({"acme", "globex"})


def test_percent_variants_forhtml_and_forurl(res: Path) -> None:
    write(res / "acme" / NAME, "%(v)s|%(v_forhtml)s|%(v_forurl)s|%(multipart_boundary)s\n")
    out = Templates(str(res), "acme").render(NAME, {"v": "<a&b c/d>"})
    plain, for_html, for_url, boundary = out.strip().split("|")
    assert plain == "<a&b c/d>"
    assert for_html == "&lt;a&amp;b c/d&gt;"
    assert for_url == "%3Ca%26b%20c/d%3E"
    assert re.fullmatch(r"[A-Za-z0-9]{32}", boundary)


def test_jinja_autoescapes_and_has_a_boundary(res: Path) -> None:
    write(res / "acme" / f"{NAME}.j2", "{{ v }}|{{ v|safe }}|{{ multipart_boundary }}")
    out = Templates(str(res), "acme").render(NAME, {"v": "<b>"})
    escaped, raw, boundary = out.split("|")
    assert (escaped, raw) == ("&lt;b&gt;", "<b>")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", boundary)


def test_jinja_loader_is_rooted_at_templates_path(res: Path) -> None:
    write(res / "shared" / "footer.txt", "footer {{ token }}")
    write(res / "acme" / f"{NAME}.j2", "{% include 'shared/footer.txt' %}")
    assert Templates(str(res), "acme").render(NAME, {"token": "t"}) == "footer t"


def test_boundaries_differ_per_mail(res: Path) -> None:
    write(res / "acme" / NAME, "%(multipart_boundary)s")
    templates = Templates(str(res), "acme")
    assert templates.render(NAME, {}) != templates.render(NAME, {})


def test_deprecated_paths_override_the_brand_lookup(res: Path, tmp_path: Path) -> None:
    old = write(tmp_path / "old" / "verification.eml", "old %(token)s\n")
    old_j2 = write(tmp_path / "old" / "invite.eml.j2", "old jinja {{ token }}")
    old_page = write(tmp_path / "old" / "page.html", "page %(message)s")
    templates = Templates(str(res), "acme", email_template=str(old),
                          invite_template=str(old_j2), verify_response_template=str(old_page))
    assert templates.render(NAME, {"token": "t"}, "globex") == "old t\n"
    assert templates.render(INVITE_TEMPLATE, {"token": "t"}) == "old jinja t"
    assert templates.render_verify_response("ok") == "page ok"


def test_verify_response_is_percent_only(res: Path) -> None:
    write(res / "acme" / VERIFY_RESPONSE_TEMPLATE, "<p>%(message)s</p>")
    write(res / "acme" / f"{VERIFY_RESPONSE_TEMPLATE}.j2", "jinja {{ message }}")
    page = Templates(str(res), "acme").render_verify_response("<done> & dusted")
    assert page == "<p>&lt;done&gt; &amp; dusted</p>"


def test_missing_templates_path_uses_the_packaged_templates(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            ) -> None:
    with caplog.at_level(logging.INFO):
        templates = Templates(str(tmp_path / "missing-res"), "matrix-org")
    assert templates.root == PACKAGED_TEMPLATES
    assert {"matrix-org", "vector-im"} <= templates.brands
    assert "packaged templates" in caplog.text
    out = templates.render(NAME, {"token": "T0K3N", "link": "https://l", "to": "a@b.c",
                                  "from": "x <x@y.z>", "ipaddress": "198.51.100.1"})
    assert "T0K3N" in out
    assert "<p>done</p>" in templates.render_verify_response("done")


def test_a_template_missing_from_the_operators_tree_comes_from_the_package(res: Path) -> None:
    out = Templates(str(res), "acme").render_verify_response("fine")
    assert "fine" in out and "<html" in out


def test_unknown_percent_variable_renders_empty(res: Path) -> None:
    write(res / "acme" / NAME, "[%(nope)s][%(nope_forhtml)s]")
    assert Templates(str(res), "acme").render(NAME, {}) == "[][]"


def test_broken_templates_raise_template_error(res: Path) -> None:
    write(res / "acme" / NAME, "50%, then %(token)s")
    with pytest.raises(TemplateError, match="%%"):
        Templates(str(res), "acme").render(NAME, {"token": "t"})
    write(res / "acme" / f"{NAME}.j2", "{% if %}")
    with pytest.raises(TemplateError, match=NAME):
        Templates(str(res), "acme").render(NAME, {})


@pytest.mark.parametrize("brand", ["matrix-org", "vector-im"])
def test_packaged_templates_render_to_valid_messages(brand: str) -> None:
    templates = Templates(str(PACKAGED_TEMPLATES), brand)
    for name in (VERIFICATION_TEMPLATE, INVITE_TEMPLATE):
        source = (PACKAGED_TEMPLATES / brand / f"{name}.j2").read_text()
        assert "Content-Type: multipart/alternative" in source
        out = templates.render(name, {"to": "a@b.c", "from": "F <f@g.h>", "token": "tok",
                                      "link": "https://l", "date": "d", "messageid": "<m@h>"})
        message = email.message_from_bytes(out.encode(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        assert [k for k, _ in message.items()] == ["From", "To", "Subject", "Date",
                                                    "Message-ID", "MIME-Version",
                                                    "Content-Type"]
        assert message.get_body(("plain",)) is not None
        assert message.get_body(("html",)) is not None
        assert not message.defects


async def test_invite_mail() -> None:
    config = EmailConfig(sender="Kith <noreply@kith.test>", hostname="kith.test")
    templates = EmailTemplates(Templates(str(PACKAGED_TEMPLATES), "matrix-org"), config)
    out = await templates.invite("bob@example.org", {
        "room_id": "!room:hs.test", "sender": "@alice:hs.test",
        "sender_display_name": "Alice <script> with a very long name",
        "room_name": "Café & Co", "guest_access_token": "gat", "unrelated": 3,
        "to": "eve@evil.test", "org.matrix.web_client_location": "javascript:alert(1)",
    }, token="invitetoken", ephemeral_private_key="epk", verified_sender="@alice:hs.test",
        sign_url="https://id.kith.test/_matrix/identity/api/v1/sign-ed25519?token=x")
    message = email.message_from_bytes(out.encode(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message["To"] == "bob@example.org"
    assert message["Subject"] == "Alice <script> with… has invited you to chat"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    text, page = plain.get_content(), html.get_content()
    assert "(@alice:hs.test) invited you" in text
    assert "(Café & Co) on Matrix" in text
    assert "https://app.element.io/#/room/%21room%3Ahs.test?email=bob%40example.org" \
        "&signurl=https%3A//id.kith.test" in text
    assert "&guest_access_token=gat&" in text
    assert "javascript" not in text + page
    assert "<script>" not in page and "Alice &lt;script&gt;" in page
    assert "Café &amp; Co" in page


def test_invite_variables_space_subject_and_defaults() -> None:
    config = EmailConfig(hostname="kith.test")
    values = invite_variables(config, "bob@example.org",
                              {"room_type": "m.space", "sender_display_name": "Al",
                               "room_name": "x" * 40,
                               "org.matrix.web_client_location": "https://my.web/"},
                              token="t", ephemeral_private_key="k")
    assert values["room_name"] == "x" * 25 + "…"
    assert values["bracketed_room_name"] == f"({'x' * 25}…) "
    assert values["bracketed_verified_sender"] == ""
    assert values["web_client_location"] == "https://my.web"
    assert values["guest_user_id"] == ""
    assert values["from"] == "Sydent Validation <noreply@kith.test>"
    subject = email.message_from_string(f"Subject: {values['subject_header_value']}\n\n",
                                        policy=email.policy.default)["Subject"]
    assert subject == "Al has invited you to a space"
    values = invite_variables(config, "bob@example.org", {"sender": "@al:hs.test"},
                              token="t", ephemeral_private_key="k")
    assert values["sender_display_name"] == ""
    subject = str(make_header(decode_header(values["subject_header_value"])))
    assert subject == "@al:hs.test has invited you to chat"


def test_invite_variables_shorten_every_chosen_name() -> None:
    values = invite_variables(EmailConfig(hostname="kith.test"), "bob@example.org", {
        "sender_display_name": "d" * 21, "room_name": "n" * 31,
        "room_alias": "#" + "a" * 40 + ":hs.test", "room_id": "!" + "r" * 40 + ":hs.test"},
        token="t", ephemeral_private_key="k")
    assert values["sender_display_name"] == "d" * 19 + "…"
    assert values["room_name"] == "n" * 25 + "…"
    assert values["room_alias"] == "#" + "a" * 24 + "…"
    assert values["room_id"] == "!" + "r" * 40 + ":hs.test"  # identifiers stay whole
    values = invite_variables(EmailConfig(hostname="kith.test"), "bob@example.org", {
        "sender_display_name": "d" * 20, "room_name": "n" * 30},
        token="t", ephemeral_private_key="k")
    assert (values["sender_display_name"], values["room_name"]) == ("d" * 20, "n" * 30)
