"""The express lane reads a request head exactly as aiohttp's parser does, or not at all:
for heads generated near the edge of what it accepts, whatever `simple_request` reads is
what aiohttp reads from the same bytes (method, target, fields, body length), so the
lane never answers a request aiohttp would have refused or read otherwise, and the bytes
it counts for aiohttp end where aiohttp's requests end."""

from __future__ import annotations

import asyncio
import string

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kith.api.edge import INCOMPLETE, MAX_HEADERS, MAX_LINE_BYTES, SimpleRequest, simple_request

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VCHAR = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"


def mostly(usual: st.SearchStrategy[bytes],
           odd: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`usual` seven times in eight, else `odd`: requests mostly near what the lane takes."""
    return st.integers(0, 7).flatmap(lambda i: odd if i == 0 else usual)


NAMES = mostly(
    st.one_of(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH",
                               b"Transfer-Encoding", b"Connection", b"Expect",
                               b"Content-Encoding", b"Upgrade", b"Host", b"Authorization",
                               b"X-Forwarded-For"]),
              st.text(alphabet=TCHAR, min_size=1, max_size=10).map(str.encode)),
    st.binary(max_size=6))
VALUES = mostly(
    st.one_of(st.sampled_from([b"chunked", b"keep-alive", b"Keep-Alive", b"close", b"upgrade",
                               b"0", b"2", b"5", b" 2", b"2 ", b"+2", b"02", b"-1", b"2,2",
                               b"2 2", b"0x2", b"99999999999999999999", b"100-continue",
                               b"gzip", b"Bearer abc"]),
              st.text(alphabet=VCHAR, max_size=12).map(str.encode)),
    st.one_of(st.sampled_from([b"\xc3\xa9", b"a\x00b", b"a\x7fb", b"a\rb", b"a\nb"]),
              st.binary(max_size=12)))
SEPARATORS = mostly(st.sampled_from([b": ", b":", b":\t", b":  "]),
                    st.sampled_from([b" :", b" : ", b"\t:", b""]))
LINE_ENDS = mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
METHODS = mostly(st.sampled_from([b"POST", b"GET", b"PUT"]),
                 st.one_of(st.sampled_from([b"post", b"P0ST", b"PRI", b"POST "]),
                           st.binary(max_size=5)))
TARGETS = mostly(
    st.one_of(st.sampled_from([b"/_matrix/identity/v2/lookup", b"/a", b"/a?b=c", b"//a",
                               b"/a#b", b"/%zz"]),
              st.text(alphabet=VCHAR.replace(" ", "").replace("\t", ""), max_size=10)
              .map(lambda tail: b"/" + tail.encode())),
    st.one_of(st.sampled_from([b"*", b"/a b", b"http://x/a", b"a"]),
              st.binary(max_size=8).map(lambda tail: b"/" + tail)))
VERSIONS = mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/1.2", b"http/1.1",
                                                        b"HTTP/11", b"HTTP/2.0"]))
HOSTS = mostly(st.sampled_from([b"kith.test", b"127.0.0.1:8090", b"[::1]:8090"]),
               st.sampled_from([b"", b"a b", b"x:y:z", b"\xc3\xa9"]))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    head = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS) + draw(LINE_ENDS)
    fields = [draw(NAMES) + draw(SEPARATORS) + draw(VALUES) + draw(LINE_ENDS)
              for _ in range(draw(st.integers(0, 4)))]
    if draw(st.integers(0, 7)):
        fields.insert(draw(st.integers(0, len(fields))), b"Host: " + draw(HOSTS) + b"\r\n")
    if draw(st.integers(0, 3)):
        fields.append(b"Content-Length: %d\r\n" % draw(st.integers(0, 6)))
    return head + b"".join(fields) + draw(LINE_ENDS) + draw(st.binary(max_size=8))


def aiohttp_reads(data: bytes) -> tuple[object, list[tuple[bytes, bytes]], int] | None:
    """What aiohttp's request parser (as kith's server uses it) reads from `data`:
    (the message, its raw fields, its body's length), or None if it refuses it, or reads
    anything but exactly one whole request."""

    async def parse() -> tuple[object, list[tuple[bytes, bytes]], int] | None:
        loop = asyncio.get_running_loop()
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16,
                                   max_line_size=MAX_LINE_BYTES,
                                   max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS)
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except Exception:  # noqa: BLE001 - any refusal
            return None
        if len(messages) != 1 or upgraded or tail:
            return None
        message, payload = messages[0]
        if not payload.is_eof():
            return None
        return message, list(message.raw_headers), payload.total_bytes

    return asyncio.run(parse())


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests())
@example(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
@example(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
@example(b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
def test_what_the_lane_reads_aiohttp_reads_alike(data: bytes) -> None:
    request = simple_request(data)
    if request is None:
        return
    if request is INCOMPLETE:
        assert b"\r\n\r\n" not in data[:MAX_LINE_BYTES]
        return
    assert isinstance(request, SimpleRequest)
    whole = data[:request.total]
    if len(whole) < request.total:  # its body has not all come: read the head alone
        return
    read = aiohttp_reads(whole)
    assert read is not None, f"aiohttp refuses what the lane reads: {whole!r}"
    message, raw_fields, body_length = read
    assert message.method.encode() == request.method  # type: ignore[attr-defined]
    assert message.path.encode() == request.path  # type: ignore[attr-defined]
    assert tuple(message.version) == (1, 1)  # type: ignore[attr-defined]
    assert not message.should_close  # type: ignore[attr-defined]
    assert not message.chunked and message.compression is None  # type: ignore[attr-defined]
    assert {name.lower(): value for name, value in raw_fields} == request.fields
    assert body_length == request.total - request.body_at

