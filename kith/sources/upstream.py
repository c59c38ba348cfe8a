"""Asking an upstream identity server for the addresses no local source resolved.

Through the current v2 API only: GET /hash_details (the pepper is cached), hash the
addresses with it (or send them in plain text when only `none` is offered), POST
/lookup with the configured access token.  The whole exchange is bounded by the
timeout; after `breaker_failures` failures in a row the upstream is asked once per
`breaker_cooldown` seconds only, until it answers again.  Answers, positive and
negative, are cached.  Only allowed mediums and email domains leave the server; they
are counted, never logged.

With `[proxy] adopt_pepper`, sha256 hashes made with the upstream's pepper are
forwarded as they are (`lookup_hashes`), under the same timeout, breaker and cache;
a hash says neither its medium nor its domain, so those filters cannot apply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kith.breaker import CircuitBreaker
from kith.caches import AnswerCache
from kith.config import ProxyConfig
from kith.federation.policy import OutboundAddressPolicy, PolicyResolver
from kith.metrics import BREAKER_OPEN
from kith.threepid import EMAIL, Threepid, is_valid_mxid, lookup_hash, plain_query

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# A lookup hash: unpadded URL-safe base64 of a SHA-256 digest.  Nothing else is forwarded.
LOOKUP_HASH = re.compile(r"[A-Za-z0-9_-]{43}")


class UpstreamError(Exception):
    """The upstream did not give a usable answer (message never holds an address)."""


class TermsNotSigned(UpstreamError):
    """The upstream wants its terms accepted for our access token (logged once)."""


class PepperRejected(Exception):
    """The upstream answered M_INVALID_PEPPER: its pepper is no longer the one asked with."""


class UpstreamIdentityServer:
    def __init__(self, config: ProxyConfig, policy: OutboundAddressPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._policy = policy
        self._base = config.identity + "/_matrix/identity/v2"
        self._session: aiohttp.ClientSession | None = None
        self._hash_details: tuple[tuple[str, ...], str] | None = None  # (algorithms, pepper)
        self._cache: AnswerCache[Threepid, str] = AnswerCache(
            config.cache_ttl_s, config.negative_cache_ttl_s, clock=clock)
        self._hash_cache: AnswerCache[tuple[str, str], str] = AnswerCache(  # (pepper, hash)
            config.cache_ttl_s, config.negative_cache_ttl_s, clock=clock)
        self._breaker = CircuitBreaker(
            f"upstream identity server {config.identity}", threshold=config.breaker_failures,
            cooldown_s=config.breaker_cooldown_s, clock=clock, logger=log,
            on_state=BREAKER_OPEN.labels(dependency="upstream").set)
        self._terms_logged = False
        self.forwarded = 0  # addresses sent upstream
        self.requests = 0

    def allowed(self, threepid: Threepid) -> bool:
        if threepid.medium not in self.config.mediums:
            return False
        if threepid.medium == EMAIL and self.config.email_domains:
            return threepid.address.rpartition("@")[2] in self.config.email_domains
        return True

    async def lookup(self, threepids: Iterable[Threepid]) -> dict[Threepid, str]:
        """What the upstream maps; never raises (a dead upstream answers nothing)."""
        found, ask = self._cache.split(t for t in threepids if self.allowed(t))
        if not ask or not self._breaker.allow():
            return found
        try:
            async with asyncio.timeout(self.config.timeout_s):
                answers = await self._ask(ask)
        except (UpstreamError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._failed(exc)
            return found
        self._breaker.succeeded()
        self._cache.remember(ask, answers)
        found.update(answers)
        return found

    async def lookup_hashes(self, hashes: Sequence[str], pepper: str) -> dict[str, str]:
        """What the upstream maps of sha256 `hashes` made with its `pepper`, in one
        request; never raises but PepperRejected (a dead upstream answers nothing)."""
        cached, ask = self._hash_cache.split(
            (pepper, h) for h in hashes if LOOKUP_HASH.fullmatch(h))
        found = {h: mxid for (_pepper, h), mxid in cached.items()}
        if not ask or not self._breaker.allow():
            return found
        asked = [h for _pepper, h in ask]
        try:
            async with asyncio.timeout(self.config.timeout_s):
                self.forwarded += len(asked)
                status, body = await self._request("POST", "/lookup", {
                    "algorithm": "sha256", "pepper": pepper, "addresses": asked})
            errcode = body.get("errcode") if isinstance(body, dict) else None
            if status == 400 and errcode == "M_INVALID_PEPPER":
                self._breaker.succeeded()  # it answered; the pepper is what changed
                raise PepperRejected
            answers = _mappings(status, errcode, body, set(asked))
        except (UpstreamError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._failed(exc)
            return found
        self._breaker.succeeded()
        self._hash_cache.remember(ask, {(pepper, h): mxid for h, mxid in answers.items()})
        found.update(answers)
        return found

    async def hash_details(self) -> tuple[tuple[str, ...], str]:
        """The upstream's algorithms and pepper, read now (within the timeout); raises
        UpstreamError, saying why, if they cannot be read."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await self._details(refresh=True)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _failed(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        was_open = self._breaker.is_open
        opened = self._breaker.failed(reason)
        # Terms are said once, loudly, where they were found; the breaker says when it
        # opens; while it is open, failed trials are expected.
        if not (isinstance(exc, TermsNotSigned) or opened or was_open):
            log.warning("upstream identity server %s: %s", self.config.identity, reason)

    async def _ask(self, threepids: list[Threepid]) -> dict[Threepid, str]:
        for attempt in (1, 2):
            algorithms, pepper = await self._details(refresh=attempt == 2)
            if "sha256" in algorithms:
                algorithm = "sha256"
                keys = {lookup_hash(t.medium, t.address, pepper): t for t in threepids}
            elif "none" in algorithms:
                algorithm = "none"
                keys = {plain_query(t.medium, t.address): t for t in threepids}
            else:
                raise UpstreamError("offers neither sha256 nor none lookups")
            self.forwarded += len(keys)
            status, body = await self._request("POST", "/lookup", {
                "algorithm": algorithm, "pepper": pepper, "addresses": list(keys)})
            errcode = body.get("errcode") if isinstance(body, dict) else None
            if status == 400 and errcode == "M_INVALID_PEPPER" and attempt == 1:
                continue
            return {keys[k]: v for k, v in _mappings(status, errcode, body, keys).items()}
        raise UpstreamError("pepper rejected twice")

    async def _details(self, refresh: bool) -> tuple[tuple[str, ...], str]:
        if self._hash_details is None or refresh:
            status, body = await self._request("GET", "/hash_details")
            if status != 200 or not isinstance(body, dict):
                raise UpstreamError(f"hash_details answered {status}")
            algorithms, pepper = body.get("algorithms"), body.get("lookup_pepper")
            if not (isinstance(algorithms, list) and isinstance(pepper, str)):
                raise UpstreamError("hash_details answer is malformed")
            self._hash_details = (tuple(a for a in algorithms if isinstance(a, str)), pepper)
        return self._hash_details

    async def _request(self, method: str, path: str,
                       payload: dict[str, Any] | None = None) -> tuple[int, Any]:
        session = self._session_or_start()
        headers = {}
        if self.config.access_token:
            headers["Authorization"] = f"Bearer {self.config.access_token}"
        self.requests += 1
        async with session.request(method, self._base + path, json=payload, headers=headers,
                                   allow_redirects=False) as resp:
            raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise UpstreamError("answer too large")
            try:
                body = json.loads(raw)
            except ValueError:
                raise UpstreamError(f"{path} answered {resp.status} with no JSON") from None
            if isinstance(body, dict) and body.get("errcode") == "M_TERMS_NOT_SIGNED":
                if not self._terms_logged:
                    self._terms_logged = True
                    log.error("upstream identity server %s requires its terms to be accepted "
                              "for [proxy] access_token; no lookups are proxied until then",
                              self.config.identity)
                raise TermsNotSigned("terms not signed")
            return resp.status, body

    def _session_or_start(self) -> aiohttp.ClientSession:
        if self._session is None:
            host = urlsplit(self.config.identity).hostname or ""
            try:
                literal = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                literal = None
            if literal is not None and not self._policy.is_allowed(literal):
                raise UpstreamError(
                    f"{host} is refused by ip.blacklist (add it to ip.whitelist)")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=PolicyResolver(self._policy),
                                               limit=16),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session


def _mappings(status: int, errcode: object, body: Any,
              asked: Container[str]) -> dict[str, str]:
    """The valid mappings of a /lookup answer, for the keys asked only."""
    if status != 200:
        raise UpstreamError(f"lookup answered {status} {errcode or ''}".strip())
    mappings = body.get("mappings") if isinstance(body, dict) else None
    if not isinstance(mappings, dict):
        raise UpstreamError("lookup answer has no mappings object")
    return {k: v for k, v in mappings.items()
            if k in asked and isinstance(v, str) and is_valid_mxid(v)}
