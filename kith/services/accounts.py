"""Accounts: OpenID registration, access tokens, and consent to the terms."""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache

from kith.errors import (
    M_FORBIDDEN,
    M_TERMS_NOT_SIGNED,
    M_UNKNOWN,
    MatrixError,
    invalid_param,
    unauthorized,
)
from kith.federation.errors import HomeserverUnreachable, OpenIdTokenRejected
from kith.services.coherence import ChangeCounter
from kith.services.limits import Requester, SendLimits
from kith.services.terms import TermsSource
from kith.store import Store
from kith.threepid import is_valid_mxid, is_valid_server_name, mxid_server_name, now_ms

log = logging.getLogger(__name__)

TOKEN_ALPHABET = string.ascii_letters + string.digits
# How long a token → account answer is trusted without asking the store again.  Within
# one process a logout takes effect at once; other processes see it within this time.
TOKEN_CACHE_TTL_S = 10.0
TOKEN_CACHE_MAX = 100_000

UserInfo = Callable[[str, str], Awaitable[str]]


@dataclass(slots=True)
class Account:
    user_id: str
    consent_version: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AccountService:
    def __init__(
        self,
        store: Store,
        terms: TermsSource,
        openid_userinfo: UserInfo,
        homeserver_allow_list: frozenset[str] = frozenset(),
        changes: ChangeCounter | None = None,
        limits: SendLimits | None = None,
    ) -> None:
        self._store = store
        self._limits = limits
        self._terms = terms
        self._userinfo = openid_userinfo
        self._allow_list = homeserver_allow_list
        # token hash → account, for TOKEN_CACHE_TTL_S.
        self._tokens: TTLCache[str, Account] = TTLCache(TOKEN_CACHE_MAX, TOKEN_CACHE_TTL_S)
        # Bumped on logout and consent changes: other processes then drop their cache.
        self._changes = changes or ChangeCounter()
        self._seen_changes = self._changes.value()

    def _changed(self) -> None:
        self._changes.bump()
        self._seen_changes += 1

    async def register(self, matrix_server_name: str, openid_token: str,
                       requester: Requester | None = None) -> str:
        """Check the OpenID token with its homeserver; answer a new access token.

        Each registration makes kith ask a homeserver the caller names and stores a
        token, so one client address may register only so often (`client_ip.ratelimit`)."""
        if not is_valid_server_name(matrix_server_name):
            raise invalid_param("matrix_server_name is not a valid server name")
        if self._allow_list and matrix_server_name not in self._allow_list:
            raise MatrixError(403, M_FORBIDDEN,
                              "This homeserver is not allowed to register with this server")
        if self._limits is not None and requester is not None:
            await self._limits.hit((self._limits.register_ip, requester.ip))
        try:
            user_id = await self._userinfo(matrix_server_name, openid_token)
        except OpenIdTokenRejected as exc:
            raise unauthorized("The homeserver did not accept the OpenID token") from exc
        except HomeserverUnreachable as exc:
            log.warning("openid userinfo from %s failed: %s", matrix_server_name, exc)
            raise MatrixError(502, M_UNKNOWN,
                              f"Could not verify the OpenID token with {matrix_server_name}"
                              ) from exc
        if not is_valid_mxid(user_id) or mxid_server_name(user_id) != matrix_server_name:
            log.warning("homeserver %s vouched for foreign user ID %r",
                        matrix_server_name, user_id)
            raise unauthorized("The OpenID token names a user of another server")
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(64))
        await self._store.accounts.create_with_token(
            user_id, hash_token(token), now_ms())
        return token

    async def authenticate(self, token: str | None) -> Account:
        """The account that owns `token`, or 401 M_UNAUTHORIZED."""
        if not token:
            raise unauthorized("Missing access token")
        token_hash = hash_token(token)
        if self._changes.value() != self._seen_changes:
            self._seen_changes = self._changes.value()
            self._tokens.clear()
        try:
            return self._tokens[token_hash]
        except KeyError:
            pass
        row = await self._store.accounts.by_token_hash(token_hash)
        if row is None:
            self._tokens.pop(token_hash, None)
            raise unauthorized()
        account = Account(row.user_id, row.consent_version)
        self._tokens[token_hash] = account
        return account

    def require_consent(self, account: Account) -> None:
        master = self._terms.current().master_version
        if master is not None and account.consent_version != master:
            raise MatrixError(403, M_TERMS_NOT_SIGNED,
                              "Please accept our updated terms of service before continuing")

    async def logout(self, token: str) -> None:
        token_hash = hash_token(token)
        self._tokens.pop(token_hash, None)
        await self._store.accounts.delete_token(token_hash)
        self._changed()

    def forget_cached_tokens(self) -> None:
        """Tokens were deleted from the store by another path (erasure): drop every
        cached answer, here and in the other workers."""
        self._tokens.clear()
        self._changed()

    async def accept_terms(self, account: Account, urls: list[str]) -> None:
        terms = self._terms.current()
        unknown = set(urls) - terms.all_urls()
        if unknown:
            raise invalid_param(f"Unrecognised terms URL: {sorted(unknown)[0]}")
        accepted = await self._store.accounts.accepted_urls(account.user_id) | set(urls)
        version = terms.consent_version_for(accepted) if terms.master_version else None
        await self._store.accounts.accept_urls(account.user_id, urls, version)
        if version is not None:
            for cached in self._tokens.values():
                if cached.user_id == account.user_id:
                    cached.consent_version = version
            account.consent_version = version
            self._changed()
