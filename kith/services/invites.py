"""3PID invites: storing an invite for an email address, mailing it, and the invite keys.

The invite is a token plus a fresh ed25519 key pair: the public half goes to the
homeserver (into the room's `m.room.third_party_invite` event) and is served by
`/pubkey/ephemeral/isvalid`; the private half is only in the mail, so whoever reads the
mail can have the invite signed (`sign-ed25519`).  When the address is bound, the
onbind service tells the invitee's homeserver (kith.services.onbind).
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nacl.signing
from signedjson.key import decode_signing_key_base64
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64, encode_base64

from kith.config import EmailConfig
from kith.delivery.email import EmailSender, EmailSendError, EmailTemplates
from kith.delivery.templates import TemplateError
from kith.errors import (
    M_EMAIL_SEND_ERROR,
    M_INVALID_EMAIL,
    M_INVALID_PARAM,
    M_THREEPID_IN_USE,
    M_UNAUTHORIZED,
    M_UNRECOGNIZED,
    MatrixError,
)
from kith.services.keys import ServerKeys
from kith.services.limits import Requester, SendLimits
from kith.services.lookup import LookupService
from kith.services.onbind import OnbindService
from kith.store import InviteTokenRow, Store
from kith.threepid import check_mxid, normalise_plain_email, now_ms

log = logging.getLogger(__name__)

TOKEN_LENGTH = 128
V2_PREFIX = "/_matrix/identity/v2"
V1_PREFIX = "/_matrix/identity/api/v1"
EPHEMERAL_KEY_ID = "0"


def new_invite_token() -> str:
    """128 random ASCII letters, as Sydent's."""
    return "".join(secrets.choice(string.ascii_letters) for _ in range(TOKEN_LENGTH))


def redact(part: str, reveal: int) -> str:
    """Sydent's rule: the first `reveal` characters if longer; else 3 of a part longer
    than 5, 1 of a part longer than 1, nothing of one character; then "..."."""
    if len(part) > reveal:
        return part[:reveal] + "..."
    if len(part) > 5:
        return part[:3] + "..."
    if len(part) > 1:
        return part[0] + "..."
    return "..."


def redact_email_address(address: str, username_chars: int, domain_chars: int) -> str:
    username, _, domain = address.partition("@")
    return f"{redact(username, username_chars)}@{redact(domain, domain_chars)}"


def public_base_url(client_http_base: str, server_name: str) -> str:
    """Where clients and homeservers reach us: `client_http_base`, else
    `https://<server.name>` (a key_validity_url must be absolute)."""
    return client_http_base.rstrip("/") or f"https://{server_name}"


def server_of(identifier: str) -> str | None:
    """The server part of a user or room ID (room IDs of v12 rooms have none)."""
    _, colon, server = identifier.partition(":")
    return server if colon else None


@dataclass(frozen=True, slots=True)
class InviteRequest:
    medium: str
    address: str
    room_id: str
    sender: str
    # Every field of the request that is a string, for the mail template.
    args: Mapping[str, Any]


