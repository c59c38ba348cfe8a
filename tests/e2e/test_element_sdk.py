"""What Element does with an identity server, done by matrix-js-sdk against kith and a
real Synapse.

matrix-js-sdk (the SDK behind Element Web, run by node from tests/e2e/js) makes every
request of these flows, to kith directly or through Synapse, as Element's code calls it:
registering with kith through an OpenID token, noticing unsigned terms and agreeing to
them, proving an email address (link in the mail) and a phone number (code in the SMS)
and binding them through Synapse, looking them up, inviting by email, and unbinding.
The test reads mails and SMS between the SDK's calls and checks each effect on kith's
side and on Synapse's, not only what the SDK answered.  The steps run in order and share
state through `Story`; a step whose prerequisite failed is skipped, saying which.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import hashlib
import secrets
import urllib.error
import urllib.parse
import urllib.request
from base64 import urlsafe_b64encode
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import SmtpSink
from tests.e2e.conftest import OpenMarketStandIn, TlsKith, kith_log, poll
from tests.e2e.element_sdk import ElementSdk, SdkError, SentRequest
from tests.e2e.synapse import MatrixUser, Synapse

pytestmark = pytest.mark.e2e

# The identity server service type of the SDK's getTerms / agreeToTerms (SERVICE_TYPES.IS).
IDENTITY_SERVICE = "SERVICE_TYPE_IS"
ALICE_EMAIL = "alice@example.com"
ALICE_PHONE = ("GB", "07911 123456", "447911123456")  # country, as typed, E.164 digits
DAVE_EMAIL = "dave@example.com"


@dataclass
class Story:
    synapse: Synapse
    kith: TlsKith
    smtp: SmtpSink
    sms: OpenMarketStandIn
    sdk: ElementSdk
    users: dict[str, MatrixUser] = field(default_factory=dict)
    kith_tokens: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    room_id: str = ""

    @property
    def identity_server_url(self) -> str:
        return f"https://{self.kith.server_name}"

    def require(self, step: str) -> None:
        if step not in self.done:
            pytest.skip(f"the earlier step {step!r} did not succeed")


@pytest.fixture(scope="module")
def story(element_sdk: ElementSdk, synapse: Synapse, element_kith: TlsKith,
          e2e_smtp: SmtpSink, openmarket: OpenMarketStandIn) -> Story:
    # The SDK first: without `npm ci` the module is skipped before Synapse starts.
    return Story(synapse, element_kith, e2e_smtp, openmarket, element_sdk)


# ------------------------------------------------------------------------ helpers


def sign_in(story: Story, localpart: str) -> MatrixUser:
    """A Synapse user, and an SDK client for them made as Element makes it."""
    user = story.synapse.register(localpart)
    story.users[localpart] = user
    story.sdk.client(localpart, homeserver_url=story.synapse.client_url,
                     identity_server_url=story.identity_server_url,
                     user_id=user.user_id, access_token=user.access_token)
    return user


def register_with_kith(story: Story, localpart: str) -> str:
    """Element's IdentityAuthClient: an OpenID token from Synapse, traded for kith's."""
    sdk = story.sdk
    openid = sdk.call(localpart, "getOpenIdToken")
    assert openid["matrix_server_name"] == story.synapse.server_name, openid
    answer = sdk.call(localpart, "registerWithIdentityServer", openid)
    token = answer["access_token"]  # what Element reads
    assert answer["token"] == token, answer
    story.kith_tokens[localpart] = token
    sdk.set_identity_token(localpart, token)
    return str(token)


def agree_to_terms(story: Story, localpart: str) -> dict[str, Any]:
    """Element's terms dialog, with everything ticked in English; the terms it saw."""
    sdk, url = story.sdk, story.identity_server_url
    terms = sdk.call(localpart, "getTerms", IDENTITY_SERVICE, url)
    urls = [policy["en"]["url"] for policy in terms["policies"].values()]
    assert sdk.call(localpart, "agreeToTerms", IDENTITY_SERVICE, url,
                    story.kith_tokens[localpart], urls) == {}
    return dict(terms)


