"""The HTTP edge: what happens on a connection before a request reaches a handler.

aiohttp bounds how long an idle keep-alive connection may stay open, but not how long a
client may take to send a request head: a client that sends one header line every few
seconds (slowloris) holds a connection, and a file descriptor, for as long as it likes,
and a few thousand such clients leave no descriptor for anyone else.  So each listener
serves its connections with `EdgeRequestHandler`, which closes a connection whose
request head (request line and headers) is not complete within `header_timeout_s` of
its first byte (of the connection, for the first request).

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
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline for each request head."""

    __slots__ = ("_header_timeout_s", "_head_deadline")

    def __init__(self, manager: web.Server, *, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and data and self._waiting_for_request():
            self._start_head()  # the first bytes of the next request on this connection
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._stop_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """No request is being handled or answered: the connection waits for the next."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _start_head(self) -> None:
        self._stop_head_deadline()
        self._head_deadline = self._loop.call_later(self._header_timeout_s,
                                                    self._head_too_slow)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._waiting_for_request() and self.transport is not None:
            log.debug("closing a connection from %s: no complete request head within %g s",
                      self.peername, self._header_timeout_s)
            self.force_close()


class EdgeServer(web.Server):
    """aiohttp's low-level server, serving each connection with EdgeRequestHandler."""

    def __init__(self, handler: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop,
                                  header_timeout_s=self.header_timeout_s, **self._kwargs)


class EdgeAppRunner(web.AppRunner):
    """An AppRunner whose connections get a deadline for each request head.

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

