"""GET /versions and the status checks (v2, and v1 when the legacy API is on)."""

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
    add_status_route(router, "/_matrix/identity/v2")


def add_status_route(router: web.UrlDispatcher, path: str) -> None:
    """`GET /_matrix/identity/v2`, and `GET /_matrix/identity/api/v1` (r0.3.0's check)."""
    router.add_get(path, status, allow_head=False)
