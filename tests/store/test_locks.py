"""Database.try_hold: one holder at a time across processes sharing PostgreSQL."""

from kith.config import DbConfig
from kith.store import Store

KEY = 0x6B697400


async def test_one_holder_at_a_time(db_config: DbConfig) -> None:
    first, second = await Store.open(db_config), await Store.open(db_config)
    try:
        held = await first.db.try_hold(KEY)
        assert held is not None
        other = await second.db.try_hold(KEY)
        if first.db.dialect == "postgresql":
            assert other is None
            assert await second.db.try_hold(KEY + 1) is not None  # another lock is free
            await held.release()
            taken = await second.db.try_hold(KEY)
            assert taken is not None
            assert await first.db.try_hold(KEY) is None
            await taken.release()
        else:
            # One kith per SQLite file: its workers agree among themselves.
            assert other is not None
            await other.release()
            await held.release()
    finally:
        await first.close()
        await second.close()


async def test_a_closed_store_lets_go(db_config: DbConfig) -> None:
    first, second = await Store.open(db_config), await Store.open(db_config)
    try:
        assert await first.db.try_hold(KEY) is not None
        await first.close()  # as when a kith stops or dies: its connections close
        held = await second.db.try_hold(KEY)
        assert held is not None
        await held.release()
    finally:
        await second.close()
