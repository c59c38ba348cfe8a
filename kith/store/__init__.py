"""Tables, queries and migrations; SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

from typing import Any

from kith.config import DbConfig
from kith.store.accounts import AccountRow, AccountStore
from kith.store.associations import AssociationRow, AssociationStore, IndexChange
from kith.store.database import Database
from kith.store.invites import DeliveryReport, InviteStore, InviteTokenRow, OnbindDelivery
from kith.store.peers import ReplicationPeerRow, ReplicationPeerStore
from kith.store.sessions import ValidationSessionRow, ValidationSessionStore
from kith.store.state import ServerStateStore

__all__ = ["AccountRow", "AssociationRow", "DeliveryReport", "IndexChange", "InviteTokenRow",
           "OnbindDelivery", "ReplicationPeerRow", "Store", "ValidationSessionRow"]


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

    @classmethod
    async def open(cls, config: DbConfig, process_lock: Any = None) -> Store:
        db = Database.open(config, process_lock)
        await db.migrate()
        return cls(db)

    async def close(self) -> None:
        await self.db.close()
