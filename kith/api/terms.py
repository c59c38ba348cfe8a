"""GET /terms (the policies) and POST /terms (the user accepts some of them)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import authenticated, json_body, json_response, services_of


class AcceptTerms(msgspec.Struct):
    user_accepts: list[str]


async def get_terms(request: web.Request) -> web.Response:
    return json_response({"policies": services_of(request).terms.current().policies})


async def accept_terms(request: web.Request) -> web.Response:
    user = await authenticated(request, consent=False)
    body = await json_body(request, AcceptTerms)
    await services_of(request).accounts.accept_terms(user, body.user_accepts)
    return json_response({})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/_matrix/identity/v2/terms", get_terms, allow_head=False)
    router.add_post("/_matrix/identity/v2/terms", accept_terms)
