"""Tables, queries and migrations; SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import asyncio
from typing import Any

from kith.config import DbConfig
from kith.store.accounts import AccountRow, AccountStore
from kith.store.associations import AssociationRow, AssociationStore, IndexChange, OwnChange
from kith.store.database import (
    Database,
    DatabaseKind,
    StoreError,
    inspect_sqlite,
    is_storage_full,
    is_unreachable,
    make_self_contained,
    sqlite_path,
)
from kith.store.invites import DeliveryReport, InviteStore, InviteTokenRow, OnbindDelivery
from kith.store.locks import HeldLock, NamedLocks
from kith.store.peers import PushState, ReplicationPeerRow, ReplicationPeerStore
from kith.store.ratelimits import Charge, RateLimitStore, Refusal
from kith.store.sessions import ValidationSessionRow, ValidationSessionStore
from kith.store.state import ServerStateStore

__all__ = ["AccountRow", "AssociationRow", "Charge", "DatabaseKind", "DeliveryReport",
           "HeldLock", "IndexChange", "InviteTokenRow", "OnbindDelivery", "OwnChange",
           "PushState", "Refusal", "ReplicationPeerRow", "Store", "StoreError",
           "ValidationSessionRow", "inspect_sqlite", "is_storage_full", "is_unreachable",
           "make_self_contained", "sqlite_path"]


class Store:
    """Every store of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.associations = AssociationStore(db)
        self.accounts = AccountStore(db)
        self.state = ServerStateStore(db)
        self.sessions = ValidationSessionStore(db)
        self.invites = InviteStore(db)
        self.peers = ReplicationPeerStore(db)
        self.locks = NamedLocks(db)
        self.rate_limits = RateLimitStore(db)

    @classmethod
    async def open(cls, config: DbConfig, process_lock: Any = None) -> Store:
        """Open and migrate kith's database; a `StoreError` (and nothing written) if it is
        one kith must not write into, such as Sydent's (see `kith.services.sydent_takeover`
        for taking that over)."""
        path = sqlite_path(config)
        if path is not None and await asyncio.to_thread(inspect_sqlite, path) \
                is DatabaseKind.SYDENT:
            raise StoreError(f"{path}: is Sydent's database; kith takes it over when it "
                             "starts on it (`kith serve`), or imports it with `kith "
                             "import-sydent`, and never writes into it")
        db = Database.open(config, process_lock)
        await db.migrate()
        return cls(db)

    async def close(self) -> None:
        await self.db.close()
