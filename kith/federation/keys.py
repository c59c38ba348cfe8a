"""Fetching and caching homeservers' signing keys (server-server API v1.19).

A key comes straight from its server's `GET /_matrix/key/v2/server`, through
the FederationClient, so discovery, timeouts and the outbound address policy
apply.  A key is trusted only if the response names the requested server and
the key signed that response itself.  Misses on unknown key ids refetch at
most once a minute per server: the key id in an X-Matrix header is chosen by
whoever sends the request, and must not let them make kith hammer a server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from cachetools import TLRUCache, TTLCache
from signedjson.key import decode_verify_key_base64
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey

from kith.federation.client import FederationClient
from kith.federation.errors import FederationError

SERVER_KEYS_PATH = "/_matrix/key/v2/server"
ED25519 = "ed25519"
MAX_KEY_CACHE_S = 24 * 3600.0
REFETCH_INTERVAL_S = 60.0
MAX_CACHED_KEYS = 4096
MAX_TRACKED_SERVERS = 4096
# Signatures checked per response: each check re-encodes the whole response.
MAX_SIGNATURES_CHECKED = 8


class KeyFetchError(FederationError):
    """No trustworthy, current key for that server and key id."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _CachedKey:
    verify_key: VerifyKey
    expires_at: float


class ServerKeyFetcher:
    """Homeserver verify keys, fetched from the server itself, cached in memory."""

    def __init__(
        self,
        client: FederationClient,
        clock: Callable[[], float] = time.time,
        *,
        max_cached_keys: int = MAX_CACHED_KEYS,
    ) -> None:
        self._client = client
        self._clock = clock
        # (server name, key id) → key, until it expires.
        self._keys: TLRUCache[tuple[str, str], _CachedKey] = TLRUCache(
            max_cached_keys, _key_expires_at, clock)
        # Servers whose keys were fetched less than REFETCH_INTERVAL_S ago.
        self._fetched_recently: TTLCache[str, bool] = TTLCache(
            MAX_TRACKED_SERVERS, REFETCH_INTERVAL_S, clock)
        self._in_flight: dict[str, asyncio.Task[dict[str, _CachedKey]]] = {}

    async def get_verify_key(self, server_name: str, key_id: str) -> VerifyKey:
        """The current key `key_id` of `server_name`; raises KeyFetchError."""
        cached = self._keys.get((server_name, key_id))
        if cached is not None:
            return cached.verify_key
        fetch = self._in_flight.get(server_name)
        if fetch is None:
            if server_name in self._fetched_recently:
                raise KeyFetchError(
                    f"unknown key {key_id!r} for {server_name}; keys were fetched"
                    f" less than {REFETCH_INTERVAL_S:.0f} s ago"
                )
            self._fetched_recently[server_name] = True
            fetch = asyncio.create_task(self._fetch_keys(server_name, key_id))
            self._in_flight[server_name] = fetch
            fetch.add_done_callback(partial(self._fetch_done, server_name))
        # Shielded: one caller giving up must not cancel the fetch others await.
        fetched = (await asyncio.shield(fetch)).get(key_id)
        if fetched is None or fetched.expires_at <= self._clock():
            raise KeyFetchError(f"{server_name} does not publish a current key {key_id!r}")
        return fetched.verify_key

    def _fetch_done(self, server_name: str, fetch: asyncio.Task[dict[str, _CachedKey]]) -> None:
        self._in_flight.pop(server_name, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved even when every waiter gave up

    async def _fetch_keys(self, server_name: str, wanted_key_id: str) -> dict[str, _CachedKey]:
        try:
            status, body = await self._client.request_json(server_name, "GET", SERVER_KEYS_PATH)
        except FederationError as exc:
            raise KeyFetchError(f"cannot fetch keys of {server_name}: {exc}") from None
        if status != 200:
            raise KeyFetchError(f"{server_name} answered HTTP {status} to {SERVER_KEYS_PATH}")
        now = self._clock()
        keys, valid_until_s = _verified_keys(server_name, wanted_key_id, body, now)
        expires_at = min(valid_until_s, now + MAX_KEY_CACHE_S)
        fetched = {key_id: _CachedKey(key, expires_at) for key_id, key in keys.items()}
        for key_id, entry in reversed(fetched.items()):  # the wanted key (first) ends newest
            self._keys[(server_name, key_id)] = entry
        return fetched


def _key_expires_at(_id: tuple[str, str], entry: _CachedKey, _now: float) -> float:
    return entry.expires_at


def _verified_keys(
    server_name: str, wanted_key_id: str, body: Any, now: float
) -> tuple[dict[str, VerifyKey], float]:
    """The keys of `verify_keys` that validly self-signed the response, and until when."""
    if not isinstance(body, dict):
        raise KeyFetchError(f"key response of {server_name} is not a JSON object")
    if body.get("server_name") != server_name:
        raise KeyFetchError(f"key response of {server_name} names another server")
    valid_until_ts = body.get("valid_until_ts")
    if not isinstance(valid_until_ts, int) or isinstance(valid_until_ts, bool):
        raise KeyFetchError(f"key response of {server_name} has no valid_until_ts")
    valid_until_s = valid_until_ts / 1000
    if valid_until_s <= now:
        raise KeyFetchError(f"keys of {server_name} expired (valid_until_ts is past)")
    verify_keys = body.get("verify_keys")
    signatures = body.get("signatures")
    if not isinstance(verify_keys, dict):
        raise KeyFetchError(f"key response of {server_name} lacks verify_keys")
    own_signatures = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(own_signatures, dict):
        raise KeyFetchError(f"key response of {server_name} is not self-signed")
    signing_ids = [k for k in own_signatures if k in verify_keys and k.startswith(ED25519 + ":")]
    signing_ids.sort(key=lambda key_id: key_id != wanted_key_id)
    keys: dict[str, VerifyKey] = {}
    for key_id in signing_ids[:MAX_SIGNATURES_CHECKED]:
        verify_key = _decode_verify_key(server_name, key_id, verify_keys[key_id])
        try:
            verify_signed_json(body, server_name, verify_key)
        except (SignatureVerifyException, TypeError, ValueError):
            reason = f"bad self-signature by {key_id} on keys of {server_name}"
            raise KeyFetchError(reason) from None
        keys[key_id] = verify_key
    if not keys:
        raise KeyFetchError(f"key response of {server_name} is not self-signed")
    return keys, valid_until_s


def _decode_verify_key(server_name: str, key_id: str, entry: Any) -> VerifyKey:
    key_base64 = entry.get("key") if isinstance(entry, dict) else None
    version = key_id[len(ED25519) + 1 :]
    if not isinstance(key_base64, str) or not version:
        raise KeyFetchError(f"malformed key {key_id!r} in keys of {server_name}")
    try:
        return decode_verify_key_base64(ED25519, version, key_base64)
    except Exception:  # binascii, nacl and ValueError alike: the key is malformed
        raise KeyFetchError(f"malformed key {key_id!r} in keys of {server_name}") from None
