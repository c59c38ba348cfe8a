"""X-Matrix parsing, signing and verification against real loopback key servers."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientSession, web
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from yarl import URL

from kith.federation import FederationClient
from kith.federation.keys import KeyFetchError, ServerKeyFetcher
from kith.federation.policy import OutboundAddressPolicy
from kith.federation.xmatrix import (
    InvalidXMatrixHeader,
    XMatrixAuth,
    XMatrixVerificationError,
    parse_x_matrix,
    sign_x_matrix_header,
    signed_request_json,
    verify_x_matrix_request,
)
from tests.peers.synapse_headers import UnbindToSign, synapse_auth_headers

from .conftest import Serve

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
KEYS_PATH = "/_matrix/key/v2/server"
UNBIND = "/_matrix/identity/v2/3pid/unbind"
ID_SERVER = "id.test"
BODY = {
    "mxid": "@alice:hs.test",
    "threepid": {"medium": "email", "address": "alice@example.org"},
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class KeyServer:
    """A homeserver's `/_matrix/key/v2/server`, with knobs to make it lie."""

    def __init__(self, server_name: str = "hs.test", version: str = "k1") -> None:
        self.server_name = server_name
        self.signing_key = generate_signing_key(version)
        self.key_id = f"ed25519:{version}"
        self.published: list[SigningKey] = [self.signing_key]
        self.signers: list[SigningKey] = [self.signing_key]
        self.claimed_name = server_name
        self.valid_until_ts = int((time.time() + 3600) * 1000)
        self.tamper_after_signing = False
        self.status = 200
        self.hang = asyncio.Event()
        self.hanging = False
        self.requests = 0

    def key_response(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "server_name": self.claimed_name,
            "valid_until_ts": self.valid_until_ts,
            "verify_keys": {
                f"ed25519:{key.version}": {"key": encode_verify_key_base64(get_verify_key(key))}
                for key in self.published
            },
            "old_verify_keys": {},
        }
        for key in self.signers:
            sign_json(body, self.server_name, key)
        if self.tamper_after_signing:
            body["valid_until_ts"] += 1
        return body

    async def keys(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.hanging:
            await self.hang.wait()
        return web.json_response(self.key_response(), status=self.status)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(KEYS_PATH, self.keys)]


def make_fetcher(
    overrides: dict[str, str], *, clock: Callable[[], float] = time.time, timeout_s: float = 5.0
) -> tuple[FederationClient, ServerKeyFetcher]:
    async def no_srv(name: str) -> list[Any]:
        raise AssertionError(f"unexpected SRV lookup for {name}")

    client = FederationClient(
        OutboundAddressPolicy(whitelist=LOOPBACK),
        timeout_s=timeout_s,
        overrides=overrides,
        lookup_srv=no_srv,
    )
    return client, ServerKeyFetcher(client, clock)


class Setup:
    def __init__(self, homeserver: KeyServer, fetcher: ServerKeyFetcher, clock: Clock) -> None:
        self.homeserver = homeserver
        self.fetcher = fetcher
        self.clock = clock

    def header(
        self,
        *,
        key: SigningKey | None = None,
        origin: str = "hs.test",
        destination: str | None = ID_SERVER,
        method: str = "POST",
        uri: str = UNBIND,
        content: Any = BODY,
    ) -> str:
        signing_key = key or self.homeserver.signing_key
        return sign_x_matrix_header(signing_key, origin, destination, method, uri, content)

    async def verify(
        self, header: str, *, method: str = "POST", uri: str = UNBIND, content: Any = BODY
    ) -> str:
        return await verify_x_matrix_request(
            parse_x_matrix(header),
            method=method,
            uri=uri,
            content=content,
            expected_destinations=(ID_SERVER, "id.test:8090"),
            fetcher=self.fetcher,
        )


