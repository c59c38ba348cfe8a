"""kith driven through a real Synapse: every request Synapse makes to an identity server.

One story, in order: alice registers with kith through Synapse's OpenID tokens, invites
bob by email, bob binds the address through Synapse and the invite appears in the room;
then the same for carol while Synapse is down at the moment she binds.  Then dave binds
through Synapse and removes the binding in each way Synapse offers: `/account/3pid/unbind`,
`/account/3pid/delete` with `id_server`, and deactivating his account (Synapse signs each
unbind with X-Matrix).  The steps share state through `Story`, so each one can fail (or be
marked) on its own.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kith.threepid import lookup_hash
from tests.conftest import SmtpSink
from tests.e2e.conftest import TlsKith, kith_log, poll
from tests.e2e.synapse import MatrixUser, Synapse, call

pytestmark = pytest.mark.e2e



@dataclass
class Story:
    synapse: Synapse
    kith: TlsKith
    smtp: SmtpSink
    users: dict[str, MatrixUser] = field(default_factory=dict)
    kith_tokens: dict[str, str] = field(default_factory=dict)
    rooms: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def story(synapse: Synapse, tls_kith: TlsKith, e2e_smtp: SmtpSink) -> Story:
    return Story(synapse, tls_kith, e2e_smtp)


def kith_account(story: Story, localpart: str) -> str:
    """A Synapse user and their kith token, obtained with a real OpenID token."""
    user = story.synapse.register(localpart)
    story.users[localpart] = user
    openid = user.openid_token()
    status, body = story.kith.call("POST", "/account/register", openid)
    assert status == 200, (body, kith_log(story.kith)[-2000:])
    story.kith_tokens[localpart] = body["token"]
    return str(body["token"])


def require_step(story: Story, room: str) -> str:
    """The room an earlier step made; if that step failed, it has said why already."""
    if room not in story.rooms:
        pytest.skip(f"the earlier step that makes room {room!r} failed")
    return story.rooms[room]


def invite_by_email(story: Story, room_id: str, address: str) -> None:
    alice = story.users["alice"]
    sent = len(story.smtp.messages)
    status, body = alice.call("POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", {
        "id_server": story.kith.server_name, "id_access_token": story.kith_tokens["alice"],
        "medium": "email", "address": address})
    assert status == 200, (body, kith_log(story.kith)[-3000:])
    poll(f"the invite mail to {address}", lambda: mails_to(story, address, since=sent))

    def invite_events() -> list[dict[str, Any]]:
        status, state = alice.call("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state")
        assert status == 200, state
        return [event for event in state if event["type"] == "m.room.third_party_invite"
                and event["content"].get("display_name")
                and event["sender"] == alice.user_id]

    events = poll("the m.room.third_party_invite event", invite_events)
    # The keys Synapse will check the signed invite against, and where it checks them:
    # kith's own key among them, with absolute URLs under kith's public name.
    status, server_key = story.kith.call("GET", "/pubkey/ed25519:0")
    assert status == 200, server_key
    public_keys = events[-1]["content"]["public_keys"]
    assert server_key["public_key"] in [key["public_key"] for key in public_keys]
    for key in public_keys:
        assert key["key_validity_url"].startswith(f"https://{story.kith.server_name}/"), key


def mails_to(story: Story, address: str, since: int = 0) -> list[str]:
    return [text for recipients, text in story.smtp.messages[since:] if address in recipients]


def validate_email(story: Story, localpart: str, address: str) -> tuple[str, str]:
    """(sid, client_secret) of a session proved by following the link in the mail, as the
    user would; the session is then ready to be bound."""
    token = story.kith_tokens[localpart]
    secret = f"secret-{localpart}-{len(story.smtp.messages)}"
    sent = len(story.smtp.messages)
    status, body = story.kith.call("POST", "/validate/email/requestToken", {
        "client_secret": secret, "email": address, "send_attempt": 1}, token=token)
    assert status == 200, body
    sid = body["sid"]
    mail = poll(f"the validation mail to {address}",
                lambda: mails_to(story, address, since=sent))[-1]
    match = re.search(r"(https://\S+/validate/email/submitToken\?\S+)", mail)
    assert match, mail
    link = match.group(1).replace("&amp;", "&")
    status, page = call("GET", link, context=story.kith.context)
    assert status == 200 and "Verification successful" in page, (link, page)
    return sid, secret


def bind_through_synapse(story: Story, localpart: str, sid: str, secret: str) -> None:
    """`/account/3pid/bind`: Synapse binds on kith with the user's kith token, and remembers
    where it bound (what its unbind and deactivation use later)."""
    status, body = story.users[localpart].call("POST", "/_matrix/client/v3/account/3pid/bind", {
        "id_server": story.kith.server_name, "id_access_token": story.kith_tokens[localpart],
        "sid": sid, "client_secret": secret})
    assert (status, body) == (200, {}), (body, kith_log(story.kith)[-3000:])


def validate_and_bind(story: Story, localpart: str, address: str,
                      before_bind: Callable[[], None] | None = None) -> None:
    """Prove `address` and bind it to the user's MXID through Synapse; or, with
    `before_bind` (which may stop Synapse), directly on kith as the user's client would."""
    sid, secret = validate_email(story, localpart, address)
    if before_bind is None:
        bind_through_synapse(story, localpart, sid, secret)
    else:
        before_bind()
        status, body = story.kith.call("POST", "/3pid/bind", {
            "sid": sid, "client_secret": secret, "mxid": story.users[localpart].user_id},
            token=story.kith_tokens[localpart])
        assert status == 200, body
        assert body["address"] == address
    assert lookup(story, address) == story.users[localpart].user_id


