"""Public keys: the long-term server key, and ephemeral invite keys."""

from __future__ import annotations

from aiohttp import web

from kith.api.http import json_response, services_of
from kith.errors import M_NOT_FOUND, MatrixError, missing_params


def _public_key_param(request: web.Request) -> str:
    public_key = request.query.get("public_key")
    if public_key is None:
        raise missing_params("public_key")
    return public_key


async def get_pubkey(request: web.Request) -> web.Response:
    key = services_of(request).keys.public_key_for(request.match_info["key_id"])
    if key is None:
        raise MatrixError(404, M_NOT_FOUND, "The public key was not found")
    return json_response({"public_key": key})


async def is_valid(request: web.Request) -> web.Response:
    valid = services_of(request).keys.is_valid(_public_key_param(request))
    return json_response({"valid": valid})


async def ephemeral_is_valid(request: web.Request) -> web.Response:
    public_key = _public_key_param(request)
    invites = services_of(request).invites
    valid = invites is not None and await invites.ephemeral_key_is_valid(public_key)
    return json_response({"valid": valid})


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    # The literal paths first: {key_id} would swallow them.
    router.add_get(f"{prefix}/pubkey/isvalid", is_valid, allow_head=False)
    router.add_get(f"{prefix}/pubkey/ephemeral/isvalid", ephemeral_is_valid, allow_head=False)
    router.add_get(f"{prefix}/pubkey/{{key_id}}", get_pubkey, allow_head=False)