@pytest.fixture
async def setup(serve: Serve) -> AsyncIterator[Setup]:
    homeserver = KeyServer()
    clock = Clock()
    async with serve(homeserver.routes()) as port:
        client, fetcher = make_fetcher({"hs.test": f"http://127.0.0.1:{port}"}, clock=clock)
        async with client:
            yield Setup(homeserver, fetcher, clock)
        homeserver.hang.set()


# --- parsing ---------------------------------------------------------------------------------


def test_parse_canonical_header() -> None:
    auth = parse_x_matrix(
        'X-Matrix origin="hs.example",destination="id.example",key="ed25519:abc",sig="AB/c+d"'
    )
    assert auth == XMatrixAuth("hs.example", "id.example", "ed25519:abc", "AB/c+d")


def test_parse_unquoted_values_case_and_whitespace() -> None:
    auth = parse_x_matrix(
        "x-matrix  ORIGIN=hs.example:8448 ,\tKey = ed25519:a_1 ,, Sig=AB/c+d=, destination=id.x"
    )
    assert auth == XMatrixAuth("hs.example:8448", "id.x", "ed25519:a_1", "AB/c+d=")


def test_parse_quoted_escapes_commas_and_unknown_params() -> None:
    auth = parse_x_matrix(
        r'X-Matrix sig="s\"i,g\\",extra="a, b=c",origin="hs\.example",key="ed25519:k"'
    )
    assert auth.sig == 's"i,g\\'
    assert auth.origin == "hs.example"
    assert auth.destination is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "X-Matrix",
        'Bearer origin="hs",key="ed25519:a",sig="x"',
        'X-Matrixorigin="hs",key="ed25519:a",sig="x"',
        'X-Matrix key="ed25519:a",sig="x"',
        'X-Matrix origin="hs",sig="x"',
        'X-Matrix origin="hs",key="ed25519:a"',
        'X-Matrix origin="",key="ed25519:a",sig="x"',
        'X-Matrix origin="hs",key="curve25519:a",sig="x"',
        'X-Matrix origin="hs",key="ed25519:",sig="x"',
        'X-Matrix origin="hs",key="ed25519",sig="x"',
        'X-Matrix origin="hs",key="ed25519:a",sig="x',
        'X-Matrix origin="hs",key="ed25519:a",sig="x\\',
        'X-Matrix origin="hs" key="ed25519:a",sig="x"',
        'X-Matrix origin="hs",key="ed25519:a",sig',
        'X-Matrix origin="hs",key="ed25519:a",sig=',
        'X-Matrix origin="hs",origin="evil",key="ed25519:a",sig="x"',
        'X-Matrix origin="hs",key="ed25519:a",sig="x\ny"',
        'X-Matrix origin=h"s,key="ed25519:a",sig="x"',
        'X-Matrix =hs,key="ed25519:a",sig="x"',
    ],
)
def test_parse_rejects(header: str) -> None:
    with pytest.raises(InvalidXMatrixHeader):
        parse_x_matrix(header)
    assert issubclass(InvalidXMatrixHeader, ValueError)


def test_sign_header_round_trips_awkward_values() -> None:
    key = generate_signing_key("k1")
    header = sign_x_matrix_header(key, 'hs"\\', "id.test", "POST", UNBIND, BODY)
    auth = parse_x_matrix(header)
    assert auth.origin == 'hs"\\'
    assert auth.key == "ed25519:k1"


def test_signed_json_takes_strings_only() -> None:
    with pytest.raises(TypeError, match="uri must be str"):
        signed_request_json(
            method="POST",
            uri=UNBIND.encode(),  # type: ignore[arg-type]
            origin="hs",
            destination=None,
            content=None,
        )


# --- verification ----------------------------------------------------------------------------


async def test_valid_request_verifies(setup: Setup) -> None:
    assert await setup.verify(setup.header()) == "hs.test"


