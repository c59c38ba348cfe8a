"""getValidated3pid, bind and unbind: publishing what a validation session proved."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from kith.api.http import (
    caller,
    decode_json,
    json_body,
    json_response,
    read_body,
    services_of,
)
from kith.api.validate import query_params
from kith.services.accounts import Account
from kith.threepid import Threepid

V2 = "/_matrix/identity/v2"


class BindRequest(msgspec.Struct):
    sid: str | int
    client_secret: str
    mxid: str


class UnbindRequest(msgspec.Struct):
    mxid: str
    threepid: Threepid
    sid: str | int | None = None
    client_secret: str | None = None


async def get_validated_3pid(request: web.Request) -> web.Response:
    await caller(request)
    sid, client_secret = query_params(request, "sid", "client_secret")
    validated = await services_of(request).validation.get_validated(sid, client_secret)
    return json_response({"medium": validated.medium, "address": validated.address,
                          "validated_at": validated.validated_at})


async def bind(request: web.Request) -> web.Response:
    account = await caller(request)
    body = await json_body(request, BindRequest)
    signed = await services_of(request).bindings.bind_validated(
        user_id_of(account), str(body.sid), body.client_secret, body.mxid)
    return json_response(signed)


def is_homeserver_signed(request: web.Request) -> bool:
    scheme = request.headers.get("Authorization", "").partition(" ")[0]
    return scheme.lower() == "x-matrix"


async def unbind(request: web.Request) -> web.Response:
    """Authorised by the homeserver's X-Matrix signature over exactly this method, path
    and body, or by the caller's validated session for the 3PID."""
    services = services_of(request)
    if is_homeserver_signed(request):
        raw = await read_body(request)
        body = decode_json(raw, UnbindRequest)
        origin = await services.homeserver_auth.verify(
            request.headers["Authorization"], method=request.method, uri=request.raw_path,
            content=decode_json(raw, dict[str, Any]))
        await services.bindings.unbind_for_homeserver(
            origin, body.mxid, body.threepid.medium, body.threepid.address)
    else:
        account = await caller(request)
        body = await json_body(request, UnbindRequest)
        await services.bindings.unbind_validated(
            user_id_of(account), body.mxid, body.threepid.medium, body.threepid.address,
            None if body.sid is None else str(body.sid), body.client_secret)
    return json_response({})


def user_id_of(account: Account | None) -> str | None:
    return None if account is None else account.user_id


def add_routes(router: web.UrlDispatcher, prefix: str = V2, *, bind_route: bool = True) -> None:
    """The same handlers serve v2 and, under the v1 prefix, the legacy API (whose bind
    is served only while `enable_v1_associations` is on)."""
    router.add_get(f"{prefix}/3pid/getValidated3pid", get_validated_3pid, allow_head=False)
    if bind_route:
        router.add_post(f"{prefix}/3pid/bind", bind)
    router.add_post(f"{prefix}/3pid/unbind", unbind)
