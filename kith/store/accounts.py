"""Accounts, their access tokens (stored hashed) and accepted terms URLs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, delete, insert, select, update

from kith.store.database import Database
from kith.store.schema import accepted_terms_urls, account_tokens, accounts


@dataclass(frozen=True, slots=True)
class AccountRow:
    user_id: str
    created_ts: int
    consent_version: str | None


class AccountStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert_account = db.insert_or_ignore(accounts)
        self._insert_token = insert(account_tokens)
        self._delete_token = delete(account_tokens).where(
            account_tokens.c.token_hash == bindparam("h"))
        self._insert_url = db.insert_or_ignore(accepted_terms_urls)
        self._set_consent = update(accounts).where(
            accounts.c.user_id == bindparam("uid")).values(consent_version=bindparam("v"))

    async def create_with_token(self, user_id: str, token_hash: str, now_ms: int) -> None:
        """Create the account if it is new, and add one token to it."""
        async with self._db.engine.begin() as conn:
            await conn.execute(self._insert_account,
                               {"user_id": user_id, "created_ts": now_ms,
                                "consent_version": None})
            await conn.execute(self._insert_token,
                               {"token_hash": token_hash, "user_id": user_id,
                                "created_ts": now_ms})

    async def by_token_hash(self, token_hash: str) -> AccountRow | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(
                select(accounts.c.user_id, accounts.c.created_ts, accounts.c.consent_version)
                .join(account_tokens, account_tokens.c.user_id == accounts.c.user_id)
                .where(account_tokens.c.token_hash == token_hash)
            )).first()
        return AccountRow(*row) if row else None

    async def delete_token(self, token_hash: str) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(self._delete_token, {"h": token_hash})

    async def accepted_urls(self, user_id: str) -> set[str]:
        async with self._db.engine.connect() as conn:
            rows = await conn.execute(
                select(accepted_terms_urls.c.url).where(accepted_terms_urls.c.user_id == user_id))
            return {r[0] for r in rows}

    async def accept_urls(self, user_id: str, urls: list[str], consent_version: str | None) -> None:
        """Add accepted URLs and, when given, record the consent version reached."""
        async with self._db.engine.begin() as conn:
            if urls:
                await conn.execute(self._insert_url,
                                   [{"user_id": user_id, "url": u} for u in urls])
            if consent_version is not None:
                await conn.execute(self._set_consent, {"uid": user_id, "v": consent_version})

    async def import_accounts(self, rows: list[AccountRow], tokens: list[tuple[str, str]],
                              accepted: list[tuple[str, str]]) -> None:
        """Add accounts, (token hash, user_id) pairs and (user_id, url) acceptances that
        are not there yet (taking over another server's data; idempotent)."""
        async with self._db.engine.begin() as conn:
            if rows:
                await conn.execute(self._insert_account, [
                    {"user_id": r.user_id, "created_ts": r.created_ts,
                     "consent_version": r.consent_version} for r in rows])
            if tokens:
                await conn.execute(self._db.insert_or_ignore(account_tokens), [
                    {"token_hash": h, "user_id": u, "created_ts": 0} for h, u in tokens])
            if accepted:
                await conn.execute(self._insert_url,
                                   [{"user_id": u, "url": url} for u, url in accepted])