async def test_uri_keeps_query_and_get_without_content(setup: Setup) -> None:
    uri = "/_matrix/identity/v2/some/path?a=b%20c&d=e"
    header = setup.header(method="GET", uri=uri, content=None)
    assert await setup.verify(header, method="GET", uri=uri, content=None) == "hs.test"
    with pytest.raises(XMatrixVerificationError):
        await setup.verify(header, method="GET", uri=uri, content={})


async def test_missing_destination_accepted(setup: Setup) -> None:
    header = setup.header(destination=None)
    assert "destination" not in header
    assert await setup.verify(header) == "hs.test"


async def test_other_public_name_accepted(setup: Setup) -> None:
    assert await setup.verify(setup.header(destination="id.test:8090")) == "hs.test"


async def test_wrong_destination(setup: Setup) -> None:
    with pytest.raises(XMatrixVerificationError, match="addressed to 'other.test'"):
        await setup.verify(setup.header(destination="other.test"))
    assert setup.homeserver.requests == 0


async def test_destination_is_signed(setup: Setup) -> None:
    header = setup.header(destination=ID_SERVER).replace(ID_SERVER, "id.test:8090")
    with pytest.raises(XMatrixVerificationError, match="bad X-Matrix signature"):
        await setup.verify(header)


async def test_headers_signed_by_synapses_own_code(setup: Setup) -> None:
    """Synapse signs `destination_is` (the id_server its user named) and repeats that name
    in the header's `destination=`: accepted for each of our public names, refused for
    another identity server's name and for a body other than the signed one."""
    key = setup.homeserver.signing_key
    ours, alias, theirs = (UnbindToSign(key, "hs.test", BODY, name)
                           for name in (ID_SERVER, "id.test:8090", "other.test"))
    headers = synapse_auth_headers([ours, alias, theirs])
    for header, name in zip(headers, (ID_SERVER, "id.test:8090", "other.test"), strict=True):
        assert parse_x_matrix(header).destination == name
    assert await setup.verify(headers[0]) == "hs.test"
    assert await setup.verify(headers[1]) == "hs.test"
    with pytest.raises(XMatrixVerificationError, match="addressed to 'other.test'"):
        await setup.verify(headers[2])
    tampered = {**BODY, "mxid": "@mallory:hs.test"}
    with pytest.raises(XMatrixVerificationError, match="bad X-Matrix signature"):
        await setup.verify(headers[0], content=tampered)


@pytest.mark.parametrize(
    "sig", ["AAAA", "not base64!", "A" * 86, ""], ids=["short", "junk", "zeros", "empty"]
)
async def test_wrong_signature(setup: Setup, sig: str) -> None:
    auth = parse_x_matrix(setup.header())
    forged = XMatrixAuth(auth.origin, auth.destination, auth.key, sig)
    with pytest.raises(XMatrixVerificationError):
        await verify_x_matrix_request(
            forged,
            method="POST",
            uri=UNBIND,
            content=BODY,
            expected_destinations=[ID_SERVER],
            fetcher=setup.fetcher,
        )


async def test_signature_by_a_key_the_server_does_not_publish(setup: Setup) -> None:
    impostor = generate_signing_key("k1")  # same key id, different key
    with pytest.raises(XMatrixVerificationError, match="bad X-Matrix signature"):
        await setup.verify(setup.header(key=impostor))
    unknown = generate_signing_key("k2")
    setup.clock.now += 61
    with pytest.raises(XMatrixVerificationError, match="does not publish a current key"):
        await setup.verify(setup.header(key=unknown))


