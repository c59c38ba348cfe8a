"""store-invite and sign-ed25519: 3PID invites for addresses not on Matrix yet."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from kith.api.fields import Identifier, Name, Url, check_string_lengths
from kith.api.http import (
    caller,
    decode_json,
    json_response,
    read_body,
    requester,
    services_of,
)
from kith.services.invites import InviteRequest

V2 = "/_matrix/identity/v2"


class StoreInviteRequest(msgspec.Struct):
    medium: Identifier
    address: str  # at most 500 characters: refused as M_INVALID_EMAIL otherwise
    room_id: Identifier
    sender: Identifier
    room_alias: Identifier | None = None
    room_avatar_url: Url | None = None
    room_join_rules: Identifier | None = None
    room_name: Name | None = None
    room_type: Identifier | None = None
    sender_display_name: Name | None = None
    sender_avatar_url: Url | None = None


class SignRequest(msgspec.Struct):
    mxid: str
    token: str
    private_key: str


async def store_invite(request: web.Request) -> web.Response:
    account = await caller(request)
    raw = await read_body(request)
    body = decode_json(raw, StoreInviteRequest)
    args = decode_json(raw, dict[str, Any])
    check_string_lengths(args)
    answer = await services_of(request).invites.store_invite(
        InviteRequest(medium=body.medium, address=body.address, room_id=body.room_id,
                      sender=body.sender, args=args),
        verified_sender=account.user_id if account is not None else None,
        brand=request.query.get("brand"), requester=requester(request, account))
    return json_response(answer)


async def sign_ed25519(request: web.Request) -> web.Response:
    await caller(request)
    raw = await read_body(request)
    if not raw.strip() and request.query:
        # A web client POSTs the sign URL from the invite mail, adding `mxid`: the
        # parameters are in the query string.
        raw = msgspec.json.encode(dict(request.query))
    body = decode_json(raw, SignRequest)
    signed = await services_of(request).invites.sign_ed25519(
        body.mxid, body.token, body.private_key)
    return json_response(signed)


def add_routes(router: web.UrlDispatcher, prefix: str = V2) -> None:
    router.add_post(f"{prefix}/store-invite", store_invite)
    router.add_post(f"{prefix}/sign-ed25519", sign_ed25519)
