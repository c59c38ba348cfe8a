"""The HTTP edge: what happens on a connection before a request reaches a handler.

aiohttp bounds how long an idle keep-alive connection may stay open, but not how long a
client may take to send a request head: a client that sends one header line every few
seconds (slowloris) holds a connection, and a file descriptor, for as long as it likes,
and a few thousand such clients leave no descriptor for anyone else.  So each listener
serves its connections with `EdgeRequestHandler`, which closes a connection whose
request head (request line and headers) is not complete within `header_timeout_s` of
its first byte (of the connection, for the first request).

A request aiohttp's parser refuses (an over-long URL or header, too many headers, bytes
that are not HTTP) is answered here too, as a Matrix JSON error with one log line and no
traceback; aiohttp would answer plain text and log the error with a traceback, and the
exception's message quotes the request itself (an access token in the URL, say).

The express lane: a request to one of an app's plain routes (kith.api.http.add_plain_route:
the lookup and its hash details, the internal bind and unbind) whose request is plain
HTTP/1.1 (see `simple_request`) is answered here, straight from the bytes read, without
aiohttp's parser objects, request, routing, middleware and response; that machinery was
about half of what a single lookup cost.  Every other request, and every request on a
connection whose bytes the lane has lost track of (`_owed`), goes to aiohttp as before.
The lane answers what aiohttp would: the same handler, errors, CORS headers, metrics and
deadlines (docs/decisions.md, "The express lane").

The hook is a RequestHandler subclass, made by a Server subclass that `EdgeAppRunner`
builds in place of aiohttp's; it relies on aiohttp 3.14's RequestHandler internals
(`_waiter`: set while the connection waits for a request; `_request_count`,
`finish_response`, `_request_in_progress`, `_handler_waiter` and the keep-alive timer's
`_keepalive_handle`, `_next_keepalive_close_time`), which tests/api/test_edge.py and
tests/api/test_express.py hold to.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from kith.api.http import (
    BODY_TIMEOUT_S,
    JSON_HEADERS,
    MAX_BODY_BYTES,
    OBEY_X_FORWARDED_FOR,
    PLAIN_ROUTES,
    SERVICES,
    Call,
    PlainRoute,
    bearer_token,
    count_request,
    encode_json,
    forwarded_ip,
    json_response,
    matrix_error_of,
)
from kith.errors import M_TOO_LARGE, M_UNKNOWN, MatrixError

log = logging.getLogger(__name__)

# The parser's limits (aiohttp's defaults): the URL and each header field (name and value)
# at most this many bytes, at most MAX_HEADERS fields.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128

# A request the express lane may take: HTTP/1.1, a method kith serves, a request target
# and header fields of printable ASCII, each field on one line.
_METHODS = rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH)"
_SIMPLE_HEAD = re.compile(
    _METHODS + rb" (/[!-~]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*)\r\n")
# The beginning of such a head, its request line whole.
_SIMPLE_HEAD_BEGUN = re.compile(
    _METHODS + rb" /[!-~]* HTTP/1\.1\r\n(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+(?::[\t -~]*\r?)?|\r)?")
# Fields that ask for more than a body read whole by its length: left to aiohttp.
_NOT_SIMPLE = frozenset((b"transfer-encoding", b"content-encoding", b"expect", b"upgrade",
                         b"connection"))
# A request head not whole within this many bytes is left to aiohttp.
MAX_SIMPLE_HEAD_BYTES = MAX_LINE_BYTES


class SimpleRequest:
    """A plain HTTP/1.1 request's head, as `simple_request` read it."""

    __slots__ = ("body_at", "fields", "method", "path", "total")

    def __init__(self, method: bytes, path: bytes, fields: dict[bytes, bytes],
                 body_at: int, total: int) -> None:
        self.method = method
        self.path = path
        self.fields = fields  # by lower-case name, each present once
        self.body_at = body_at  # where its body begins
        self.total = total  # its length, head and body


INCOMPLETE = "incomplete"