async def test_origin_differs_from_signing_server(serve: Serve) -> None:
    homeserver, attacker = KeyServer("hs.test"), KeyServer("evil.test")
    async with serve(homeserver.routes()) as hs_port, serve(attacker.routes()) as evil_port:
        client, fetcher = make_fetcher(
            {"hs.test": f"http://127.0.0.1:{hs_port}", "evil.test": f"http://127.0.0.1:{evil_port}"}
        )
        async with client:
            # evil.test signs with its own (valid) key but claims to be hs.test.
            header = sign_x_matrix_header(
                attacker.signing_key, "hs.test", ID_SERVER, "POST", UNBIND, BODY
            )
            with pytest.raises(XMatrixVerificationError, match="bad X-Matrix signature"):
                await verify_x_matrix_request(
                    parse_x_matrix(header),
                    method="POST",
                    uri=UNBIND,
                    content=BODY,
                    expected_destinations=[ID_SERVER],
                    fetcher=fetcher,
                )
            # Rewriting the origin after signing does not help either.
            honest = sign_x_matrix_header(
                attacker.signing_key, "evil.test", ID_SERVER, "POST", UNBIND, BODY
            )
            with pytest.raises(XMatrixVerificationError):
                await verify_x_matrix_request(
                    parse_x_matrix(honest.replace("evil.test", "hs.test")),
                    method="POST",
                    uri=UNBIND,
                    content=BODY,
                    expected_destinations=[ID_SERVER],
                    fetcher=fetcher,
                )
    assert homeserver.requests == 1
    assert attacker.requests == 0


@pytest.mark.parametrize(
    "tamper",
    [
        {"content": {**BODY, "mxid": "@bob:hs.test"}},
        {"content": None},
        {"content": {}},
        {"method": "PUT"},
        {"method": "post"},
        {"uri": UNBIND + "?x=1"},
        {"uri": "/_matrix/identity/v2/3pid/bind"},
    ],
    ids=["content", "no-content", "empty-content", "method", "method-case", "query", "path"],
)
async def test_tampered_request(setup: Setup, tamper: dict[str, Any]) -> None:
    with pytest.raises(XMatrixVerificationError, match="bad X-Matrix signature"):
        await setup.verify(setup.header(), **tamper)


async def test_bytes_content_is_refused_not_crashed(setup: Setup) -> None:
    with pytest.raises(XMatrixVerificationError, match="cannot be canonicalised"):
        await setup.verify(setup.header(), content={"mxid": b"@alice:hs.test"})


@pytest.mark.parametrize("origin", ["hs.test/evil", "", "hs test", "[::1"])
async def test_invalid_origin(setup: Setup, origin: str) -> None:
    auth = XMatrixAuth(origin, ID_SERVER, "ed25519:k1", "AAAA")
    with pytest.raises(XMatrixVerificationError, match="not a valid server name"):
        await verify_x_matrix_request(
            auth,
            method="POST",
            uri=UNBIND,
            content=BODY,
            expected_destinations=[ID_SERVER],
            fetcher=setup.fetcher,
        )
    assert setup.homeserver.requests == 0


# --- key fetching ----------------------------------------------------------------------------


async def test_expired_key_refused(setup: Setup) -> None:
    setup.homeserver.valid_until_ts = int((time.time() - 60) * 1000)
    with pytest.raises(XMatrixVerificationError, match="expired"):
        await setup.verify(setup.header())
    with pytest.raises(KeyFetchError, match="expired"):
        setup.clock.now += 61
        await setup.fetcher.get_verify_key("hs.test", setup.homeserver.key_id)


async def test_cached_key_expires_at_valid_until(setup: Setup) -> None:
    setup.homeserver.valid_until_ts = int((setup.clock.now + 120) * 1000)
    await setup.verify(setup.header())
    setup.clock.now += 100
    await setup.verify(setup.header())
    assert setup.homeserver.requests == 1
    setup.clock.now += 30  # past valid_until_ts: refetched, and the server still serves it
    with pytest.raises(XMatrixVerificationError, match="expired"):
        await setup.verify(setup.header())
    assert setup.homeserver.requests == 2


async def test_cache_kept_at_most_a_day(setup: Setup) -> None:
    setup.homeserver.valid_until_ts = int((setup.clock.now + 7 * 86400) * 1000)
    await setup.verify(setup.header())
    setup.clock.now += 86400 - 1
    await setup.verify(setup.header())
    assert setup.homeserver.requests == 1
    setup.clock.now += 2
    await setup.verify(setup.header())
    assert setup.homeserver.requests == 2


