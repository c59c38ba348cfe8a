"""The HTTP edge (kith/api/edge.py): slow request heads are cut off, idle connections
are bounded, and requests aiohttp cannot parse get a Matrix error and one log line."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kith.config import load_config
from tests.conftest import KithFactory, KithProcessFactory, RunningKith, write_config

STATUS = "/_matrix/identity/v2"
SLOW_CLIENTS = 2000
ACCEPT_BATCH = 200
HEADER_TIMEOUT_S = 5.0
# What a loaded 2-core machine may add to a deadline.
MARGIN_S = 3.0
PARTIAL_HEAD = b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: kith.test\r\n"


@contextlib.contextmanager
def open_files_soft_limit(needed: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE raised to `needed` (skip if the hard limit is
    lower), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def accepted(pid: int, port: int, clients: dict[socket.socket, float]) -> int:
    """How many of `clients`' connections to `port` the process `pid` has accepted (holds
    a file descriptor for), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    client_ports = {sock.getsockname()[1] for sock in clients}
    count = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            count += (local_port == port and remote_port in client_ports
                      and int(fields[9]) in inodes)
    return count


def status_check(port: int) -> tuple[int, float]:
    """GET the status endpoint on a fresh connection: (status, seconds taken)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", STATUS)
        return conn.getresponse().status, time.monotonic() - started
    finally:
        conn.close()


def closed_at(sockets: dict[socket.socket, float], deadline_s: float) -> dict[socket.socket, float]:
    """When each socket was closed by its peer (EOF or reset), waiting until `deadline_s`
    (monotonic) at most; a socket still open is left out."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        while len(closed) < len(sockets) and time.monotonic() < deadline_s:
            for key, _ in selector.select(timeout=0.2):
                peer_closed: socket.socket = key.data
                try:
                    data = peer_closed.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"a slow client was answered: {data[:200]!r}"
                closed[peer_closed] = time.monotonic()
                selector.unregister(peer_closed)
    return closed


def test_slow_request_heads_cannot_starve_kith(tmp_path: Path,
                                               kith_process: KithProcessFactory) -> None:
    """2000 clients that never finish their headers, against a kith started with the
    soft file limit systemd gives by default: kith raises it, keeps answering others, and
    closes each slow connection once its header timeout has passed."""
    path = write_config(tmp_path, {"http": {"client.header_timeout": HEADER_TIMEOUT_S}})
    port = load_config(str(path), env={}).http.client_port
    slow: dict[socket.socket, float] = {}
    with open_files_soft_limit(SLOW_CLIENTS + 500):
        proc = kith_process(path)
        proc.start(port, open_files_soft_limit=1024)
        assert proc.proc is not None
        pid = proc.proc.pid
        try:
            while len(slow) < SLOW_CLIENTS:
                # in batches kith accepts before the next: a burst past the listen
                # backlog would have its handshakes retried a second later
                for _ in range(ACCEPT_BATCH):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    sock.sendall(PARTIAL_HEAD)
                    slow[sock] = time.monotonic()
                wait_until(f"kith to accept {len(slow)} connections",
                           lambda: accepted(pid, port, slow) == len(slow))
            opened_s = time.monotonic() - min(slow.values())
            assert opened_s < HEADER_TIMEOUT_S, f"opening took {opened_s:.1f} s"
            status, took_s = status_check(port)
            assert status == 200 and took_s < 2.0, (status, took_s)
            # kith holds every slow connection at once, past the soft limit it was given
            assert accepted(pid, port, slow) == SLOW_CLIENTS
            closed = closed_at(slow, max(slow.values()) + HEADER_TIMEOUT_S + MARGIN_S)
            assert len(closed) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(closed)} still open"
            waited = [closed[sock] - opened for sock, opened in slow.items()]
            assert HEADER_TIMEOUT_S - 0.2 <= min(waited), min(waited)
            assert max(waited) <= HEADER_TIMEOUT_S + MARGIN_S, max(waited)
            assert status_check(port)[0] == 200
        finally:
            for sock in slow:
                sock.close()
    log = (tmp_path / "kith.log").read_text()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert f"open file limit raised from 1024 to {hard}" in log, log


# ------------------------------------------------------------------ in-process kith


@pytest.fixture
async def edge_kith(kith_factory: KithFactory) -> RunningKith:
    return await kith_factory(  # type: ignore[no-any-return]
        {"http": {"client.header_timeout": 1, "client.keepalive_timeout": 3,
                  "client.body_timeout": 1}})


async def connect(kith: RunningKith) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", kith.config.http.client_port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response with a Content-Length: (status, headers, JSON body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, json.loads(body)