def simple_request(data: bytes) -> SimpleRequest | str | None:
    """The head of the request `data` begins with, if it is one the express lane can
    read exactly as aiohttp would (tests/api/test_express_parsing.py): HTTP/1.1, a
    method kith serves, printable ASCII, a Host field, no field twice, its body's length
    given (or none), and nothing asking for more (chunked or compressed bodies,
    `Expect`, `Upgrade`, `Connection` other than keep-alive).  INCOMPLETE: the beginning
    of such a head, its request line whole; None: anything else."""
    end = data.find(b"\r\n\r\n", 0, MAX_SIMPLE_HEAD_BYTES)
    if end < 0:
        if len(data) < MAX_SIMPLE_HEAD_BYTES and _SIMPLE_HEAD_BEGUN.fullmatch(data):
            return INCOMPLETE
        return None
    head = _SIMPLE_HEAD.match(data, 0, end + 4)
    if head is None:
        return None
    lines = head[3].split(b"\r\n")
    lines.pop()  # after the last line's end
    if len(lines) > MAX_HEADERS:
        return None
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.lower()] = value.strip(b" \t")
    if len(fields) != len(lines) or b"host" not in fields:  # aiohttp refuses no Host
        return None
    if not _NOT_SIMPLE.isdisjoint(fields) and (
            len(_NOT_SIMPLE.intersection(fields)) > 1
            or fields.get(b"connection", b"").lower() != b"keep-alive"):
        return None
    length = fields.get(b"content-length", b"0")
    if not length.isdigit() or len(length) > 15:
        return None
    return SimpleRequest(head[1], head[2], fields, end + 4, end + 4 + int(length))


_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_ANSWER_HEADERS = b"".join(
    b"%s: %s\r\n" % (name.encode(), value.encode())
    for name, value in JSON_HEADERS.items())
