"""Sydent's internal API: bind and unbind without validation, for trusted local callers."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import Call, add_plain_route, decode_json, encode_json


class InternalThreepid(msgspec.Struct):
    medium: str
    address: str
    mxid: str


async def bind(call: Call) -> bytes:
    body = decode_json(call.body, InternalThreepid)
    return encode_json(await call.services.bindings.bind(body.medium, body.address, body.mxid))


async def unbind(call: Call) -> bytes:
    body = decode_json(call.body, InternalThreepid)
    await call.services.bindings.unbind(body.medium, body.address, body.mxid)
    return b"{}"


def add_routes(app: web.Application) -> None:
    add_plain_route(app, "POST", "/_matrix/identity/internal/bind", bind)
    add_plain_route(app, "POST", "/_matrix/identity/internal/unbind", unbind)
