"""FederationClient against real loopback homeservers (HTTP and HTTPS)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from kith.config import GeneralConfig, HttpConfig
from kith.federation import FederationClient, HomeserverUnreachable, OpenIdTokenRejected
from kith.federation.errors import InvalidServerName
from kith.federation.policy import OutboundAddressPolicy

from .conftest import Serve, TestPki

USERINFO = "/_matrix/federation/v1/openid/userinfo"
TOKEN = "s3cr3t-openid-token"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


class Homeserver:
    """Answers userinfo; remembers what it saw."""

    def __init__(self, status: int = 200, body: Any = None, text: str | None = None) -> None:
        self.status = status
        self.body = {"sub": "@alice:hs.test"} if body is None else body
        self.text = text
        self.requests: list[web.Request] = []

    async def userinfo(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        if self.text is not None:
            return web.Response(status=self.status, text=self.text)
        return web.json_response(self.body, status=self.status)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(USERINFO, self.userinfo)]


def make_client(
    overrides: dict[str, str] | None = None,
    *,
    whitelist: tuple[Any, ...] = LOOPBACK,
    timeout_s: float = 5.0,
    verify_certs: bool = True,
    ca_file: str = "",
    max_response_bytes: int = 1024 * 1024,
) -> FederationClient:
    async def no_srv(name: str) -> list[Any]:
        raise AssertionError(f"unexpected SRV lookup for {name}")

    return FederationClient(
        OutboundAddressPolicy(whitelist=whitelist),
        timeout_s=timeout_s,
        verify_certs=verify_certs,
        ca_file=ca_file,
        overrides=overrides,
        lookup_srv=no_srv,
        max_response_bytes=max_response_bytes,
    )


@pytest.fixture
async def http_homeserver(serve: Serve) -> AsyncIterator[tuple[Homeserver, int]]:
    homeserver = Homeserver()
    async with serve(homeserver.routes()) as port:
        yield homeserver, port


async def test_userinfo_through_test_override(http_homeserver: tuple[Homeserver, int]) -> None:
    homeserver, port = http_homeserver
    general = GeneralConfig(server_name="is.test", ip_whitelist=LOOPBACK)
    http = HttpConfig(
        federation_test_overrides=(("hs.test", f"http://127.0.0.1:{port}"),),
        federation_timeout_s=2.0,
    )
    async with FederationClient.from_config(general, http) as client:
        assert await client.openid_userinfo("hs.test", TOKEN) == "@alice:hs.test"
    (request,) = homeserver.requests
    assert request.query["access_token"] == TOKEN
    assert request.headers["Host"] == "hs.test"
    assert "Cookie" not in request.headers


async def test_loopback_is_refused_unless_whitelisted(
    http_homeserver: tuple[Homeserver, int],
) -> None:
    homeserver, port = http_homeserver
    for base in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        client = make_client({"hs.test": base}, whitelist=())
        with pytest.raises(HomeserverUnreachable, match="refused by the outbound IP policy"):
            await client.openid_userinfo("hs.test", TOKEN)
        await client.close()
    # IP-literal server names are checked too, not only overrides.
    client = make_client(whitelist=())
    for name in (f"127.0.0.1:{port}", f"[::1]:{port}", f"[::ffff:127.0.0.1]:{port}", "0.0.0.0"):
        with pytest.raises(HomeserverUnreachable, match="refused"):
            await client.openid_userinfo(name, TOKEN)
    await client.close()
    assert homeserver.requests == []

    client = make_client(
        {"hs.test": f"http://localhost:{port}"},
        whitelist=(*LOOPBACK, ipaddress.ip_network("::1/128")),
    )
    assert await client.openid_userinfo("hs.test", TOKEN) == "@alice:hs.test"
    await client.close()


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_token(serve: Serve, status: int) -> None:
    homeserver = Homeserver(status, {"errcode": "M_UNKNOWN_TOKEN", "error": "nope"})
    async with serve(homeserver.routes()) as port:
        async with make_client({"hs.test": f"http://127.0.0.1:{port}"}) as client:
            with pytest.raises(OpenIdTokenRejected):
                await client.openid_userinfo("hs.test", TOKEN)


async def test_401_with_html_body_is_still_a_rejection(serve: Serve) -> None:
    homeserver = Homeserver(401, text="<html>go away</html>")
    async with serve(homeserver.routes()) as port:
        async with make_client({"hs.test": f"http://127.0.0.1:{port}"}) as client:
            with pytest.raises(OpenIdTokenRejected):
                await client.openid_userinfo("hs.test", TOKEN)


@pytest.mark.parametrize("body", [{}, {"sub": 42}, {"sub": ""}, ["@alice:hs.test"]])
async def test_200_without_string_sub_is_a_rejection(serve: Serve, body: Any) -> None:
    async with serve(Homeserver(200, body).routes()) as port:
        async with make_client({"hs.test": f"http://127.0.0.1:{port}"}) as client:
            with pytest.raises(OpenIdTokenRejected):
                await client.openid_userinfo("hs.test", TOKEN)


@pytest.mark.parametrize(
    ("homeserver", "match"),
    [
        (Homeserver(500, {"errcode": "M_UNKNOWN"}), "HTTP 500"),
        (Homeserver(502, text="bad gateway"), "HTTP 502"),
        (Homeserver(200, text="<html>not json</html>"), "not JSON"),
        (Homeserver(404, text="not found"), "not JSON|HTTP 404"),
        (Homeserver(200, {"sub": "@a:hs.test", "pad": "x" * 5000}), "exceeds 1000 bytes"),
    ],
)
async def test_bad_answers_are_unreachable(
    serve: Serve, homeserver: Homeserver, match: str
) -> None:
    async with serve(homeserver.routes()) as port:
        client = make_client({"hs.test": f"http://127.0.0.1:{port}"}, max_response_bytes=1000)
        async with client:
            with pytest.raises(HomeserverUnreachable, match=match):
                await client.openid_userinfo("hs.test", TOKEN)


async def test_redirect_is_not_followed(serve: Serve) -> None:
    target = Homeserver()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{target_port}{USERINFO}?{request.query_string}")

    async with serve(target.routes()) as target_port:
        async with serve([web.get(USERINFO, redirect)]) as port:
            async with make_client({"hs.test": f"http://127.0.0.1:{port}"}) as client:
                with pytest.raises(HomeserverUnreachable, match="redirect") as info:
                    await client.openid_userinfo("hs.test", TOKEN)
    assert info.value.status == 302
    assert target.requests == []


async def test_silent_homeserver_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = make_client({"hs.test": f"http://127.0.0.1:{port}"}, timeout_s=0.5)
        async with client:
            started = time.monotonic()
            with pytest.raises(HomeserverUnreachable, match="no answer") as info:
                await client.openid_userinfo("hs.test", TOKEN)
            assert time.monotonic() - started < 3
        assert TOKEN not in str(info.value)
        assert info.value.__cause__ is None
    finally:
        server.close()
        await server.wait_closed()


async def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with make_client() as client:
        with pytest.raises(HomeserverUnreachable, match="cannot connect"):
            await client.openid_userinfo(f"127.0.0.1:{port}", TOKEN)


def test_override_must_be_an_http_url() -> None:
    with pytest.raises(ValueError, match="not an http"):
        make_client({"hs.test": "ftp://127.0.0.1/"})


async def test_invalid_server_name() -> None:
    async with make_client() as client:
        with pytest.raises(InvalidServerName):
            await client.openid_userinfo("hs.test/../evil", TOKEN)


async def test_request_json_sends_json_and_returns_4xx_answers(serve: Serve) -> None:
    seen: list[Any] = []

    async def onbind(request: web.Request) -> web.Response:
        seen.append((request.headers["Content-Type"], await request.json()))
        return web.json_response({"ok": True})

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"errcode": "M_NOT_FOUND"}, status=404)

    routes = [web.post("/_matrix/federation/v1/3pid/onbind", onbind), web.get("/x", missing)]
    async with serve(routes) as port:
        async with make_client({"hs.test": f"http://127.0.0.1:{port}"}) as client:
            status, body = await client.request_json(
                "hs.test", "POST", "/_matrix/federation/v1/3pid/onbind", json_body={"mxid": "@a:b"}
            )
            assert (status, body) == (200, {"ok": True})
            assert seen == [("application/json", {"mxid": "@a:b"})]
            assert await client.request_json("hs.test", "GET", "/x") == (
                404,
                {"errcode": "M_NOT_FOUND"},
            )


# --- TLS: an IP-literal server name with an explicit port, served over HTTPS ---


@pytest.fixture
async def tls_homeserver(serve: Serve, pki: TestPki) -> AsyncIterator[tuple[Homeserver, int]]:
    homeserver = Homeserver()
    async with serve(homeserver.routes(), pki.server_context()) as port:
        yield homeserver, port


async def test_tls_ip_literal_trusted_via_ca_file(
    tls_homeserver: tuple[Homeserver, int], pki: TestPki
) -> None:
    homeserver, port = tls_homeserver
    async with make_client(ca_file=str(pki.ca_file)) as client:
        assert await client.openid_userinfo(f"127.0.0.1:{port}", TOKEN) == "@alice:hs.test"
    assert homeserver.requests[0].headers["Host"] == f"127.0.0.1:{port}"


async def test_tls_without_verification(tls_homeserver: tuple[Homeserver, int]) -> None:
    _, port = tls_homeserver
    async with make_client(verify_certs=False) as client:
        assert await client.openid_userinfo(f"127.0.0.1:{port}", TOKEN) == "@alice:hs.test"


@pytest.mark.parametrize("trust", ["other", "system"])
async def test_tls_untrusted_certificate(
    tls_homeserver: tuple[Homeserver, int], pki: TestPki, trust: str
) -> None:
    homeserver, port = tls_homeserver
    ca_file = str(pki.other_ca_file) if trust == "other" else ""
    async with make_client(ca_file=ca_file) as client:
        with pytest.raises(HomeserverUnreachable, match="TLS") as info:
            await client.openid_userinfo(f"127.0.0.1:{port}", TOKEN)
    assert TOKEN not in str(info.value)
    assert homeserver.requests == []


async def test_tls_name_mismatch_is_refused(serve: Serve, pki: TestPki) -> None:
    """The certificate covers 127.0.0.1 and localhost, not the name we expect."""
    homeserver = Homeserver()
    async with serve(homeserver.routes(), pki.server_context()) as port:
        client = make_client({"hs.test": f"https://127.0.0.1:{port}"}, ca_file=str(pki.ca_file))
        async with client:
            assert await client.openid_userinfo("hs.test", TOKEN) == "@alice:hs.test"
            resolved = await client.resolve("hs.test")
            assert resolved.tls_server_name == "127.0.0.1"
            with pytest.raises(HomeserverUnreachable, match="TLS"):
                await client._fetch(
                    "GET",
                    URL(f"https://127.0.0.1:{port}{USERINFO}"),
                    server_hostname="hs.other",
                    limit=1000,
                )


# --- .well-known fetching (served over HTTPS on a loopback port) ---


async def test_well_known_fetch_follows_redirects_and_honours_cache_control(
    serve: Serve, pki: TestPki
) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/real")

    async def real(request: web.Request) -> web.Response:
        return web.json_response(
            {"m.server": "hs.example.org:443"}, headers={"Cache-Control": "max-age=3600"}
        )

    routes = [web.get("/.well-known/matrix/server", moved), web.get("/real", real)]
    async with serve(routes, pki.server_context()) as port:
        async with make_client(ca_file=str(pki.ca_file)) as client:
            url = URL(f"https://127.0.0.1:{port}/.well-known/matrix/server")
            result = await client._fetch_well_known_at(url)
    assert (result.server, result.cache_s) == ("hs.example.org:443", 3600.0)


@pytest.mark.parametrize(
    "location",
    [
        "/.well-known/matrix/server",  # a loop: too many redirects
        "http://127.0.0.1:1/plain-http",  # downgrade
        "https://10.0.0.1/private",  # refused by policy before connecting
    ],
)
async def test_well_known_bad_redirects_are_invalid(
    serve: Serve, pki: TestPki, location: str
) -> None:
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound(location)

    async with serve(
        [web.get("/.well-known/matrix/server", redirect)], pki.server_context()
    ) as port:
        async with make_client(ca_file=str(pki.ca_file)) as client:
            url = URL(f"https://127.0.0.1:{port}/.well-known/matrix/server")
            result = await client._fetch_well_known_at(url)
    assert result.server is None
    assert len(hits) <= 4


@pytest.mark.parametrize(
    "answer",
    [
        web.json_response({"m.server": "not a server name"}),
        web.Response(text="{not json"),
        web.json_response({"m.server": "hs.example.org"}, status=404),
    ],
)
async def test_well_known_invalid_documents(
    serve: Serve, pki: TestPki, answer: web.Response
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    async with serve(
        [web.get("/.well-known/matrix/server", handler)], pki.server_context()
    ) as port:
        async with make_client(ca_file=str(pki.ca_file)) as client:
            url = URL(f"https://127.0.0.1:{port}/.well-known/matrix/server")
            assert (await client._fetch_well_known_at(url)).server is None


async def test_unreachable_well_known_falls_back_without_raising() -> None:
    client = make_client(whitelist=())
    async with client:
        # 192.0.2.0/24 is TEST-NET: refused by the default policy, nothing is sent.
        result = await client._fetch_well_known_at(URL("https://192.0.2.1/.well-known/x"))
    assert result.server is None