def kith_lookup(story: Story, localpart: str, *threepids: tuple[str, str]) -> dict[str, str]:
    """kith's sha256 lookup, hashed here by the spec's formula: {address: mxid} found."""
    token = story.kith_tokens[localpart]
    status, details = story.kith.call("GET", "/hash_details", token=token)
    assert status == 200, details
    pepper = details["lookup_pepper"]
    hashes = {urlsafe_b64encode(hashlib.sha256(f"{address} {medium} {pepper}".encode())
                                .digest()).rstrip(b"=").decode(): address
              for medium, address in threepids}
    status, body = story.kith.call("POST", "/lookup", {
        "algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)}, token=token)
    assert status == 200, body
    return {hashes[h]: mxid for h, mxid in body["mappings"].items()}


def sent(story: Story, method: str, path_end: str) -> SentRequest:
    """The last request the SDK sent to a path ending in `path_end`."""
    matching = [r for r in story.sdk.take_requests()
                if r.method == method and r.path.endswith(path_end)]
    assert matching, f"the SDK sent no {method} …{path_end}"
    return matching[-1]


def mails_to(story: Story, address: str, since: int = 0) -> list[email.message.EmailMessage]:
    return [email.message_from_string(text, policy=email.policy.default)
            for recipients, text in story.smtp.messages[since:] if address in recipients]


def plain_text(mail: email.message.EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    assert part is not None, mail
    return str(part.get_content())


def open_link(story: Story, url: str) -> tuple[int, str, str]:
    """GET `url` as a browser: (status, content type, body)."""
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=story.kith.context) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def prove_email(story: Story, localpart: str, address: str) -> tuple[str, str]:
    """requestEmailToken with the SDK, then the link in the mail opened in a browser;
    the (sid, client_secret) of the validated session."""
    sdk, token = story.sdk, story.kith_tokens[localpart]
    secret = secrets.token_urlsafe(16)
    before = len(story.smtp.messages)
    answer = sdk.call(localpart, "requestEmailToken", address, secret, 1, None, token)
    sid = answer["sid"]
    request = sent(story, "POST", "/_matrix/identity/v2/validate/email/requestToken")
    # What the SDK puts on the wire; kith must take it as Sydent does.
    assert request.body == {"client_secret": secret, "email": address, "send_attempt": "1"}
    mail = poll(f"the validation mail to {address}",
                lambda: mails_to(story, address, since=before))[-1]
    text = plain_text(mail)
    links = [word for word in text.split() if "/validate/email/submitToken?" in word]
    assert len(links) == 1, text
    link = links[0]
    assert link.startswith(f"{story.identity_server_url}/_matrix/identity/"), link
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert query["sid"] == [sid] and query["client_secret"] == [secret], link
    assert query["token"][0] in text.replace(link, ""), "the mail also gives the code"

    validated_path = "/3pid/getValidated3pid?" + urllib.parse.urlencode(
        {"sid": sid, "client_secret": secret})
    status, body = story.kith.call("GET", validated_path, token=token)
    assert (status, body.get("errcode")) == (400, "M_SESSION_NOT_VALIDATED"), body
    status, content_type, page = open_link(story, link)
    assert status == 200 and content_type.startswith("text/html"), (status, page[:500])
    status, validated = story.kith.call("GET", validated_path, token=token)
    assert status == 200, validated
    assert (validated["medium"], validated["address"]) == ("email", address)
    return sid, secret


def bind_through_synapse(story: Story, localpart: str, sid: str, secret: str) -> None:
    """Element's discovery settings: the homeserver binds, calling kith's /3pid/bind."""
    answer = story.sdk.call(localpart, "bindThreePid", {
        "sid": sid, "client_secret": secret, "id_server": story.kith.server_name,
        "id_access_token": story.kith_tokens[localpart]})
    assert answer == {}, answer


def membership(user: MatrixUser, room_id: str, user_id: str) -> dict[str, Any] | None:
    quoted = urllib.parse.quote
    status, body = user.call(
        "GET", f"/_matrix/client/v3/rooms/{quoted(room_id)}/state/m.room.member/"
               f"{quoted(user_id)}")
    return body if status == 200 else None


# -------------------------------------------------------------------------- steps


def test_register_with_kith_through_openid(story: Story) -> None:
    sign_in(story, "alice")
    token = register_with_kith(story, "alice")
    request = sent(story, "POST", "/_matrix/identity/v2/account/register")
    # The SDK posts Synapse's OpenID answer as it is.
    assert set(request.body) == {"access_token", "token_type", "matrix_server_name",
                                 "expires_in"}, request.body
    # kith knows the token (a made-up one is refused), and whose it is: consent is all
    # it lacks.
    status, body = story.kith.call("GET", "/hash_details", token=token)
    assert (status, body.get("errcode")) == (403, "M_TERMS_NOT_SIGNED"), body
    status, body = story.kith.call("GET", "/hash_details", token="not-" + token)
    assert (status, body.get("errcode")) == (401, "M_UNAUTHORIZED"), body
    story.done.add("register")


def test_unsigned_terms_are_noticed_and_agreed_to(story: Story) -> None:
    story.require("register")
    sdk, token = story.sdk, story.kith_tokens["alice"]
    # Element's IdentityAuthClient checks a new token with GET /account; the terms
    # dialog opens only when that answers M_TERMS_NOT_SIGNED.
    try:
        unsigned: Any = sdk.call("alice", "getIdentityAccount", token)
    except SdkError as exc:
        unsigned = exc
    terms = agree_to_terms(story, "alice")
    assert terms["policies"]["privacy_policy"] == {
        "version": "1.0",
        "en": {"name": "Privacy Policy", "url": "https://kith.example/privacy-1.0-en.html"},
        "de": {"name": "Datenschutz", "url": "https://kith.example/privacy-1.0-de.html"},
    }
    assert terms["policies"]["terms_of_service"]["en"] == {
        "name": "Terms of Service", "url": "https://kith.example/tos-3.1-en.html"}
    assert set(terms["policies"]) == {"privacy_policy", "terms_of_service"}
    agreed = sent(story, "POST", "/_matrix/identity/v2/terms")
    assert agreed.body == {"user_accepts": [
        "https://kith.example/privacy-1.0-en.html", "https://kith.example/tos-3.1-en.html"]}
    assert sdk.call("alice", "getIdentityAccount", token) == {
        "user_id": story.users["alice"].user_id}
    status, body = story.kith.call("GET", "/hash_details", token=token)
    assert status == 200 and "sha256" in body["algorithms"], body
    story.done.add("terms")
    assert isinstance(unsigned, SdkError), (
        f"GET /account answered {unsigned!r} before the terms were agreed to: Element "
        "would never show its terms dialog")
    assert (unsigned.http_status, unsigned.errcode) == (403, "M_TERMS_NOT_SIGNED"), unsigned


def test_email_is_proven_by_link_and_bound_through_synapse(story: Story) -> None:
    story.require("terms")
    sid, secret = prove_email(story, "alice", ALICE_EMAIL)
    assert kith_lookup(story, "alice", ("email", ALICE_EMAIL)) == {}
    bind_through_synapse(story, "alice", sid, secret)
    assert kith_lookup(story, "alice", ("email", ALICE_EMAIL)) == {
        ALICE_EMAIL: story.users["alice"].user_id}
    story.done.add("email")


def test_an_address_beyond_ascii_is_proven_by_link(story: Story) -> None:
    """The address as typed into Element, with a non-ASCII local part: kith mails it
    over SMTPUTF8 (which the test's SMTP server offers), and the link proves it."""
    story.require("terms")
    prove_email(story, "alice", "jöran@example.com")


def test_phone_is_proven_by_sms_code_and_bound_through_synapse(story: Story) -> None:
    story.require("terms")
    sdk, token = story.sdk, story.kith_tokens["alice"]
    country, typed, msisdn = ALICE_PHONE
    secret = secrets.token_urlsafe(16)
    answer = sdk.call("alice", "requestMsisdnToken", country, typed, secret, 1, None, token)
    assert answer["msisdn"] == msisdn and answer["success"] is True, answer
    request = sent(story, "POST", "/_matrix/identity/v2/validate/msisdn/requestToken")
    assert request.body == {"client_secret": secret, "country": country,
                            "phone_number": typed, "send_attempt": "1"}
    text = poll(f"the SMS to {msisdn}", lambda: story.sms.sent_to(msisdn))[-1]
    code = story.sms.code_in(text)
    with pytest.raises(SdkError) as wrong:
        sdk.call("alice", "submitMsisdnToken", answer["sid"], secret,
                 "000000" if code != "000000" else "111111", token)
    assert (wrong.value.http_status, wrong.value.errcode) == (400, "M_TOKEN_INCORRECT")
    assert sdk.call("alice", "submitMsisdnToken", answer["sid"], secret, code, token) == {
        "success": True}
    bind_through_synapse(story, "alice", answer["sid"], secret)
    assert kith_lookup(story, "alice", ("msisdn", msisdn)) == {
        msisdn: story.users["alice"].user_id}
    story.done.add("phone")


def test_hashed_lookup_finds_the_bound_addresses(story: Story) -> None:
    story.require("email")
    story.require("phone")
    msisdn = ALICE_PHONE[2]
    found = story.sdk.call("alice", "identityHashedLookup", [
        [ALICE_EMAIL, "email"], [msisdn, "msisdn"], ["nobody@example.com", "email"]],
        story.kith_tokens["alice"])
    alice = story.users["alice"].user_id
    assert sorted(found, key=lambda m: m["address"]) == [
        {"address": msisdn, "mxid": alice}, {"address": ALICE_EMAIL, "mxid": alice}]
    # The SDK asked for the pepper first, then sent only hashes.
    hash_details, lookup = story.sdk.take_requests()[-2:]
    assert (hash_details.method, hash_details.path) == (
        "GET", "/_matrix/identity/v2/hash_details")
    assert (lookup.method, lookup.path) == ("POST", "/_matrix/identity/v2/lookup")
    assert lookup.body["algorithm"] == "sha256" and len(lookup.body["addresses"]) == 3
    assert not {ALICE_EMAIL, msisdn} & set(lookup.body["addresses"])


def test_invite_by_email_reaches_the_invitee_once_bound(story: Story) -> None:
    story.require("terms")
    sdk, alice = story.sdk, story.users["alice"]
    room_id = sdk.call("alice", "createRoom", {"name": "Plans"})["room_id"]
    before = len(story.smtp.messages)
    assert sdk.call("alice", "inviteByThreePid", room_id, "email", DAVE_EMAIL) == {}
    invite = sent(story, "POST", "/invite")
    assert invite.body == {"id_server": story.kith.server_name, "medium": "email",
                           "address": DAVE_EMAIL,
                           "id_access_token": story.kith_tokens["alice"]}
    # kith stored the invite (Synapse called store-invite) and mailed it.
    mail = poll(f"the invite mail to {DAVE_EMAIL}",
                lambda: mails_to(story, DAVE_EMAIL, since=before))[-1]
    assert "Plans" in plain_text(mail), mail
    status, state = alice.call(
        "GET", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/state")
    assert status == 200, state
    [third_party] = [e for e in state if e["type"] == "m.room.third_party_invite"]
    status, kith_key = story.kith.call("GET", "/pubkey/ed25519:0")
    assert status == 200, kith_key
    assert kith_key["public_key"] in [k["public_key"]
                                      for k in third_party["content"]["public_keys"]]

    # dave signs in to Element, accepts kith's terms and makes his address discoverable.
    dave = sign_in(story, "dave")
    register_with_kith(story, "dave")
    agree_to_terms(story, "dave")
    sid, secret = prove_email(story, "dave", DAVE_EMAIL)
    bind_through_synapse(story, "dave", sid, secret)
    # kith hands the invite to Synapse (onbind); dave is invited to the room.
    member = poll(f"{dave.user_id}'s invite", lambda: membership(alice, room_id, dave.user_id),
                  timeout_s=60)
    assert member["membership"] == "invite", (member, kith_log(story.kith)[-2000:])
    signed = member["third_party_invite"]["signed"]
    assert signed["mxid"] == dave.user_id and signed["token"] == third_party["state_key"]
    status, sync = dave.call("GET", "/_matrix/client/v3/sync?timeout=0")
    assert status == 200 and room_id in sync.get("rooms", {}).get("invite", {}), sync


def test_unbind_through_synapse_removes_the_binding(story: Story) -> None:
    story.require("email")
    answer = story.sdk.call("alice", "unbindThreePid", "email", ALICE_EMAIL)
    assert answer == {"id_server_unbind_result": "success"}, (
        answer, kith_log(story.kith)[-2000:])
    assert kith_lookup(story, "alice", ("email", ALICE_EMAIL)) == {}
    msisdn = ALICE_PHONE[2]
    if "phone" in story.done:  # the other binding stays
        assert kith_lookup(story, "alice", ("msisdn", msisdn)) == {
            msisdn: story.users["alice"].user_id}
    assert story.sdk.call("alice", "identityHashedLookup", [[ALICE_EMAIL, "email"]],
                          story.kith_tokens["alice"]) == []
