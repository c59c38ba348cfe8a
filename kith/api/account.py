"""Account registration with an OpenID token, the account's user ID, logout."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import (
    access_token,
    authenticated,
    json_body,
    json_response,
    requester,
    services_of,
)


class OpenIdToken(msgspec.Struct):
    access_token: str
    matrix_server_name: str
    token_type: str = "Bearer"
    expires_in: int = 0


async def register(request: web.Request) -> web.Response:
    body = await json_body(request, OpenIdToken)
    token = await services_of(request).accounts.register(
        body.matrix_server_name, body.access_token, requester(request))
    return json_response({"token": token, "access_token": token})


async def account(request: web.Request) -> web.Response:
    # Gated by the terms, as in Sydent: Element shows its terms dialog on this 403.
    user = await authenticated(request)
    return json_response({"user_id": user.user_id})


async def logout(request: web.Request) -> web.Response:
    await authenticated(request, consent=False)
    token = access_token(request)
    assert token is not None
    await services_of(request).accounts.logout(token)
    return json_response({})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/_matrix/identity/v2/account/register", register)
    router.add_get("/_matrix/identity/v2/account", account, allow_head=False)
    router.add_post("/_matrix/identity/v2/account/logout", logout)