async def wait_closed(reader: asyncio.StreamReader, within_s: float) -> float:
    """Seconds until the server closes the connection (EOF or reset)."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(4096), within_s)
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - started


async def test_each_request_head_on_a_keepalive_connection_has_a_deadline(
        edge_kith: RunningKith) -> None:
    reader, writer = await connect(edge_kith)
    try:
        # a head trickled in, but complete within the timeout, is served
        for part in (b"GET /_matrix/identity/v2 HTTP/1.1\r\n", b"Host: kith.test\r\n", b"\r\n"):
            writer.write(part)
            await asyncio.sleep(0.3)
        assert (await read_response(reader))[0] == 200
        # idle between requests is bounded by the keep-alive timeout, not the header one
        await asyncio.sleep(1.5)
        writer.write(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: kith.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        # the second head of this connection gets its own deadline
        writer.write(PARTIAL_HEAD)
        assert 0.8 < await wait_closed(reader, 1 + MARGIN_S)
    finally:
        writer.close()


async def test_an_idle_keepalive_connection_is_closed(edge_kith: RunningKith) -> None:
    reader, writer = await connect(edge_kith)
    try:
        writer.write(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: kith.test\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert 2.5 < await wait_closed(reader, 3 + MARGIN_S)
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(edge_kith: RunningKith) -> None:
    reader, writer = await connect(edge_kith)
    try:
        assert 0.8 < await wait_closed(reader, 1 + MARGIN_S)
    finally:
        writer.close()


async def test_a_body_that_does_not_arrive_in_time_gets_408(edge_kith: RunningKith) -> None:
    reader, writer = await connect(edge_kith)
    try:
        writer.write(b"POST /_matrix/identity/v2/account/register HTTP/1.1\r\n"
                     b"Host: kith.test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"access_token\": ")
        started = time.monotonic()
        status, _, body = await read_response(reader)
        assert (status, body["errcode"]) == (408, "M_UNKNOWN")
        assert 0.8 < time.monotonic() - started < 1 + MARGIN_S
    finally:
        writer.close()


SECRET = "sekrit-access-token-0123456789"
OVERSIZED = [
    # a 10 KB URL, carrying a token: the error must not quote it into the log
    (f"GET {STATUS}?access_token={SECRET}&x={'a' * 10_000} HTTP/1.1\r\n"
     "Host: kith.test\r\n\r\n".encode(), 414),
    # a 100 KB header
    (f"GET {STATUS} HTTP/1.1\r\nHost: kith.test\r\nAuthorization: Bearer {SECRET}\r\n"
     f"X-Big: {'b' * 100_000}\r\n\r\n".encode(), 431),
    # 200 headers
    (f"GET {STATUS} HTTP/1.1\r\nHost: kith.test\r\n".encode()
     + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
]
MALFORMED = [
    b"G(T / HTTP/1.1\r\nHost: kith.test\r\n\r\n",  # bad method token
    b"GET / HTTP/7.3\r\nHost: kith.test\r\n\r\n",  # bad version
    b"GET / FTP/1.1\r\nHost: kith.test\r\n\r\n",
    b"\x00\xff\xfe junk junk\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # TLS ClientHello
    b"GET / HTTP/1.1\r\nHost: kith.test\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: kith.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
]


async def send_raw(kith: RunningKith, request: bytes) -> tuple[int, dict[str, str], Any]:
    reader, writer = await connect(kith)
    try:
        writer.write(request)
        return await read_response(reader)
    finally:
        writer.close()


@pytest.mark.parametrize(("request_bytes", "status"), OVERSIZED,
                         ids=["long-url", "big-header", "many-headers"])
async def test_oversized_request_heads_get_a_matrix_error(
        edge_kith: RunningKith, caplog: pytest.LogCaptureFixture, request_bytes: bytes,
        status: int) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await send_raw(edge_kith, request_bytes)
    assert answer[0] == status
    assert answer[1]["content-type"] == "application/json"
    assert answer[1]["access-control-allow-origin"] == "*"
    assert answer[2]["errcode"] == "M_TOO_LARGE" and answer[2]["error"]
    assert_one_quiet_line(caplog)


@pytest.mark.parametrize("request_bytes", MALFORMED, ids=[
    "bad-method", "bad-version", "not-http", "junk", "tls-on-plain-port", "bad-header",
    "two-lengths"])
async def test_malformed_http_gets_a_matrix_error(
        edge_kith: RunningKith, caplog: pytest.LogCaptureFixture,
        request_bytes: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await send_raw(edge_kith, request_bytes)
    assert (status, headers["content-type"]) == (400, "application/json")
    assert body == {"errcode": "M_UNKNOWN", "error": "Malformed HTTP request"}
    assert_one_quiet_line(caplog)


def assert_one_quiet_line(caplog: pytest.LogCaptureFixture) -> None:
    """At most one record about the refused request, below WARNING, without a traceback
    or anything the request carried."""
    edge = [r for r in caplog.records if r.name.startswith(("aiohttp", "kith.api"))]
    assert len(edge) <= 1, [r.getMessage() for r in edge]
    for record in caplog.records:
        assert record.levelno < logging.WARNING, record.getMessage()
        assert record.exc_info is None, record.getMessage()
        assert SECRET not in record.getMessage()
