"""The edge's express lane (kith/api/edge.py): plain POSTs to the lookup and the internal
bind are answered from the bytes read, byte for byte as aiohttp answers them, and every
request the lane cannot read exactly is left to aiohttp."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from kith.api.edge import (
    INCOMPLETE,
    EdgeRequestHandler,
    EdgeServer,
    ExpressLane,
    SimpleRequest,
    simple_request,
)
from kith.metrics import HTTP_REQUESTS
from kith.threepid import lookup_hash
from tests.api.test_edge import MARGIN_S, wait_closed
from tests.conftest import KithFactory, RunningKith

LOOKUP = "/_matrix/identity/v2/lookup"
BIND = "/_matrix/identity/internal/bind"
# Not a head the lane reads (a field twice): such a request goes to aiohttp.
TO_AIOHTTP = b"X-Twice: 1\r\nX-Twice: 2\r\n"


@pytest.fixture
async def kith(kith_factory: KithFactory) -> RunningKith:
    return await kith_factory(  # type: ignore[no-any-return]
        {"http": {"client.header_timeout": 1, "client.keepalive_timeout": 3,
                  "client.body_timeout": 1, "client.max_body_bytes": 4096}})


def edge(kith: RunningKith, path: str = LOOKUP, method: str = "POST") -> EdgeServer:
    """The listener whose express lane serves `method` `path`."""
    for runner in kith.server.runners:
        server = runner.server
        if isinstance(server, EdgeServer) and server.express is not None \
                and (method.encode(), path.encode()) in server.express.routes:
            return server
    raise AssertionError(f"no express lane serves {method} {path}")


def lane(kith: RunningKith, path: str = LOOKUP, method: str = "POST") -> ExpressLane:
    lane = edge(kith, path, method).express
    assert lane is not None
    return lane


def post(path: str, body: bytes, *, token: str | None = None, extra: bytes = b"",
         method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: kith.test\r\nContent-Type: application/json\r\n"
            .encode()
            + (b"" if token is None else f"Authorization: Bearer {token}\r\n".encode())
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def read_raw(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One response: (status line, header fields by lower-case name, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        assert name.lower() not in fields, head
        fields[name.lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 5)
    return status, fields, body


async def exchange(port: int, *parts: bytes, answers: int = 1,
                   pause_s: float = 0.0) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Send `parts` on one new connection (`pause_s` apart), read `answers` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        return [await read_raw(reader) for _ in range(answers)]
    finally:
        writer.close()


async def both_lanes(kith: RunningKith, port: int, path: str, body: bytes,
                     token: str | None, method: str = "POST") -> tuple[Any, Any]:
    """The answer to one request by the express lane, and by aiohttp (checked to be)."""
    served = lane(kith, path, method)
    before = served.taken
    (express,) = await exchange(port, post(path, body, token=token, method=method))
    assert served.taken == before + 1
    (aiohttp,) = await exchange(port, post(path, body, token=token, extra=TO_AIOHTTP,
                                           method=method))
    assert served.taken == before + 1
    for answer in (express, aiohttp):
        del answer[1]["date"]
    return express, aiohttp


async def test_lookups_are_answered_as_aiohttp_answers_them(kith: RunningKith) -> None:
    token = await kith.register()
    await kith.server.services.bindings.bind(  # type: ignore[union-attr]
        "email", "alice@example.org", "@alice:hs.test")
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    found = lookup_hash("email", "alice@example.org", pepper)

    def lookup(**fields: Any) -> bytes:
        return json.dumps({"algorithm": "sha256", "pepper": pepper, **fields}).encode()

    cases: list[tuple[bytes, str | None, int]] = [
        (lookup(addresses=[found, "x" * 43]), token, 200),
        (lookup(addresses=[]), token, 200),
        (lookup(addresses=[found]), None, 401),
        (lookup(addresses=[found]), "not-a-token", 401),
        (b"{not json", token, 400),
        (b"\xff\xfe{}", token, 400),
        (b"[1, 2]", token, 400),
        (json.dumps({"algorithm": "sha256", "pepper": pepper}).encode(), token, 400),
        (lookup(addresses="nope"), token, 400),
        (lookup(addresses=[1, 2]), token, 400),
        (b'{"addresses":' + b"[" * 1000 + b"]" * 1000 + b"}", token, 400),
        (lookup(addresses=[found], algorithm="md5"), token, 400),
        (json.dumps({"algorithm": "sha256", "pepper": "wrong", "addresses": [found]})
         .encode(), token, 400),
    ]
    for body, with_token, status in cases:
        express, aiohttp = await both_lanes(kith, kith.config.http.client_port, LOOKUP,
                                            body, with_token)
        assert express == aiohttp, body[:80]
        assert express[0] == b"HTTP/1.1 %d %s" % (status, express[0].split(b" ", 2)[2])
        assert express[1]["content-type"] == "application/json"
        assert express[1]["access-control-allow-origin"] == "*"
    answer = json.loads((await both_lanes(kith, kith.config.http.client_port, LOOKUP,
                                          lookup(addresses=[found]), token))[0][2])
    assert answer == {"mappings": {found: "@alice:hs.test"}}
    # a body over the limit is aiohttp's to refuse, before it is read
    served = lane(kith)
    before = served.taken
    (too_large,) = await exchange(kith.config.http.client_port,
                                  post(LOOKUP, lookup(addresses=["x" * 43] * 100), token=token))
    assert too_large[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(too_large[2])["errcode"] == "M_TOO_LARGE"
    assert served.taken == before


async def test_hash_details_are_answered_as_aiohttp_answers_them(kith: RunningKith) -> None:
    token = await kith.register()
    port = kith.config.http.client_port
    details = "/_matrix/identity/v2/hash_details"
    for with_token, status in ((token, 200), (None, 401), ("not-a-token", 401)):
        express, aiohttp = await both_lanes(kith, port, details, b"", with_token, "GET")
        assert express == aiohttp
        assert express[0].startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(express[2])["errcode"] == "M_UNAUTHORIZED"
    (answer,) = await exchange(port, post(details, b"", token=token, method="GET"))
    assert json.loads(answer[2]) == {
        "algorithms": ["sha256", "none"],
        "lookup_pepper": kith.server.services.lookup.pepper}  # type: ignore[union-attr]
    # HEAD is not served there, whichever way it comes (aiohttp answers it)
    served = lane(kith, details, "GET")
    before = served.taken
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(post(details, b"", token=token, method="HEAD"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert served.taken == before


async def test_internal_binds_are_answered_as_aiohttp_answers_them(kith: RunningKith) -> None:
    port = kith.config.http.internal_port
    assert port is not None
    for body in (b'{"medium": "email", "address": "bob@example.org"}', b"{", b"[]",
                 b'{"medium": "carrier-pigeon", "address": "x", "mxid": "@b:hs.test"}'):
        express, aiohttp = await both_lanes(kith, port, BIND, body, None)
        assert express == aiohttp, body
        assert express[0].startswith(b"HTTP/1.1 400 ")
    # A bind answers a new signature each time: compare what is not the signature.
    bind = b'{"medium": "email", "address": "bob@example.org", "mxid": "@bob:hs.test"}'
    express, aiohttp = await both_lanes(kith, port, BIND, bind, None)
    assert (express[0], express[1]) == (aiohttp[0], aiohttp[1])
    signed = [json.loads(answer[2]) for answer in (express, aiohttp)]
    for association in signed:
        assert (association["address"], association["mxid"]) == ("bob@example.org",
                                                                 "@bob:hs.test")
        del association["signatures"], association["ts"], association["not_before"], \
            association["not_after"]
    assert signed[0] == signed[1]


async def test_a_request_in_pieces_is_taken_when_whole(kith: RunningKith) -> None:
    token = await kith.register()
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    request = post(LOOKUP, json.dumps({"algorithm": "sha256", "pepper": pepper,
                                       "addresses": ["a" * 43]}).encode(), token=token)
    served = lane(kith)
    before = served.taken
    head_end = request.index(b"\r\n\r\n") + 4
    line_end = request.index(b"\r\n") + 2
    # the head in two pieces (the request line whole in the first), then the body in two
    answers = await exchange(kith.config.http.client_port, request[:line_end + 6],
                             request[line_end + 6:head_end],
                             request[head_end:head_end + 5], request[head_end + 5:],
                             pause_s=0.1)
    assert answers[0][0] == b"HTTP/1.1 200 OK"
    assert json.loads(answers[0][2]) == {"mappings": {}}
    assert served.taken == before + 1


async def test_a_body_trickled_in_byte_by_byte_is_taken_whole(kith: RunningKith) -> None:
    token = await kith.register()
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    request = post(LOOKUP, json.dumps({"algorithm": "sha256", "pepper": pepper,
                                       "addresses": ["b" * 43] * 20}).encode(), token=token)
    head_end = request.index(b"\r\n\r\n") + 4
    served = lane(kith)
    before = served.taken
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        writer.write(request[:head_end])
        for i in range(head_end, len(request)):
            writer.write(request[i:i + 1])
            await writer.drain()
        (status, _, body) = await read_raw(reader)
    finally:
        writer.close()
    assert (status, json.loads(body)) == (b"HTTP/1.1 200 OK", {"mappings": {}})
    assert served.taken == before + 1


async def test_a_body_the_lane_waits_for_in_vain_gets_408(kith: RunningKith) -> None:
    request = post(LOOKUP, b'{"algorithm": "sha256", "pepper": "p", "addresses": []}',
                   token="t")
    timed_out = HTTP_REQUESTS.labels("POST", LOOKUP, "408")
    counted = timed_out._value.get()
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        writer.write(request[:-10])
        started = time.monotonic()
        status, fields, body = await read_raw(reader)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert json.loads(body)["errcode"] == "M_UNKNOWN"
        assert fields["access-control-allow-origin"] == "*"
        assert 0.8 < time.monotonic() - started < 1 + MARGIN_S
        assert await wait_closed(reader, MARGIN_S) < MARGIN_S
    finally:
        writer.close()
    assert timed_out._value.get() == counted + 1


async def test_a_head_the_lane_waits_for_in_vain_is_cut_off(kith: RunningKith) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        writer.write(b"POST /_matrix/identity/v2/lookup HTTP/1.1\r\nHost: kith.test\r\n")
        assert 0.8 < await wait_closed(reader, 1 + MARGIN_S)
    finally:
        writer.close()


async def test_an_idle_connection_after_an_express_answer_is_closed(kith: RunningKith) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        served = lane(kith)
        before = served.taken
        writer.write(post(LOOKUP, b"{}"))
        assert (await read_raw(reader))[0].startswith(b"HTTP/1.1 401 ")
        assert served.taken == before + 1
        assert 2.5 < await wait_closed(reader, 3 + MARGIN_S)
    finally:
        writer.close()


async def test_requests_the_lane_leaves_keep_their_order(kith: RunningKith) -> None:
    token = await kith.register()
    served = lane(kith)
    status = b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: kith.test\r\n\r\n"
    lookup = post(LOOKUP, b'{"algorithm": "none", "pepper": "", "addresses": []}',
                  token=token)
    port = kith.config.http.client_port
    # a GET, then a lookup, on one connection: aiohttp, then the lane
    before = served.taken
    answers = await exchange(port, status, lookup, answers=2, pause_s=0.05)
    assert [answer[0] for answer in answers] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert served.taken == before + 1
    # three requests at once (pipelined): aiohttp answers them all, in order
    answers = await exchange(port, lookup + status + lookup, answers=3)
    assert [answer[0][:12] for answer in answers] == [b"HTTP/1.1 400", b"HTTP/1.1 200",
                                                      b"HTTP/1.1 400"]
    assert json.loads(answers[1][2]) == {}
    assert served.taken == before + 1
    # a request aiohttp took before its body was all there: once it is answered, the
    # connection's next request, whole, is the lane's again
    register = post("/_matrix/identity/v2/account/register", b'{"token_type": "Bearer"}')
    head_end = register.index(b"\r\n\r\n") + 4
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in (register[:head_end], register[head_end:]):
            writer.write(part)
            await asyncio.sleep(0.05)
        assert (await read_raw(reader))[0] == b"HTTP/1.1 400 Bad Request"
        writer.write(lookup)
        assert (await read_raw(reader))[0] == b"HTTP/1.1 400 Bad Request"
    finally:
        writer.close()
    assert served.taken == before + 2


async def test_a_lookup_that_waits_is_finished_and_what_follows_it_too(
        kith: RunningKith) -> None:
    token = await kith.register()
    accounts = kith.server.services.accounts  # type: ignore[union-attr]
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    lookup = post(LOOKUP, json.dumps({"algorithm": "sha256", "pepper": pepper,
                                      "addresses": []}).encode(), token=token)
    served = lane(kith)
    for _ in range(3):
        accounts._tokens.clear()  # the token is read from the store: the handler waits
        before = served.taken
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                       kith.config.http.client_port)
        try:
            writer.write(lookup)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(lookup)  # sent while the first may still be worked out
            answers = [await read_raw(reader) for _ in range(2)]
        finally:
            writer.close()
        assert [(answer[0], json.loads(answer[2])) for answer in answers] == \
            [(b"HTTP/1.1 200 OK", {"mappings": {}})] * 2
        assert served.taken >= before + 1


async def test_what_is_sent_during_a_waiting_lookup_is_read_after_it(
        kith: RunningKith, monkeypatch: pytest.MonkeyPatch) -> None:
    token = await kith.register()
    accounts = kith.server.services.accounts  # type: ignore[union-attr]
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    lookup = post(LOOKUP, json.dumps({"algorithm": "sha256", "pepper": pepper,
                                      "addresses": []}).encode(), token=token)
    # The token is read from the store, which answers only when the test says so.
    accounts._tokens.clear()
    release = asyncio.Event()
    store = accounts._store.accounts
    by_token_hash = store.by_token_hash

    async def held_back(token_hash: str) -> Any:
        await release.wait()
        return await by_token_hash(token_hash)

    monkeypatch.setattr(store, "by_token_hash", held_back)
    served = lane(kith)
    before = served.taken
    reader, writer = await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)
    try:
        writer.write(lookup)
        await writer.drain()
        deadline = time.monotonic() + 5
        while served.taken == before:
            assert time.monotonic() < deadline, "the lane did not take the lookup"
            await asyncio.sleep(0.01)
        writer.write(b"junk " * 20_000)  # more than the lane holds: it stops reading
        (handler,) = [handler for handler in edge(kith)._connections
                      if isinstance(handler, EdgeRequestHandler) and handler._busy]
        while not (handler.transport is not None and not handler.transport.is_reading()):
            assert time.monotonic() < deadline, "reading did not stop"
            await asyncio.sleep(0.01)
        assert len(handler._held) > handler._held_limit
        release.set()
        status, _, body = await read_raw(reader)
        assert (status, json.loads(body)) == (b"HTTP/1.1 200 OK", {"mappings": {}})
        status, _, body = await read_raw(reader)  # then aiohttp refuses the junk
        assert (status, json.loads(body)["error"]) == (b"HTTP/1.0 400 Bad Request",
                                                       "Malformed HTTP request")
    finally:
        writer.close()


async def test_an_unexpected_failure_is_a_matrix_500(kith: RunningKith,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    token = await kith.register()
    lookup_service = kith.server.services.lookup  # type: ignore[union-attr]

    async def broken(*args: Any) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(lookup_service, "lookup_json", broken)
    express, aiohttp = await both_lanes(kith, kith.config.http.client_port, LOOKUP,
                                        b'{"algorithm": "sha256", "pepper": "p", '
                                        b'"addresses": []}', token)
    assert express == aiohttp
    assert express[0] == b"HTTP/1.1 500 Internal Server Error"
    assert json.loads(express[2]) == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()] \
        == [f"unhandled error serving POST {LOOKUP}"] * 2


async def test_the_lane_counts_its_requests_in_the_metrics(kith: RunningKith) -> None:
    counter = HTTP_REQUESTS.labels("POST", LOOKUP, "401")
    before = counter._value.get()
    served = lane(kith)
    taken = served.taken
    await exchange(kith.config.http.client_port, post(LOOKUP, b"{}"))
    assert served.taken == taken + 1
    assert counter._value.get() == before + 1


@pytest.mark.parametrize(("data", "expected"), [
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", (b"POST", b"/a", 2)),
    (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", (b"GET", b"/a", 0)),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{}", (b"POST", b"/a", 5)),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n"
     b"\r\n",
     (b"POST", b"/a", 0)),
    (b"POST /a HTTP/1.1\r\nHost:   x  \r\n\r\n", (b"POST", b"/a", 0)),
    (b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None),  # no Host: aiohttp refuses
    (b"PRI /a HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n", INCOMPLETE),
    (b"POST /a HTTP/1.1\r\nHo", INCOMPLETE),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n\r", INCOMPLETE),
    (b"POST /a HTTP/1.1\r\n", INCOMPLETE),
    (b"POST /a HTT", None),  # the request line not whole: aiohttp's
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", None),
    (b"POST /a HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", None),
    (b"post /a HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"POST a HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"POST /a b HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
     None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-length: 2\r\nCONTENT-LENGTH: 2\r\n\r\n{}",
     None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -2\r\n\r\n{}", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2 2\r\n\r\n{}", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{}", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 16 + b"\r\n\r\n{}", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
     None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
     None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
     None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nUpgrade: h2c\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost : x\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\x00\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 129 + b"\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"v" * 9000 + b"\r\n\r\n", None),
    (b"POST /a HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"v" * 9000, None),
])
def test_simple_request_reads_only_plain_heads(data: bytes, expected: Any) -> None:
    got = simple_request(data)
    if isinstance(expected, tuple):
        assert isinstance(got, SimpleRequest), got
        assert (got.method, got.path, got.total - got.body_at) == expected
        assert data[:got.body_at].endswith(b"\r\n\r\n")
    else:
        assert got is expected
