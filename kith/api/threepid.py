"""getValidated3pid, bind and unbind: publishing what a validation session proved."""

from __future__ import annotations

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
from kith.errors import M_UNAUTHORIZED, MatrixError
from kith.services import Services
from kith.services.accounts import Account
from kith.services.bindings import check_mxid, check_threepid

V2 = "/_matrix/identity/v2"


class BindRequest(msgspec.Struct):
    sid: str | int
    client_secret: str
    mxid: str


class Threepid(msgspec.Struct):
    medium: str
    address: str


class UnbindRequest(msgspec.Struct):
    mxid: str
    threepid: Threepid
    sid: str | int | None = None
    client_secret: str | None = None


def forbidden(message: str) -> MatrixError:
    return MatrixError(403, M_UNAUTHORIZED, message)


async def get_validated_3pid(request: web.Request) -> web.Response:
    await caller(request)
    sid, client_secret = query_params(request, "sid", "client_secret")
    validated = await services_of(request).validation.get_validated(sid, client_secret)
    return json_response({"medium": validated.medium, "address": validated.address,
                          "validated_at": validated.validated_at})


async def bind(request: web.Request) -> web.Response:
    account = await caller(request)
    body = await json_body(request, BindRequest)
    # v1 (no account) binds to any mxid, as r0.3.0 did; v2 only to the caller's own.
    if account is not None and body.mxid != account.user_id:
        raise forbidden("This user is prohibited from binding to the mxid")
    validated = await services_of(request).validation.get_validated(
        str(body.sid), body.client_secret)
    signed = await services_of(request).bindings.bind(
        validated.medium, validated.address, body.mxid)
    return json_response(signed)


def is_homeserver_signed(request: web.Request) -> bool:
    scheme = request.headers.get("Authorization", "").partition(" ")[0]
    return scheme.lower() == "x-matrix"


async def authorise_homeserver_unbind(request: web.Request, raw_body: bytes,
                                      body: UnbindRequest) -> None:
    """The one place where an `Authorization: X-Matrix` unbind is checked: signed by the
    homeserver of `body.mxid`, over exactly this method, path and body."""
    homeservers = services_of(request).homeserver_auth
    origin = await homeservers.verify(
        request.headers["Authorization"], method=request.method, uri=request.raw_path,
        content=msgspec.json.decode(raw_body))
    check_mxid(body.mxid)
    homeservers.require_owner(origin, body.mxid)


async def authorise_session_unbind(services: Services, request: web.Request,
                                   account: Account | None, body: UnbindRequest) -> None:
    """The caller owns `body.mxid` (v2) and a validated session for exactly that 3PID."""
    if account is not None and body.mxid != account.user_id:
        raise forbidden("This user is prohibited from unbinding the mxid")
    if body.sid is None or body.client_secret is None:
        raise forbidden("Unbinding needs the sid and client_secret of a validated session")
    address = check_threepid(body.threepid.medium, body.threepid.address)
    try:
        validated = await services_of(request).validation.get_validated(str(body.sid),
                                                               body.client_secret)
    except MatrixError as exc:
        if exc.status >= 500:
            raise
        raise forbidden(f"No validated session for this 3PID: {exc.message}") from None
    if (validated.medium, validated.address) != (body.threepid.medium, address):
        raise forbidden("The session did not validate this 3PID")


async def unbind(request: web.Request) -> web.Response:
    services = services_of(request)
    if is_homeserver_signed(request):
        raw = await read_body(request)
        body = decode_json(raw, UnbindRequest)
        await authorise_homeserver_unbind(request, raw, body)
    else:
        account = await caller(request)
        body = await json_body(request, UnbindRequest)
        await authorise_session_unbind(services, request, account, body)
    await services.bindings.unbind(body.threepid.medium, body.threepid.address, body.mxid)
    return json_response({})


def add_routes(router: web.UrlDispatcher, prefix: str = V2, *, bind_route: bool = True) -> None:
    """The same handlers serve v2 and, under the v1 prefix, the legacy API (whose bind
    is served only while `enable_v1_associations` is on)."""
    router.add_get(f"{prefix}/3pid/getValidated3pid", get_validated_3pid, allow_head=False)
    if bind_route:
        router.add_post(f"{prefix}/3pid/bind", bind)
    router.add_post(f"{prefix}/3pid/unbind", unbind)
