"""The one HTTP client kith uses to call homeservers.

Every request goes through `_fetch`, which enforces the house rules in one
place: the outbound address policy (also for IP literals, which bypass the
resolver), a total timeout, no redirects, a response size cap, no cookies, no
proxy from the environment, and error messages that never carry the URL's
query (it may hold an access token).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import aiohttp
import msgspec
from multidict import CIMultiDictProxy
from yarl import URL

from kith.config import GeneralConfig, HttpConfig
from kith.federation.discovery import (
    DEFAULT_FEDERATION_PORT,
    WELL_KNOWN_ERROR_CACHE_S,
    ResolvedServer,
    ServerResolver,
    SrvLookup,
    WellKnownFetcher,
    WellKnownResult,
    cache_period,
    is_ip_literal,
    lookup_srv_dns,
    parse_well_known,
)
from kith.federation.errors import (
    FederationError,
    HomeserverUnreachable,
    InvalidServerName,
    OpenIdTokenRejected,
)
from kith.federation.policy import AddressRefusedError, OutboundAddressPolicy, PolicyResolver
from kith.threepid import is_valid_server_name

MAX_RESPONSE_BYTES = 1024 * 1024
WELL_KNOWN_MAX_BYTES = 50 * 1024
WELL_KNOWN_MAX_REDIRECTS = 3
USER_AGENT = "kith"
OPENID_USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def override_target(server_name: str, base_url: str) -> ResolvedServer:
    """A `federation.test_overrides` entry: connect to `base_url`, skip discovery."""
    url = URL(base_url)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"override for {server_name!r} is not an http(s) URL: {base_url!r}")
    port = url.port or DEFAULT_FEDERATION_PORT
    return ResolvedServer(url.host, port, url.host, server_name, url.scheme)


class FederationClient:
    """Calls homeservers: discovery, then one policy-checked, bounded request."""

    def __init__(
        self,
        policy: OutboundAddressPolicy,
        *,
        timeout_s: float = 10.0,
        verify_certs: bool = True,
        ca_file: str = "",
        overrides: Mapping[str, str] | None = None,
        lookup_srv: SrvLookup | None = None,
        fetch_well_known: WellKnownFetcher | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._policy = policy
        self._timeout_s = timeout_s
        self._verify_certs = verify_certs
        self._ca_file = ca_file
        self._max_response_bytes = max_response_bytes
        self._servers = ServerResolver(
            fetch_well_known or self.fetch_well_known,
            lookup_srv or partial(lookup_srv_dns, timeout_s=min(timeout_s, 5.0)),
            overrides={name: override_target(name, url) for name, url in (overrides or {}).items()},
        )
        self._session: aiohttp.ClientSession | None = None
        self._start_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, general: GeneralConfig, http: HttpConfig) -> FederationClient:
        return cls(
            OutboundAddressPolicy(general.ip_blacklist, general.ip_whitelist),
            timeout_s=http.federation_timeout_s,
            verify_certs=http.federation_verifycerts,
            ca_file=http.federation_ca_file,
            overrides=dict(http.federation_test_overrides),
        )

    async def start(self) -> None:
        async with self._start_lock:
            if self._session is not None:
                return
            tls: ssl.SSLContext | bool = False
            if self._verify_certs:
                # Loading the CA store reads files: keep it off the event loop.
                tls = await asyncio.to_thread(self._make_ssl_context)
            connector = aiohttp.TCPConnector(
                resolver=PolicyResolver(self._policy),
                ssl=tls,
                limit=100,
                limit_per_host=8,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )

    def _make_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._ca_file:
            context.load_verify_locations(cafile=self._ca_file)
        return context

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> FederationClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def resolve(self, server_name: str) -> ResolvedServer:
        if not is_valid_server_name(server_name):
            raise InvalidServerName(f"invalid server name {server_name!r}")
        return await self._servers.resolve(server_name)

    async def openid_userinfo(self, server_name: str, access_token: str) -> str:
        """The MXID the homeserver vouches for; the caller checks it is on `server_name`."""
        response = await self._request(
            server_name, "GET", OPENID_USERINFO_PATH, query={"access_token": access_token}
        )
        if response.status in (401, 403):
            raise OpenIdTokenRejected(f"{server_name} rejected the OpenID token")
        if response.status != 200:
            _raise_for_status(server_name, response.status)
            raise HomeserverUnreachable(
                f"{server_name} answered HTTP {response.status} to userinfo",
                status=response.status,
            )
        body = _decode_json(server_name, response)
        sub = body.get("sub") if isinstance(body, dict) else None
        if not isinstance(sub, str) or not sub:
            raise OpenIdTokenRejected(f"{server_name} returned no user for the OpenID token")
        return sub

    async def request_json(
        self,
        server_name: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body) for 1xx/2xx/4xx answers.

        Raises HomeserverUnreachable for transport failures, redirects, 5xx and
        bodies that are not JSON, so callers can treat it as "retry later".
        """
        response = await self._request(
            server_name, method, path, json_body=json_body, headers=headers, query=query
        )
        _raise_for_status(server_name, response.status)
        return response.status, _decode_json(server_name, response)

    async def _request(
        self,
        server_name: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> _Response:
        target = await self.resolve(server_name)
        url = URL.build(
            scheme=target.scheme, host=target.host, port=target.port, path=path, query=query
        )
        all_headers = {"Host": target.host_header, "Accept": "application/json"}
        all_headers.update(headers or {})
        data = None
        if json_body is not None:
            data = msgspec.json.encode(json_body)
            all_headers["Content-Type"] = "application/json"
        tls_name = target.tls_server_name if target.scheme == "https" else None
        return await self._fetch(
            method,
            url,
            server_hostname=tls_name,
            headers=all_headers,
            data=data,
            limit=self._max_response_bytes,
        )

    async def fetch_well_known(self, hostname: str) -> WellKnownResult:
        """`https://<hostname>/.well-known/matrix/server`, following a few redirects."""
        url = URL.build(scheme="https", host=hostname, path="/.well-known/matrix/server")
        return await self._fetch_well_known_at(url)

    async def _fetch_well_known_at(self, url: URL) -> WellKnownResult:
        invalid = WellKnownResult(None, WELL_KNOWN_ERROR_CACHE_S)
        for _ in range(WELL_KNOWN_MAX_REDIRECTS + 1):
            try:
                response = await self._fetch("GET", url, limit=WELL_KNOWN_MAX_BYTES)
            except FederationError:
                return invalid
            location = response.headers.get("Location")
            if response.status in _REDIRECT_STATUSES and location:
                try:
                    url = url.join(URL(location))
                except ValueError:
                    return invalid
                if url.scheme != "https" or not url.host:
                    return invalid
                continue
            if response.status != 200:
                return invalid
            try:
                server = parse_well_known(msgspec.json.decode(response.body))
            except msgspec.DecodeError:
                return invalid
            if server is None:
                return invalid
            return WellKnownResult(server, cache_period(response.headers.get("Cache-Control")))
        return invalid

    async def _session_or_start(self) -> aiohttp.ClientSession:
        if self._session is None:
            await self.start()
        if self._session is None:
            raise RuntimeError("FederationClient session failed to start")
        return self._session

    async def _fetch(
        self,
        method: str,
        url: URL,
        *,
        server_hostname: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        limit: int,
    ) -> _Response:
        host = url.host or ""
        if is_ip_literal(host) and not self._policy.is_allowed(host):
            raise HomeserverUnreachable(f"address {host} refused by the outbound IP policy")
        session = await self._session_or_start()
        where = f"{host}:{url.port}"
        try:
            async with asyncio.timeout(self._timeout_s):
                async with session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    server_hostname=server_hostname,
                ) as resp:
                    body = await _read_capped(resp, limit, where)
                    return _Response(resp.status, resp.headers, body)
        except TimeoutError:
            reason = f"no answer from {where} within {self._timeout_s} s"
            raise HomeserverUnreachable(reason) from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, AddressRefusedError):
                raise HomeserverUnreachable(str(exc.os_error)) from None
            raise HomeserverUnreachable(f"cannot resolve {host}") from None
        except aiohttp.ClientSSLError as exc:
            raise HomeserverUnreachable(f"TLS failure with {where}: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.strerror or type(exc.os_error).__name__
            raise HomeserverUnreachable(f"cannot connect to {where}: {reason}") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # Other aiohttp messages may embed the URL (and its access token).
            raise HomeserverUnreachable(
                f"request to {where} failed: {type(exc).__name__}"
            ) from None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, where: str) -> bytes:
    too_large = HomeserverUnreachable(f"response from {where} exceeds {limit} bytes")
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _raise_for_status(server_name: str, status: int) -> None:
    if 300 <= status < 400:
        raise HomeserverUnreachable(
            f"{server_name} answered a redirect (HTTP {status}); not followed", status=status
        )
    if status >= 500:
        raise HomeserverUnreachable(f"{server_name} answered HTTP {status}", status=status)


def _decode_json(server_name: str, response: _Response) -> Any:
    try:
        return msgspec.json.decode(response.body)
    except msgspec.DecodeError:
        raise HomeserverUnreachable(
            f"{server_name} answered HTTP {response.status} with a body that is not JSON",
            status=response.status,
        ) from None
