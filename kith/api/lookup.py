"""GET /hash_details and POST /lookup: the hashed lookup clients hit most."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import authenticated, json_body, json_response, services_of


class LookupRequest(msgspec.Struct):
    algorithm: str
    pepper: str
    addresses: list[str]


async def hash_details(request: web.Request) -> web.Response:
    await authenticated(request)
    return json_response(services_of(request).lookup.hash_details())


async def lookup(request: web.Request) -> web.Response:
    await authenticated(request)
    body = await json_body(request, LookupRequest)
    mappings = await services_of(request).lookup.lookup(body.algorithm, body.pepper, body.addresses)
    return json_response({"mappings": mappings})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/_matrix/identity/v2/hash_details", hash_details, allow_head=False)
    router.add_post("/_matrix/identity/v2/lookup", lookup)
