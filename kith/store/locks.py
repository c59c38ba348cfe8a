"""Named locks that one process at a time holds among all sharing the database.

For work that one instance does for all (such as syncing a directory into the shared
tables).  On PostgreSQL a lock is a session advisory lock, held on a connection of its
own so that it is let go when the process dies; its key is derived from the name, so
every kith version agrees on it.  A SQLite file serves one kith, whose workers agree
among themselves, so there a lock is always granted; but work that a command may start
beside the running server (`across_processes`) is guarded there by a row naming the
holder's process id, taken over once that process is gone (a SQLite file is only ever
used from one host).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kith.store.database import Database
from kith.store.schema import server_state

log = logging.getLogger(__name__)

# The high half of every named lock's key: "kith" in ASCII.  The store's own advisory
# locks (migrations, group commits) are below 2**32, so they never meet a named one.
_NAMESPACE = 0x6B697468 << 32


def lock_key(name: str) -> int:
    """The PostgreSQL advisory-lock key (a positive bigint) of the lock `name`."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return _NAMESPACE | int.from_bytes(digest[:4], "big")


class HeldLock:
    """A lock from `NamedLocks.try_hold`, held until `release()` (or the process ends)."""

    def __init__(self, name: str, conn: AsyncConnection | None = None,
                 on_release: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self._conn = conn
        self._on_release = on_release

    async def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            await on_release()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"),
                               {"key": lock_key(self.name)})
            await conn.commit()
        except Exception as exc:  # noqa: BLE001 - a lost connection holds no lock anyway
            log.debug("releasing the lock %r: %s", self.name, exc)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


class NamedLocks:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def try_hold(self, name: str, *, across_processes: bool = False) -> HeldLock | None:
        """Hold the lock `name` until released, or None if another process holds it."""
        if self._db.dialect != "postgresql":
            return await self._row_lock(name) if across_processes else HeldLock(name)
        conn = await self._db.engine.connect()
        try:
            held = (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                       {"key": lock_key(name)})).scalar()
            await conn.commit()  # the session lock stays; the transaction must not
        except BaseException:
            await conn.close()
            raise
        if not held:
            await conn.close()
            return None
        return HeldLock(name, conn)

    async def _row_lock(self, name: str) -> HeldLock | None:
        key, me = f"lock.{name}", str(os.getpid())
        async with self._db.engine.begin() as conn:
            taken = await conn.execute(self._db.insert_or_ignore(server_state),
                                       {"name": key, "value": me})
            if not taken.rowcount:
                holder = (await conn.execute(select(server_state.c.value).where(
                    server_state.c.name == key))).scalar()
                if holder is None or holder == me or _alive(holder):
                    return None
                stolen = await conn.execute(update(server_state).where(
                    server_state.c.name == key, server_state.c.value == holder)
                    .values(value=me))
                if stolen.rowcount != 1:
                    return None

        async def let_go() -> None:
            async with self._db.engine.begin() as conn:
                await conn.execute(delete(server_state).where(
                    server_state.c.name == key, server_state.c.value == me))

        return HeldLock(name, on_release=let_go)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
