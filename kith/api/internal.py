"""Sydent's internal API: bind and unbind without validation, for trusted local callers."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import json_body, json_response, services_of


class InternalThreepid(msgspec.Struct):
    medium: str
    address: str
    mxid: str


async def bind(request: web.Request) -> web.Response:
    body = await json_body(request, InternalThreepid)
    signed = await services_of(request).bindings.bind(body.medium, body.address, body.mxid)
    return json_response(signed)


async def unbind(request: web.Request) -> web.Response:
    body = await json_body(request, InternalThreepid)
    await services_of(request).bindings.unbind(body.medium, body.address, body.mxid)
    return json_response({})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/_matrix/identity/internal/bind", bind)
    router.add_post("/_matrix/identity/internal/unbind", unbind)