async def test_server_name_mismatch(setup: Setup) -> None:
    setup.homeserver.claimed_name = "other.test"
    with pytest.raises(XMatrixVerificationError, match="names another server"):
        await setup.verify(setup.header())


async def test_bad_self_signature(setup: Setup) -> None:
    setup.homeserver.tamper_after_signing = True
    with pytest.raises(XMatrixVerificationError, match="bad self-signature"):
        await setup.verify(setup.header())


async def test_unsigned_key_response(setup: Setup) -> None:
    setup.homeserver.signers = []
    with pytest.raises(XMatrixVerificationError, match="not self-signed"):
        await setup.verify(setup.header())


async def test_key_must_sign_its_own_publication(setup: Setup) -> None:
    other = generate_signing_key("k2")
    setup.homeserver.published = [setup.homeserver.signing_key, other]
    setup.homeserver.signers = [other]
    with pytest.raises(XMatrixVerificationError, match="does not publish a current key"):
        await setup.verify(setup.header())
    assert await setup.verify(setup.header(key=other)) == "hs.test"


async def test_key_server_error_status(setup: Setup) -> None:
    setup.homeserver.status = 404
    with pytest.raises(XMatrixVerificationError, match="HTTP 404"):
        await setup.verify(setup.header())


async def test_key_server_down() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client, fetcher = make_fetcher({"hs.test": f"http://127.0.0.1:{port}"}, timeout_s=1.0)
    async with client:
        started = time.monotonic()
        with pytest.raises(KeyFetchError, match="cannot fetch keys of hs.test"):
            await fetcher.get_verify_key("hs.test", "ed25519:k1")
        assert time.monotonic() - started < 1.5


async def test_key_server_hangs(serve: Serve) -> None:
    homeserver = KeyServer()
    homeserver.hanging = True
    async with serve(homeserver.routes()) as port:
        client, fetcher = make_fetcher({"hs.test": f"http://127.0.0.1:{port}"}, timeout_s=0.5)
        async with client:
            header = sign_x_matrix_header(
                homeserver.signing_key, "hs.test", ID_SERVER, "POST", UNBIND, BODY
            )
            started = time.monotonic()
            with pytest.raises(XMatrixVerificationError, match="no answer") as caught:
                await verify_x_matrix_request(
                    parse_x_matrix(header),
                    method="POST",
                    uri=UNBIND,
                    content=BODY,
                    expected_destinations=[ID_SERVER],
                    fetcher=fetcher,
                )
            assert time.monotonic() - started < 1.5
            assert isinstance(caught.value.__cause__, KeyFetchError)
        homeserver.hang.set()


async def test_key_refused_by_outbound_policy(serve: Serve) -> None:
    homeserver = KeyServer()
    async with serve(homeserver.routes()) as port:
        client = FederationClient(
            OutboundAddressPolicy(), overrides={"hs.test": f"http://127.0.0.1:{port}"}
        )
        async with client:
            with pytest.raises(KeyFetchError, match="refused"):
                await ServerKeyFetcher(client).get_verify_key("hs.test", "ed25519:k1")
    assert homeserver.requests == 0


async def test_cache_serves_second_verification(setup: Setup) -> None:
    for _ in range(3):
        assert await setup.verify(setup.header()) == "hs.test"
    assert setup.homeserver.requests == 1


async def test_concurrent_misses_share_one_fetch(setup: Setup) -> None:
    results = await asyncio.gather(*(setup.verify(setup.header()) for _ in range(10)))
    assert results == ["hs.test"] * 10
    assert setup.homeserver.requests == 1