def lookup(story: Story, address: str, medium: str = "email") -> str | None:
    """The MXID kith answers for `address`, by a sha256 lookup as Element makes it."""
    token = story.kith_tokens["alice"]
    status, details = story.kith.call("GET", "/hash_details", token=token)
    assert status == 200, details
    hashed = lookup_hash(medium, address, details["lookup_pepper"])
    status, body = story.kith.call("POST", "/lookup", {
        "algorithm": "sha256", "pepper": details["lookup_pepper"], "addresses": [hashed]},
        token=token)
    assert status == 200, body
    mxid = body["mappings"].get(hashed)
    return None if mxid is None else str(mxid)


def membership(story: Story, room_id: str, user_id: str) -> str | None:
    status, body = story.users["alice"].call(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.member/{quote(user_id)}")
    return body.get("membership") if status == 200 else None


def wait_for_invite(story: Story, room_id: str, localpart: str) -> None:
    user_id = story.users[localpart].user_id
    poll(f"{user_id}'s invite to {room_id}",
         lambda: membership(story, room_id, user_id) == "invite")
    # And the invitee sees it too, as a client would.
    status, body = story.users[localpart].call("GET", "/_matrix/client/v3/sync?timeout=0")
    assert status == 200, body
    assert room_id in body["rooms"]["invite"]


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def test_openid_registration_is_verified_against_synapse(story: Story) -> None:
    token = kith_account(story, "alice")
    status, body = story.kith.call("GET", "/account", token=token)
    assert status == 200, body
    assert body == {"user_id": f"@alice:{story.synapse.server_name}"}

    # A token Synapse never issued is refused after asking Synapse, not accepted blindly.
    status, body = story.kith.call("POST", "/account/register", {
        "access_token": "not-a-token", "token_type": "Bearer",
        "matrix_server_name": story.synapse.server_name, "expires_in": 3600})
    assert status == 401, body


def test_email_invite_is_stored_by_kith_and_mailed(story: Story) -> None:
    alice = story.users.get("alice")
    if alice is None:
        pytest.skip("the first step, which registers alice, failed")
    status, body = alice.call("POST", "/_matrix/client/v3/createRoom", {"name": "Plans"})
    assert status == 200, body
    room_id = body["room_id"]
    invite_by_email(story, room_id, "bob@example.com")
    mail = mails_to(story, "bob@example.com")[-1]
    assert "Plans" in mail
    story.rooms["plans"] = room_id


def test_binding_the_address_delivers_the_invite(story: Story) -> None:
    room_id = require_step(story, "plans")
    kith_account(story, "bob")
    validate_and_bind(story, "bob", "bob@example.com")
    wait_for_invite(story, room_id, "bob")


def test_invite_arrives_when_synapse_comes_back(story: Story) -> None:
    room_id = require_step(story, "plans")
    kith_account(story, "carol")
    invite_by_email(story, room_id, "carol@example.com")
    carol = story.users["carol"].user_id
    validate_and_bind(story, "carol", "carol@example.com", before_bind=story.synapse.stop)
    try:
        # kith's first delivery attempt meets a closed port; it must keep the invite.
        poll("a failed onbind attempt for carol", lambda: re.search(
            rf"pending to \S+ for {re.escape(carol)}: [1-9]", story.kith.onbind_queue()))
    finally:
        story.synapse.start()
    wait_for_invite(story, room_id, "carol")


def test_unbind_through_synapse(story: Story) -> None:
    """`/account/3pid/unbind`: Synapse signs the unbind (X-Matrix, destination_is)."""
    kith_account(story, "dave")
    validate_and_bind(story, "dave", "dave@example.com")
    status, body = story.users["dave"].call("POST", "/_matrix/client/v3/account/3pid/unbind", {
        "id_server": story.kith.server_name, "medium": "email",
        "address": "dave@example.com"})
    assert (status, body) == (200, {"id_server_unbind_result": "success"}), (
        body, kith_log(story.kith)[-3000:])
    assert lookup(story, "dave@example.com") is None


def test_3pid_delete_with_id_server_unbinds(story: Story) -> None:
    if "dave" not in story.users:
        pytest.skip("the step that registers dave failed")
    validate_and_bind(story, "dave", "dave@example.com")
    status, body = story.users["dave"].call("POST", "/_matrix/client/v3/account/3pid/delete", {
        "id_server": story.kith.server_name, "medium": "email",
        "address": "dave@example.com"})
    assert (status, body) == (200, {"id_server_unbind_result": "success"}), body
    assert lookup(story, "dave@example.com") is None


def test_deactivation_unbinds_every_address(story: Story) -> None:
    """Deactivating an account makes Synapse unbind every 3PID it bound for the user."""
    kith_account(story, "erin")
    for address in ("erin@example.com", "erin.work@example.org"):
        validate_and_bind(story, "erin", address)
    erin = story.users["erin"]
    status, body = erin.call("POST", "/_matrix/client/v3/account/deactivate", {
        "auth": {"type": "m.login.password", "password": "correct horse",
                 "identifier": {"type": "m.id.user", "user": erin.user_id}}})
    assert (status, body) == (200, {"id_server_unbind_result": "success"}), (
        body, kith_log(story.kith)[-3000:])
    assert lookup(story, "erin@example.com") is None
    assert lookup(story, "erin.work@example.org") is None
