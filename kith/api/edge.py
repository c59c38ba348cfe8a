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

The hook is a RequestHandler subclass, made by a Server subclass that `EdgeAppRunner`
builds in place of aiohttp's; it relies on aiohttp 3.14's RequestHandler internals
(`_waiter`: set while the connection waits for a request; `_request_count`), which
tests/api/test_edge.py holds to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from kith.api.http import json_response
from kith.errors import M_TOO_LARGE, M_UNKNOWN, MatrixError

log = logging.getLogger(__name__)

# The parser's limits (aiohttp's defaults): the URL and each header field (name and value)
# at most this many bytes, at most MAX_HEADERS fields.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline for each request head."""

    __slots__ = ("_header_timeout_s", "_head_since", "_first_line_bytes",
                 "_first_line_done")

    def __init__(self, manager: web.Server, *, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES,
                         max_headers=MAX_HEADERS, **kwargs)
        self._header_timeout_s = header_timeout_s
        # When the request head being read began (the loop's clock); None: none is.
        self._head_since: float | None = None
        # How long the first line of the head being read is (so far): tells a refused
        # request line (414) from a refused header (431).
        self._first_line_bytes = 0
        self._first_line_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and data and self._waiting_for_request():
            self._start_head()  # the first bytes of the next request on this connection
        if self._head_since is not None and not self._first_line_done:
            end = data.find(b"\n")
            self._first_line_done = end >= 0
            self._first_line_bytes += end if end >= 0 else len(data)
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._head_since = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_since = None
        super().connection_lost(exc)

    def close_if_head_overdue(self, now: float) -> None:
        """Close the connection if the request head it is reading began `header_timeout_s`
        or more before `now` (the loop's clock)."""
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

    def __init__(self, handler: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._sweep_every_s = min(header_timeout_s / 4, 1.0)
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._sweep_every_s, self._close_slow_heads)
        return EdgeRequestHandler(self, loop=self._loop,
                                  header_timeout_s=self.header_timeout_s, **self._kwargs)

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
        return EdgeServer(server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation,
                          header_timeout_s=self._header_timeout_s, **server._kwargs)