class InviteService:
    def __init__(self, store: Store, keys: ServerKeys, lookup: LookupService, *,
                 email: EmailConfig, email_sender: EmailSender,
                 email_templates: EmailTemplates, limits: SendLimits,
                 base_url: str, v1_enabled: bool = True,
                 onbind: OnbindService | None = None,
                 lifetime_s: float = 365 * 24 * 60 * 60,
                 clock: Callable[[], int] = now_ms) -> None:
        self._onbind = onbind
        self._store = store
        self._keys = keys
        self._lookup = lookup
        self._email = email
        self._sender = email_sender
        self._templates = email_templates
        self._limits = limits
        self._clock = clock
        self._lifetime_s = lifetime_s
        self.base_url = base_url
        self.v1_enabled = v1_enabled

    # ------------------------------------------------------------------- store-invite

    async def store_invite(self, request: InviteRequest, *, verified_sender: str | None,
                           brand: str | None = None,
                           requester: Requester | None = None) -> dict[str, Any]:
        """Store the invite, mail it, and answer the keys and the redacted address.

        `verified_sender` is the authenticated account (v2): the invite must come from
        it, as in Sydent.  The mail counts against the sender's limit, the recipient
        address's and the client address's, checked before anything is stored."""
        check_mxid(request.sender, "sender")
        if verified_sender is not None and request.sender != verified_sender:
            raise MatrixError(403, M_UNAUTHORIZED, "'sender' doesn't match")
        if request.medium != "email":
            raise MatrixError(400, M_UNRECOGNIZED,
                              f"Didn't understand medium '{request.medium}'")
        address = normalise_plain_email(request.address)
        if address is None:
            raise MatrixError(400, M_INVALID_EMAIL, "Invalid email address")
        if refused := await self._sender.undeliverable(address):
            raise MatrixError(400, M_INVALID_EMAIL, refused)
        if not request.room_id.startswith("!"):
            raise MatrixError(400, M_INVALID_PARAM, "Invalid room_id")
        owner = await self._lookup.resolve("email", address)
        if owner is not None:
            raise MatrixError(400, M_THREEPID_IN_USE, "Binding already known",
                              mxid=owner[0])
        self._check_blocklists(request)
        limits = self._limits
        await limits.hit((limits.email_sender, request.sender),
                         (limits.email_recipient, address),
                         (limits.client_ip, requester.ip if requester else None))

        token = new_invite_token()
        ephemeral = nacl.signing.SigningKey.generate()
        private_key = encode_base64(bytes(ephemeral), urlsafe=True)
        public_key = encode_base64(ephemeral.verify_key.encode(), urlsafe=True)
        invite = InviteTokenRow(medium="email", address=address, room_id=request.room_id,
                                sender=request.sender, token=token,
                                received_ts=self._clock())
        await self._store.invites.add(invite, public_key)
        if self._onbind is not None:
            self._onbind.pending.added("email", address)
        try:
            message = await self._templates.invite(
                address, request.args, token=token, ephemeral_private_key=private_key,
                verified_sender=verified_sender, sign_url=self._sign_url(token, private_key),
                brand=brand)
            await self._sender.send(address, message)
        except (EmailSendError, TemplateError) as exc:
            log.warning("invite mail not sent: %s", exc)
            await self._store.invites.remove(token, public_key)
            raise MatrixError(500, M_EMAIL_SEND_ERROR,
                              "Failed to send the invite email") from None
        display_name = redact_email_address(
            request.address.strip(), self._email.username_obfuscate_characters,
            self._email.domain_obfuscate_characters)
        return {
            "token": token,
            "public_key": self._keys.public_key,
            "public_keys": [
                {"public_key": self._keys.public_key,
                 "key_validity_url": f"{self.base_url}{V2_PREFIX}/pubkey/isvalid"},
                {"public_key": public_key,
                 "key_validity_url": f"{self.base_url}{V2_PREFIX}/pubkey/ephemeral/isvalid"},
            ],
            "display_name": display_name,
        }

    async def purge_expired(self) -> int:
        """Delete invites (and their ephemeral keys) older than their lifetime; how many
        rows went."""
        return await self._store.invites.delete_older_than(
            self._clock() - round(self._lifetime_s * 1000))

    def _check_blocklists(self, request: InviteRequest) -> None:
        """Sydent's three blocklists; a hit is 403 M_UNAUTHORIZED."""
        email = self._email
        if server_of(request.sender) in email.homeserver_blocklist:
            raise MatrixError(403, M_UNAUTHORIZED, "Invites from this homeserver are blocked")
        room_server = server_of(request.room_id)
        if room_server is not None and room_server in email.room_blocklist:
            raise MatrixError(403, M_UNAUTHORIZED,
                              "Invites to rooms on this homeserver are blocked")
        if email.keyword_blocklist:
            values = [value.casefold() for value in request.args.values()
                      if isinstance(value, str)]
            for keyword in email.keyword_blocklist:
                if any(keyword.casefold() in value for value in values):
                    raise MatrixError(403, M_UNAUTHORIZED, "This invite is blocked")

    def _sign_url(self, token: str, private_key: str) -> str:
        """The link a web client POSTs (adding `mxid`) to have the invite signed: the v1
        endpoint, which needs no identity server token; none when v1 is off."""
        if not self.v1_enabled:
            return ""
        return (f"{self.base_url}{V1_PREFIX}/sign-ed25519"
                f"?token={token}&private_key={private_key}")

    # ------------------------------------------------------------------- sign-ed25519

    async def sign_ed25519(self, mxid: str, token: str, private_key: str) -> dict[str, Any]:
        """`{mxid, sender, token}` signed with the invite's ephemeral key."""
        check_mxid(mxid, "mxid")
        try:
            seed = decode_base64(private_key)
            if len(seed) != 32:
                raise ValueError("not 32 bytes")
            signing_key = decode_signing_key_base64(
                "ed25519", EPHEMERAL_KEY_ID, encode_base64(seed))
        except (ValueError, TypeError):
            raise MatrixError(400, M_INVALID_PARAM, "Invalid private_key") from None
        invite = await self._store.invites.get(token)
        if invite is None:
            raise MatrixError(404, M_UNRECOGNIZED, "Didn't recognize token")
        signed: dict[str, Any] = sign_json(
            {"mxid": mxid, "sender": invite.sender, "token": token},
            self._keys.server_name, signing_key)
        return signed

    async def ephemeral_key_is_valid(self, public_key: str) -> bool:
        """Whether we issued the key (in either base64 alphabet); counts the check."""
        normalised = public_key.rstrip("=").replace("+", "-").replace("/", "_")
        return await self._store.invites.count_ephemeral_key_check(normalised)
