"""The replication listener: `POST /_matrix/identity/replicate/v1/push` over mutual TLS,
and nothing else (the client port does not serve it either).

As Sydent: TLS asks every client for a certificate and refuses the handshake unless the
replication CA (`replication.https.cacert`, else the system CAs) issued it; the pushing
peer is then the one named by the certificate's common name (403 M_UNKNOWN_PEER for any
other name).  The body must be JSON sent as application/json.  One certificate serves
both ends, so it must allow client as well as server authentication.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import msgspec
from aiohttp import web

from kith.api.http import decode_json, json_response, new_app, read_body
from kith.config import ConfigError, HttpConfig
from kith.errors import M_NOT_JSON, MatrixError
from kith.metrics import REPLICATION_REFUSED
from kith.replication.peers import PUSH_PATH, Peer, ReplicationPeers
from kith.replication.receiver import ReplicationReceiver
from kith.tls import describe_problem

log = logging.getLogger(__name__)

M_UNKNOWN_PEER = "M_UNKNOWN_PEER"
# 100 associations (a push from Sydent or kith) take some 40 KB; Sydent's bodies are
# bounded at 512 KiB elsewhere.
MAX_PUSH_BYTES = 1024 * 1024

PEERS = web.AppKey("replication_peers", ReplicationPeers)
RECEIVER = web.AppKey("replication_receiver", ReplicationReceiver)


class PushBody(msgspec.Struct):
    sgAssocs: dict[str, Any]  # noqa: N815 - Sydent's name on the wire


def tls_contexts(http: HttpConfig) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the listener's, the pusher's) TLS contexts; ConfigError if the files will not do."""
    try:
        return server_context(http), client_context(http)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("[http] replication.https.certfile / cacert: "
                          f"{describe_problem(exc)}") from None


def server_context(http: HttpConfig) -> ssl.SSLContext:
    """The listener's TLS: our certificate; peers must present one the CA issued."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                         cafile=http.replication_cacert or None)
    context.load_cert_chain(http.replication_certfile)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(http: HttpConfig) -> ssl.SSLContext:
    """The pusher's TLS: the peer's certificate and host checked; ours presented."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=http.replication_cacert or None)
    context.load_cert_chain(http.replication_certfile)
    return context


def certificate_name(peercert: Any) -> str | None:
    """The (first) common name of a verified certificate as `ssl` describes it."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                return str(value)
    return None


def pushing_peer(request: web.Request) -> Peer:
    name = certificate_name(request.transport.get_extra_info("peercert")
                            if request.transport is not None else None)
    peer = request.app[PEERS].get(name) if name is not None else None
    if peer is None:
        log.warning("replication: refused a push from %s: its certificate names %r, which "
                    "is not a configured peer", request.remote, name)
        raise MatrixError(403, M_UNKNOWN_PEER, "This peer is not known to this server")
    return peer


async def push(request: web.Request) -> web.Response:
    try:
        peer = pushing_peer(request)
        if request.content_type != "application/json":
            raise MatrixError(400, M_NOT_JSON, "This endpoint expects JSON")
        body = decode_json(await read_body(request), PushBody)
        await request.app[RECEIVER].receive(peer, body.sgAssocs)
    except MatrixError as exc:
        REPLICATION_REFUSED.labels(exc.errcode).inc()
        raise
    return json_response({"success": True})


def replication_app(peers: ReplicationPeers, receiver: ReplicationReceiver) -> web.Application:
    app = new_app(MAX_PUSH_BYTES)
    app[PEERS] = peers
    app[RECEIVER] = receiver
    app.router.add_post("/" + PUSH_PATH, push)
    return app