_SERVER = SERVER_SOFTWARE.encode()
_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """Now, as a Date header says it (formatted once a second)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date[1]


def _answer(status: int, body: bytes) -> bytes:
    """A JSON answer as aiohttp writes kith's: the same status line and header fields."""
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n\r\n" % (
        status, _REASONS.get(status, b""), _ANSWER_HEADERS, len(body), _http_date(),
        _SERVER) + body


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline for each request head, and the
    express lane."""

    __slots__ = ("_header_timeout_s", "_head_since", "_first_line_bytes",
                 "_first_line_done", "_express", "_remote", "_owed", "_held",
                 "_held_total", "_body_since", "_busy", "_held_limit", "_answered")

    def __init__(self, manager: web.Server, *, header_timeout_s: float,
                 express: ExpressLane | None = None, **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES,
                         max_headers=MAX_HEADERS, **kwargs)
        self._header_timeout_s = header_timeout_s
        # When the request head being read began (the loop's clock); None: none is.
        self._head_since: float | None = None
        # How long the first line of the head being read is (so far): tells a refused
        # request line (414) from a refused header (431).
        self._first_line_bytes = 0
        self._first_line_done = False
        self._express = express
        self._remote: str | None = None
        # Bytes of the request aiohttp is being given that it has yet to get; 0: aiohttp
        # has been given whole requests only; -1: unknown (the lane is off for good).
        self._owed = 0 if express is not None else -1
        # What the lane holds of a request not all arrived, or of what came while it
        # answered one (appended to: a body trickled in is not copied again and again);
        # the whole request's length, once its head is read (else 0).
        self._held = bytearray()
        self._held_total = 0
        # When the lane began waiting for the rest of a body it holds (None: it is not).
        self._body_since: float | None = None
        self._busy = False  # the lane's answer to a request is being worked out
        # Held beyond this while busy, reading stops until the answer is out.
        self._held_limit = MAX_SIMPLE_HEAD_BYTES + (0 if express is None
                                                    else express.max_body_bytes)
        # Requests aiohttp has answered (to compare with `_request_count`, those it has
        # read): when they are equal, it has none in hand.
        self._answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self._remote = str(peername[0]) if isinstance(peername, (list, tuple)) else None
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and data and not self._busy \
                and self._waiting_for_request():
            self._start_head()  # the first bytes of the next request on this connection
        if self._owed >= 0:
            passed = self._express_or_pass(data)
            if passed is None:
                return
            data = passed
        if self._head_since is not None and not self._first_line_done:
            end = data.find(b"\n")
            self._first_line_done = end >= 0
            self._first_line_bytes += end if end >= 0 else len(data)
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._head_since = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_since = self._body_since = None
        self._held.clear()
        self._held_total = 0
        super().connection_lost(exc)

    def close_if_head_overdue(self, now: float) -> None:
        """Close the connection if the request head it is reading began `header_timeout_s`
        or more before `now` (the loop's clock), or if the body the express lane waits
        for has not all come within the body timeout."""
        lane = self._express
        if self._body_since is not None and lane is not None:
            waited_s = now - self._body_since
            if waited_s >= lane.body_timeout_s:
                request = simple_request(bytes(self._held))
                assert isinstance(request, SimpleRequest)
                self._body_since = None
                self._held.clear()
                self._held_total = 0
                self._express_answer(self._express_error(MatrixError(
                    408, M_UNKNOWN, "The request body did not arrive within "
                    f"{lane.body_timeout_s:g} s")), close=True)
                route = lane.routes[request.method, request.path]
                count_request(route.method, route.path, 408, time.perf_counter() - waited_s)
            return
        since = self._head_since
        if since is None or now - since < self._header_timeout_s:
            return
        self._head_since = None
        if self._waiting_for_request() and self.transport is not None:
            log.debug("closing a connection from %s: no complete request head within %g s",
                      self.peername, self._header_timeout_s)
            self.force_close()

    def _waiting_for_request(self) -> bool:
        """No request is being handled or answered: the connection waits for the next."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _start_head(self) -> None:
        self._first_line_bytes, self._first_line_done = 0, False
        self._head_since = self._loop.time()

    # The express lane.

    def _express_or_pass(self, data: bytes) -> bytes | None:
        """Take `data` into the express lane (None), or say what to give aiohttp, keeping
        count of where aiohttp's requests end."""
        if not data:  # aiohttp's own call, to parse what it holds
            return data
        if self._busy:  # after the request being answered: taken once it is
            self._held += data
            if len(self._held) > self._held_limit >= len(self._held) - len(data) \
                    and self.transport is not None:
                self.transport.pause_reading()  # a client that sends on and on
            return None
        if self._owed > 0:  # the rest of a request aiohttp has begun to get
            self._owed = self._owed - len(data) if len(data) <= self._owed else -1
            return data
        if self._held:
            self._held += data
            if len(self._held) < self._held_total:  # more of the body is to come
                return None
            data, self._held_total = bytes(self._held), 0
            self._held.clear()
        request = simple_request(data)
        idle = (self._answered == self._request_count
                and not (self._force_close or self._close))
        if request is INCOMPLETE:
            if idle:
                self._held += data
                return None
            self._owed = -1
            return data
        if not isinstance(request, SimpleRequest) or request.total < len(data):
            self._owed = -1  # or several requests at once: all aiohttp's from here on
            return data
        lane = self._express
        assert lane is not None
        route = lane.routes.get((request.method, request.path))
        if route is None or not idle or request.total - request.body_at > lane.max_body_bytes:
            self._owed = request.total - len(data)
            return data
        if request.total > len(data):  # the rest of the body is to come
            self._held += data
            self._held_total = request.total
            if self._body_since is None:
                self._body_since = self._loop.time()
                self._head_since = None
                self._keep_alive_from_now()
            return None
        self._body_since = self._head_since = None
        self._express_take(route, request, data)
        return None

    def _express_take(self, route: PlainRoute, request: SimpleRequest, data: bytes) -> None:
        start = time.perf_counter()
        lane = self._express
        assert lane is not None
        fields = request.fields
        authorization = fields.get(b"authorization")
        ip = self._remote
        if lane.obey_x_forwarded_for:
            forwarded = fields.get(b"x-forwarded-for")
            if forwarded is not None:
                ip = forwarded_ip(forwarded.decode("ascii")) or ip
        call = Call(lane.services,
                    None if authorization is None else bearer_token(authorization.decode("ascii")),
                    ip, data[request.body_at:])
        lane.taken += 1
        self._busy = self._request_in_progress = True
        self._loop.create_task(self._express_run(route, call, start))

    async def _express_run(self, route: PlainRoute, call: Call, start: float) -> None:
        try:
            try:
                answer, status = _answer(200, await route.handler(call)), 200
            except Exception as exc:  # noqa: BLE001 - answered as the middleware would
                error = matrix_error_of(exc, route.method, route.path)
                answer, status = self._express_error(error), error.status
            self._express_answer(answer)
            count_request(route.method, route.path, status, start)
        finally:
            self._busy = self._request_in_progress = False
            if self._handler_waiter is not None and not self._handler_waiter.done():
                self._handler_waiter.set_result(None)
        if self._held and self.transport is not None and not self.transport.is_closing():
            held = bytes(self._held)
            self._held.clear()
            if len(held) > self._held_limit:
                self.transport.resume_reading()
            self.data_received(held)

    @staticmethod
    def _express_error(error: MatrixError) -> bytes:
        return _answer(error.status, encode_json(error.to_json()))

    def _express_answer(self, answer: bytes, *, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        if close:
            self.force_close()
            transport.close()
        else:
            self._keep_alive_from_now()

    def _keep_alive_from_now(self) -> None:
        """Restart the keep-alive timeout, as aiohttp does after each answer."""
        if self._keepalive_timeout > 0:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(
                    self._next_keepalive_close_time, self._process_keepalive)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:  # written (or failed): aiohttp holds one request fewer
            self._answered += 1

    def _process_keepalive(self) -> None:
        if self._busy:  # aiohttp sees no request, but the lane is answering one
            self._keepalive_handle = None
            self._keep_alive_from_now()
            return
        super()._process_keepalive()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A Matrix error for a request aiohttp could not parse (or a handler failure
        that escaped kith's middleware); the connection is closed after it."""
        error = self._matrix_error(status, exc)
        if error.status >= 500:
            log.error("error serving a request from %s", request.remote, exc_info=exc)
        elif error.errcode == M_TOO_LARGE:
            log.info("refused a request from %s: %s", request.remote, error.message)
        else:
            # What scanners and TLS clients on the plain port send all day; the
            # exception's text is not logged: it quotes the request.
            log.debug("refused a malformed request from %s: %s", request.remote,
                      type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:  # the answer had begun: nothing more to say
            raise ConnectionError("cannot answer an error after the response has begun")
        response = json_response(error.to_json(), error.status)
        response.force_close()
        return response

    def _matrix_error(self, status: int, exc: BaseException | None) -> MatrixError:
        if isinstance(exc, LineTooLong):
            if self._first_line_bytes > MAX_LINE_BYTES:
                return MatrixError(414, M_TOO_LARGE,
                                   f"The request line is longer than {MAX_LINE_BYTES} bytes")
            return MatrixError(431, M_TOO_LARGE,
                               f"A request header is longer than {MAX_LINE_BYTES} bytes")
        if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
            return MatrixError(431, M_TOO_LARGE, f"More than {MAX_HEADERS} request headers")
        if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
            return MatrixError(400, M_UNKNOWN, "Malformed HTTP request")
        if status == 504:
            return MatrixError(504, M_UNKNOWN, "The request took too long")
        return MatrixError(500, M_UNKNOWN, "Internal server error")


class EdgeServer(web.Server):
    """aiohttp's low-level server, serving each connection with EdgeRequestHandler.

    While it has connections, a sweep every `header_timeout_s / 4` (at most every second)
    closes those whose request head is overdue: one timer for all of them, where a timer
    armed and cancelled for each request would cost every request a few microseconds.
    A slow head is so closed between `header_timeout_s` and a quarter (at most a second)
    later.
    """

    def __init__(self, handler: Any, *, header_timeout_s: float,
                 express: ExpressLane | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.express = express
        self._sweep_every_s = min(header_timeout_s / 4, 1.0)
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._sweep_every_s, self._close_slow_heads)
        return EdgeRequestHandler(self, loop=self._loop, header_timeout_s=self.header_timeout_s,
                                  express=self.express, **self._kwargs)

    def _close_slow_heads(self) -> None:
        self._sweep = None
        now = self._loop.time()
        for handler in list(self._connections):
            if isinstance(handler, EdgeRequestHandler):
                handler.close_if_head_overdue(now)
        if self._connections:
            self._sweep = self._loop.call_later(self._sweep_every_s, self._close_slow_heads)

    def pre_shutdown(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        super().pre_shutdown()


class EdgeAppRunner(web.AppRunner):
    """An AppRunner whose connections get a deadline for each request head, and Matrix
    errors for requests aiohttp cannot parse.

    `keepalive_timeout` (an aiohttp runner argument) bounds the idle time between
    requests on a connection; `header_timeout_s` bounds each request head.
    """

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        app = self._app
        return EdgeServer(server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation,
                          header_timeout_s=self._header_timeout_s,
                          express=ExpressLane(app) if PLAIN_ROUTES in app else None,
                          **server._kwargs)


class ExpressLane:
    """An app's plain routes (kith.api.http.add_plain_route) and settings, read once for
    the edge's express lane."""

    def __init__(self, app: web.Application) -> None:
        self.routes = app[PLAIN_ROUTES].copy()
        self.services = app[SERVICES]
        self.max_body_bytes = app[MAX_BODY_BYTES]
        self.body_timeout_s = app[BODY_TIMEOUT_S]
        self.obey_x_forwarded_for = app.get(OBEY_X_FORWARDED_FOR, False)
        self.taken = 0  # requests the lane has taken

