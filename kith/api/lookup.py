"""GET /hash_details and POST /lookup: the hashed lookup clients hit most."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kith.api.http import (
    Call,
    add_plain_route,
    authenticate,
    decode_json,
    encode_json,
    json_body,
    json_response,
    requester,
    services_of,
)
from kith.errors import missing_params
from kith.threepid import plain_query


class LookupRequest(msgspec.Struct):
    algorithm: str
    pepper: str
    addresses: list[str]


async def hash_details(call: Call) -> bytes:
    await authenticate(call.services, call.token)
    return encode_json(call.services.lookup.hash_details())


async def lookup(call: Call) -> bytes:
    account = await authenticate(call.services, call.token)
    body = decode_json(call.body, LookupRequest)
    mappings = await call.services.lookup.lookup_json(
        body.algorithm, body.pepper, body.addresses, call.requester(account))
    return b'{"mappings":' + mappings + b"}"


class BulkLookupRequest(msgspec.Struct):
    threepids: list[tuple[str, str]]


async def lookup_v1(request: web.Request) -> web.Response:
    """v1: one 3PID in the query string → its signed association, or {}."""
    medium, address = request.query.get("medium"), request.query.get("address")
    if not medium or not address:
        raise missing_params(*[n for n, v in (("medium", medium), ("address", address))
                               if not v])
    services = services_of(request)
    query = plain_query(medium, address)
    mappings = await services.lookup.lookup("none", services.lookup.pepper, [query],
                                            requester(request))
    if query not in mappings:
        return json_response({})
    signed = await services.bindings.signed_association(medium, address, mappings[query])
    return json_response(signed)


async def bulk_lookup_v1(request: web.Request) -> web.Response:
    """v1: [[medium, address], ...] → [[medium, address, mxid], ...] for those bound."""
    body = await json_body(request, BulkLookupRequest)
    services = services_of(request)
    queries = [plain_query(medium, address) for medium, address in body.threepids]
    mappings = await services.lookup.lookup("none", services.lookup.pepper, queries,
                                            requester(request))
    found = [[medium, address, mappings[query]]
             for (medium, address), query in zip(body.threepids, queries, strict=True)
             if query in mappings]
    return json_response({"threepids": found})


def add_v1_routes(router: web.UrlDispatcher, prefix: str) -> None:
    router.add_get(f"{prefix}/lookup", lookup_v1, allow_head=False)
    router.add_post(f"{prefix}/bulk_lookup", bulk_lookup_v1)


def add_routes(app: web.Application) -> None:
    add_plain_route(app, "GET", "/_matrix/identity/v2/hash_details", hash_details)
    add_plain_route(app, "POST", "/_matrix/identity/v2/lookup", lookup)
