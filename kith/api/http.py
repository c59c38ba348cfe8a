"""What every handler shares: JSON in and out, Matrix errors, CORS, access tokens."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import hdrs, web
from prometheus_client import Counter, Histogram

from kith.errors import (
    M_BAD_JSON,
    M_INVALID_PARAM,
    M_MISSING_PARAMS,
    M_NOT_JSON,
    M_TOO_LARGE,
    M_UNKNOWN,
    M_UNRECOGNIZED,
    MatrixError,
    database_unreachable,
)
from kith.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, UNMATCHED_ROUTE
from kith.services import Services
from kith.services.accounts import Account
from kith.services.limits import Requester, ip_key
from kith.store import is_storage_full, is_unreachable

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers":
        "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}

MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
ALLOW_QUERY_TOKEN = web.AppKey("allow_query_access_token", bool)
# Sydent's [http] obey_x_forwarded_for: kith runs behind a reverse proxy.
OBEY_X_FORWARDED_FOR = web.AppKey("obey_x_forwarded_for", bool)

encode_json = msgspec.json.Encoder().encode
_MISSING_FIELD = re.compile(r"Object missing required field `([^`]*)`")
# The header fields of every JSON answer (the express lane writes the same).
JSON_HEADERS = {"Content-Type": "application/json", **CORS_HEADERS}


def json_response(body: Any, status: int = 200) -> web.Response:
    return encoded_json_response(encode_json(body), status)


def encoded_json_response(body: bytes, status: int = 200) -> web.Response:
    """An answer whose JSON body is already encoded (UTF-8)."""
    return web.Response(body=body, status=status, headers=JSON_HEADERS)


def error_response(error: MatrixError) -> web.Response:
    return json_response(error.to_json(), error.status)


async def read_body(request: web.Request) -> bytes:
    """The whole body, refusing anything over the app's limit before reading it all, and
    a body that does not arrive within the app's timeout (a client that trickles it in
    would hold the connection for as long as it likes)."""
    limit = request.app[MAX_BODY_BYTES]
    if request.content_length is not None and request.content_length > limit:
        raise MatrixError(413, M_TOO_LARGE, f"Request body larger than {limit} bytes")
    timeout_s = request.app[BODY_TIMEOUT_S]
    content = request.content
    if content.is_eof() and hdrs.CONTENT_ENCODING not in request.headers:
        # All of it arrived with the head, as it was sent: take it as it lies in the
        # buffer (request.read() would copy it twice, chunk by chunk).
        body = content.read_nowait()
        if len(body) > limit:  # chunked: no length said beforehand
            raise MatrixError(413, M_TOO_LARGE, f"Request body larger than {limit} bytes")
        return body
    try:
        if content.is_eof():  # nothing to wait for
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise MatrixError(413, M_TOO_LARGE, f"Request body larger than {limit} bytes") from exc
    except TimeoutError:
        raise MatrixError(408, M_UNKNOWN,
                          f"The request body did not arrive within {timeout_s:g} s") from None


def decode_json(body: bytes, type_: type[T]) -> T:
    """Decode a JSON object body into `type_`, mapping each failure to its errcode."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        missing = _MISSING_FIELD.match(message)
        if missing:
            raise MatrixError(400, M_MISSING_PARAMS,
                              f"Missing parameter: {missing.group(1)}") from exc
        if message.startswith("Expected `object`") and "at `$" not in message:
            raise MatrixError(400, M_BAD_JSON, "The request body must be a JSON object") from exc
        raise MatrixError(400, M_INVALID_PARAM, f"Invalid parameter: {message}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MatrixError(400, M_NOT_JSON, "The request body is not valid UTF-8 JSON") from exc
    except RecursionError:
        raise MatrixError(400, M_BAD_JSON, "The request body is nested too deeply") from None


async def json_body(request: web.Request, type_: type[T]) -> T:
    return decode_json(await read_body(request), type_)


def access_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        return bearer_token(header)
    if request.app[ALLOW_QUERY_TOKEN]:
        return request.query.get("access_token")
    return None


def bearer_token(authorization: str) -> str | None:
    """The access token of an Authorization header's value (None: not a bearer token)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


_STATUS_ERRORS = {
    404: (M_UNRECOGNIZED, "Unrecognized request"),
    405: (M_UNRECOGNIZED, "Method not allowed for this endpoint"),
    413: (M_TOO_LARGE, "Request body too large"),
}


_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
# Label children by key: `labels()` validates and locks on every call; a dict probe is
# cheaper.  The keys are bounded (methods above, registered routes, statuses).
_request_counters: dict[tuple[str, str, int], Counter] = {}
_duration_histograms: dict[str, Histogram] = {}


def _count_request(request: web.Request, status: int, start: float) -> None:
    resource = request.match_info.route.resource
    count_request(request.method, resource.canonical if resource is not None else UNMATCHED_ROUTE,
                  status, start)


def count_request(method: str, route: str, status: int, start: float) -> None:
    """Count and time a request by its route's template and the status answered
    (`start`: its `time.perf_counter()` when it arrived)."""
    seconds = time.perf_counter() - start
    method = method if method in _KNOWN_METHODS else "other"
    key = (method, route, status)
    counter = _request_counters.get(key)
    if counter is None:
        counter = _request_counters[key] = HTTP_REQUESTS.labels(method, route, str(status))
    counter.inc()
    histogram = _duration_histograms.get(route)
    if histogram is None:
        histogram = _duration_histograms[route] = HTTP_REQUEST_DURATION.labels(route)
    histogram.observe(seconds)


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """The Matrix error body for what a handler raised (an HTTPException of 400 or more,
    or anything else)."""
    if isinstance(exc, web.HTTPException):
        errcode, message = _STATUS_ERRORS.get(exc.status, (M_UNKNOWN, exc.reason))
        response = error_response(MatrixError(exc.status, errcode, message))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    return error_response(matrix_error_of(exc, request.method, request.path))


def matrix_error_of(exc: Exception, method: str, path: str) -> MatrixError:
    """The Matrix error to answer for what a handler raised (logged unless the caller
    is the one at fault)."""
    if isinstance(exc, MatrixError):
        return exc
    if is_storage_full(exc):
        # Reads go on; writes work again once there is room.
        log.error("cannot store anything, the database's disk is full: %s %s refused",
                  method, path)
        return MatrixError(503, M_UNKNOWN, "The server cannot store anything now: its "
                           "storage is full. Try again later.")
    if is_unreachable(exc):
        # Nothing was acknowledged; the pool connects again once the database answers.
        log.warning("cannot reach the database: %s %s refused: %s", method, path, exc)
        return database_unreachable()
    log.exception("unhandled error serving %s %s", method, path)
    return MatrixError(500, M_UNKNOWN, "Internal server error")


@web.middleware
async def matrix_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a Matrix error body; nothing escapes as HTML or a 500 page;
    and every request is counted and timed (the status counted is the one answered; a
    cancelled request is not counted).  One middleware, not two: each layer costs every
    request a coroutine and a call.

    CORS preflight is answered here, for every path, before routing can refuse it; and
    every answer gets the CORS headers here (JSON answers are made with them).
    """
    start = time.perf_counter()
    response: web.StreamResponse
    if request.method == "OPTIONS":
        response = json_response({})
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect: aiohttp sends it
                exc.headers.update(CORS_HEADERS)
                _count_request(request, exc.status, start)
                raise
            response = _error_response(request, exc)
        except Exception as exc:
            response = _error_response(request, exc)
        else:
            if "Access-Control-Allow-Origin" not in response.headers:
                response.headers.update(CORS_HEADERS)
    _count_request(request, response.status, start)
    return response


def new_app(max_body_bytes: int, allow_query_access_token: bool = True, *,
            body_timeout_s: float = 30.0) -> web.Application:
    """An aiohttp app with kith's error handling, CORS, body limits and HTTP metrics."""
    app = web.Application(middlewares=[matrix_middleware],
                          client_max_size=max_body_bytes)
    app[MAX_BODY_BYTES] = max_body_bytes
    app[BODY_TIMEOUT_S] = body_timeout_s
    app[ALLOW_QUERY_TOKEN] = allow_query_access_token
    return app


SERVICES = web.AppKey("services", Services)


def services_of(request: web.Request) -> Services:
    return request.app[SERVICES]


async def authenticated(request: web.Request, *, consent: bool = True) -> Account:
    """The caller's account (401 without a valid token; 403 until the terms are accepted)."""
    return await authenticate(request.app[SERVICES], access_token(request), consent=consent)


async def authenticate(services: Services, token: str | None, *,
                       consent: bool = True) -> Account:
    accounts = services.accounts
    account = await accounts.authenticate(token)
    if consent:
        accounts.require_consent(account)
    return account


V1_PREFIX = "/_matrix/identity/api/v1/"


def is_v1(request: web.Request) -> bool:
    """A request to the legacy v1 API (Identity Service r0.3.0), which had no auth."""
    return request.path.startswith(V1_PREFIX)


async def caller(request: web.Request) -> Account | None:
    """The authenticated account on v2; None on v1, where endpoints need no token."""
    if is_v1(request):
        return None
    return await authenticated(request)


def client_ip(request: web.Request) -> str | None:
    """The client's IP address, for the rate limits and the validation mail.

    Behind a reverse proxy (`obey_x_forwarded_for`), the right-most address of the last
    X-Forwarded-For header: the one the proxy itself added.  Addresses left of it are
    whatever the client chose to send (Sydent takes the first header as written, which
    a client can fill in; docs/decisions.md).  Without the setting, or without a usable
    header, the address the connection comes from.
    """
    if request.app.get(OBEY_X_FORWARDED_FOR, False):
        forwarded = request.headers.getall("X-Forwarded-For", [])
        if forwarded:
            return forwarded_ip(forwarded[-1]) or request.remote
    return request.remote


def forwarded_ip(last_header: str) -> str | None:
    """The address a reverse proxy added to the last X-Forwarded-For header (None if it
    is empty)."""
    return last_header.rpartition(",")[2].strip() or None


def requester(request: web.Request, account: Account | None = None) -> Requester:
    """Who asks, as the rate limits count it: the client address and the account."""
    return requester_of(client_ip(request), account)


def requester_of(ip: str | None, account: Account | None) -> Requester:
    return Requester(ip=None if ip is None else ip_key(ip),
                     user_id=None if account is None else account.user_id)


class Call:
    """What a plain handler is given of a request, whichever way it reached kith (as an
    aiohttp request, or by the edge's express lane, kith.api.edge)."""

    __slots__ = ("body", "ip", "services", "token")

    def __init__(self, services: Services, token: str | None, ip: str | None,
                 body: bytes) -> None:
        self.services = services
        self.token = token  # the access token it carries, if any
        self.ip = ip  # the client's address (client_ip)
        self.body = body

    def requester(self, account: Account | None = None) -> Requester:
        return requester_of(self.ip, account)


# A plain handler: a route whose answer depends only on the access token, the client's
# address and the JSON body of the request; it returns its 200 answer's JSON body
# (UTF-8) or raises.
PlainHandler = Callable[[Call], Coroutine[Any, Any, bytes]]


class PlainRoute(NamedTuple):
    method: str
    path: str
    handler: PlainHandler


# An app's plain routes, by the bytes of their method and path.
PLAIN_ROUTES = web.AppKey("plain_routes", dict[tuple[bytes, bytes], PlainRoute])


def add_plain_route(app: web.Application, method: str, path: str,
                    handler: PlainHandler) -> None:
    """Route `method` `path` to a plain handler: through aiohttp, and by the express
    lane (kith.api.edge)."""

    async def from_request(request: web.Request) -> web.Response:
        body = await read_body(request)
        call = Call(request.app[SERVICES], access_token(request), client_ip(request), body)
        return encoded_json_response(await handler(call))

    app.router.add_route(method, path, from_request)
    app.setdefault(PLAIN_ROUTES, {})[method.encode(), path.encode()] = PlainRoute(
        method, path, handler)
