"""Matrix server discovery ("Resolving server names", server-server API v1.19).

Turns a server name into where to connect, which certificate name to expect
and which Host header to send.  The `.well-known` fetcher and the SRV lookup
are passed in, so the rules can be tested without touching DNS or the network.
"""

from __future__ import annotations

import ipaddress
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dns.asyncresolver
import dns.exception
from cachetools import TLRUCache

from kith.threepid import is_valid_server_name, parse_server_name

DEFAULT_FEDERATION_PORT = 8448
WELL_KNOWN_DEFAULT_CACHE_S = 24 * 3600.0
WELL_KNOWN_MIN_CACHE_S = 5 * 60.0
WELL_KNOWN_MAX_CACHE_S = 48 * 3600.0
WELL_KNOWN_ERROR_CACHE_S = 3600.0
# Results that depended on SRV records are kept no longer than this.
SRV_CACHE_S = 3600.0

_SECONDS = re.compile(r"[0-9]{1,12}")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ResolvedServer:
    """Where to send a federation request.

    `host` is an unbracketed IP or a hostname the connector resolves itself.
    """

    host: str
    port: int
    tls_server_name: str
    host_header: str
    scheme: str = "https"


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class WellKnownResult:
    """`m.server` from a valid `.well-known` (None otherwise) and how long to trust it."""

    server: str | None
    cache_s: float


WellKnownFetcher = Callable[[str], Awaitable[WellKnownResult]]
SrvLookup = Callable[[str], Awaitable[Sequence[SrvRecord]]]


def cache_period(cache_control: str | None) -> float:
    """Seconds to cache a valid `.well-known`, from its Cache-Control header."""
    if not cache_control:
        return WELL_KNOWN_DEFAULT_CACHE_S
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return WELL_KNOWN_MIN_CACHE_S
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age" and _SECONDS.fullmatch(value.strip()):
            return min(max(float(value), WELL_KNOWN_MIN_CACHE_S), WELL_KNOWN_MAX_CACHE_S)
    return WELL_KNOWN_DEFAULT_CACHE_S


def parse_well_known(body: Any) -> str | None:
    """The delegated server name, or None if the document is not valid."""
    if not isinstance(body, dict):
        return None
    server = body.get("m.server")
    if isinstance(server, str) and is_valid_server_name(server):
        return server
    return None


def pick_srv_target(records: Sequence[SrvRecord]) -> tuple[str, int] | None:
    """Lowest priority wins; weight chooses within it (RFC 2782)."""
    usable = [r for r in records if r.target.rstrip(".")]
    if not usable:
        return None
    best = min(r.priority for r in usable)
    group = [r for r in usable if r.priority == best]
    weights = [r.weight for r in group]
    chosen = random.choices(group, weights)[0] if sum(weights) else random.choice(group)
    return chosen.target.rstrip("."), chosen.port


async def _via_srv(hostname: str, lookup_srv: SrvLookup) -> tuple[str, int] | None:
    for prefix in ("_matrix-fed._tcp.", "_matrix._tcp."):
        target = pick_srv_target(await lookup_srv(prefix + hostname))
        if target is not None:
            return target
    return None


async def _resolve_delegated(name: str, lookup_srv: SrvLookup) -> tuple[ResolvedServer, float]:
    """Steps after `.well-known`, or without it: direct, SRV, then port 8448."""
    host, port = parse_server_name(name)
    if is_ip_literal(host) or port is not None:
        return ResolvedServer(host, port or DEFAULT_FEDERATION_PORT, host, name), float("inf")
    srv = await _via_srv(host, lookup_srv)
    if srv is not None:
        return ResolvedServer(srv[0], srv[1], host, name), SRV_CACHE_S
    return ResolvedServer(host, DEFAULT_FEDERATION_PORT, host, name), SRV_CACHE_S


async def resolve_with_ttl(
    server_name: str, *, fetch_well_known: WellKnownFetcher, lookup_srv: SrvLookup
) -> tuple[ResolvedServer, float]:
    """Resolve `server_name` and say how long the answer may be cached."""
    host, port = parse_server_name(server_name)
    if is_ip_literal(host) or port is not None:
        return await _resolve_delegated(server_name, lookup_srv)
    well_known = await fetch_well_known(host)
    delegated = well_known.server or server_name
    resolved, ttl = await _resolve_delegated(delegated, lookup_srv)
    return resolved, min(ttl, well_known.cache_s)


async def resolve_server_name(
    server_name: str, *, fetch_well_known: WellKnownFetcher, lookup_srv: SrvLookup
) -> ResolvedServer:
    resolved, _ttl = await resolve_with_ttl(
        server_name, fetch_well_known=fetch_well_known, lookup_srv=lookup_srv
    )
    return resolved


# The test override that catches every server name without an override of its own.
ANY_SERVER = "*"


class ServerResolver:
    """Resolution with test overrides and a bounded in-memory cache.

    Server names come from untrusted requests, so the cache is capped and drops the
    least recently used entries rather than growing without bound.  Each entry lives
    as long as the answer it holds may be trusted (`resolve_with_ttl`).  An override
    for `*` sends every other name to one place without DNS, so tests that invent
    names (fuzzing) never reach the network.
    """

    def __init__(
        self,
        fetch_well_known: WellKnownFetcher,
        lookup_srv: SrvLookup,
        *,
        overrides: Mapping[str, ResolvedServer] | None = None,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch_well_known = fetch_well_known
        self._lookup_srv = lookup_srv
        self._overrides = dict(overrides or {})
        self._clock = clock
        # server name → (resolved, when that answer expires)
        self._cache: TLRUCache[str, tuple[ResolvedServer, float]] = TLRUCache(
            max_entries, _expires_at, clock)

    async def resolve(self, server_name: str) -> ResolvedServer:
        override = self._overrides.get(server_name)
        if override is not None:
            return override
        catch_all = self._overrides.get(ANY_SERVER)
        if catch_all is not None:
            return replace(catch_all, host_header=server_name)
        cached = self._cache.get(server_name)
        if cached is not None:
            return cached[0]
        asked_at = self._clock()
        resolved, ttl = await resolve_with_ttl(
            server_name, fetch_well_known=self._fetch_well_known, lookup_srv=self._lookup_srv
        )
        if ttl != float("inf"):  # IP literals and explicit ports cost nothing to resolve
            self._cache[server_name] = (resolved, asked_at + ttl)
        return resolved


def _expires_at(_server_name: str, entry: tuple[ResolvedServer, float], _now: float) -> float:
    return entry[1]


_dns_resolver: dns.asyncresolver.Resolver | None = None


async def lookup_srv_dns(name: str, *, timeout_s: float = 5.0) -> list[SrvRecord]:
    """SRV records for `name`; any DNS failure reads as "no records" (fall through)."""
    global _dns_resolver
    try:
        if _dns_resolver is None:
            _dns_resolver = dns.asyncresolver.Resolver()
        answer = await _dns_resolver.resolve(name, "SRV", lifetime=timeout_s)
    except dns.exception.DNSException:
        return []
    return [
        SrvRecord(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
        for r in answer
    ]
