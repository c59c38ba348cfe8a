"""Store.locks: one holder of a named lock at a time across processes sharing PostgreSQL."""

from kith.config import DbConfig
from kith.store import Store
from kith.store.database import MIGRATION_LOCK_KEY, WRITE_LOCK_KEY
from kith.store.locks import lock_key

NAME = "test-lock"


async def test_one_holder_at_a_time(db_config: DbConfig) -> None:
    first, second = await Store.open(db_config), await Store.open(db_config)
    try:
        held = await first.locks.try_hold(NAME)
        assert held is not None
        other = await second.locks.try_hold(NAME)
        if first.db.dialect == "postgresql":
            assert other is None
            assert await second.locks.try_hold(NAME + "-other") is not None  # another is free
            await held.release()
            taken = await second.locks.try_hold(NAME)
            assert taken is not None
            assert await first.locks.try_hold(NAME) is None
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
        assert await first.locks.try_hold(NAME) is not None
        await first.close()  # as when a kith stops or dies: its connections close
        held = await second.locks.try_hold(NAME)
        assert held is not None
        await held.release()
    finally:
        await second.close()


def test_a_lock_key_is_stable_and_apart_from_the_store_s_own() -> None:
    # Instances of every kith version must agree on the key of a name.
    assert lock_key("ldap-sync") == 0x6B6974680CB306C6
    keys = {lock_key(name) for name in ("ldap-sync", "ldap-sync ", "test-lock", "")}
    assert len(keys) == 4
    assert all(2**32 <= key < 2**63 for key in keys)  # a bigint; never a store-internal key
    assert not keys & {MIGRATION_LOCK_KEY, WRITE_LOCK_KEY}