async def test_unknown_key_ids_refetch_at_most_once_a_minute(setup: Setup) -> None:
    await setup.verify(setup.header())
    assert setup.homeserver.requests == 1
    for version in ("x1", "x2", "x3"):
        with pytest.raises(XMatrixVerificationError, match="less than 60 s ago"):
            await setup.verify(setup.header(key=generate_signing_key(version)))
    assert setup.homeserver.requests == 1
    setup.clock.now += 61
    with pytest.raises(XMatrixVerificationError, match="does not publish"):
        await setup.verify(setup.header(key=generate_signing_key("x4")))
    assert setup.homeserver.requests == 2
    with pytest.raises(XMatrixVerificationError, match="less than 60 s ago"):
        await setup.verify(setup.header(key=generate_signing_key("x5")))
    assert setup.homeserver.requests == 2
    # Known keys keep working while refetches are throttled.
    assert await setup.verify(setup.header()) == "hs.test"


async def test_failed_fetches_are_rate_limited_too(setup: Setup) -> None:
    setup.homeserver.status = 404
    with pytest.raises(XMatrixVerificationError, match="HTTP 404"):
        await setup.verify(setup.header())
    setup.homeserver.status = 200
    with pytest.raises(XMatrixVerificationError, match="less than 60 s ago"):
        await setup.verify(setup.header())
    setup.clock.now += 61
    assert await setup.verify(setup.header()) == "hs.test"
    assert setup.homeserver.requests == 2


async def test_key_rotation_picked_up_after_a_minute(setup: Setup) -> None:
    await setup.verify(setup.header())
    new_key = generate_signing_key("k2")
    setup.homeserver.published = setup.homeserver.signers = [new_key]
    setup.clock.now += 61
    assert await setup.verify(setup.header(key=new_key)) == "hs.test"
    assert setup.homeserver.requests == 2


async def test_key_cache_is_bounded(setup: Setup) -> None:
    fetcher = ServerKeyFetcher(setup.fetcher._client, setup.clock, max_cached_keys=1)
    setup.homeserver.published = setup.homeserver.signers = [
        setup.homeserver.signing_key,
        generate_signing_key("k2"),
    ]
    await fetcher.get_verify_key("hs.test", "ed25519:k2")
    assert list(fetcher._keys) == [("hs.test", "ed25519:k2")]  # the wanted key is kept
    assert await fetcher.get_verify_key("hs.test", "ed25519:k2")
    with pytest.raises(KeyFetchError, match="less than 60 s ago"):
        await fetcher.get_verify_key("hs.test", "ed25519:k1")  # evicted
    assert setup.homeserver.requests == 1


# --- a real signed request over HTTP ---------------------------------------------------------


async def test_signed_unbind_over_http(serve: Serve, setup: Setup) -> None:
    """What the unbind endpoint will do: verify the header against the raw path and body."""

    async def unbind(request: web.Request) -> web.Response:
        try:
            auth = parse_x_matrix(request.headers["Authorization"])
            origin = await verify_x_matrix_request(
                auth,
                method=request.method,
                uri=request.raw_path,
                content=await request.json(),
                expected_destinations=[ID_SERVER],
                fetcher=setup.fetcher,
            )
        except (InvalidXMatrixHeader, XMatrixVerificationError) as exc:
            return web.json_response({"errcode": "M_UNAUTHORIZED", "error": str(exc)}, status=401)
        return web.json_response({"origin": origin})

    uri = UNBIND + "?via=a%2Fb"
    async with serve([web.post(UNBIND, unbind)]) as port, ClientSession() as session:
        header = setup.header(uri=uri)
        url = URL(f"http://127.0.0.1:{port}{uri}", encoded=True)  # sent exactly as signed
        async with session.post(url, json=BODY, headers={"Authorization": header}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"origin": "hs.test"}
        tampered = {**BODY, "mxid": "@mallory:hs.test"}
        async with session.post(url, json=tampered, headers={"Authorization": header}) as resp:
            assert resp.status == 401
