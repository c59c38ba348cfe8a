"""GET /versions and the v2 status check."""

from __future__ import annotations

from aiohttp import web

from kith.api.http import json_response

SUPPORTED_VERSIONS = [f"v1.{minor}" for minor in range(1, 20)]


async def versions(_request: web.Request) -> web.Response:
    return json_response({"versions": SUPPORTED_VERSIONS})


async def status(_request: web.Request) -> web.Response:
    return json_response({})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/_matrix/identity/versions", versions, allow_head=False)
    router.add_get("/_matrix/identity/v2", status, allow_head=False)
