"""Fixtures for store tests: a `db_config` and an open `store` on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kith.config import DbConfig
from kith.store import Store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_config(request: pytest.FixtureRequest, tmp_path: Path) -> DbConfig:
    """An empty database of each backend."""
    if request.param == "sqlite":
        return DbConfig(file=str(tmp_path / "kith.db"))
    return DbConfig(url=request.getfixturevalue("postgresql_url"))


@pytest.fixture
async def store(db_config: DbConfig) -> AsyncIterator[Store]:
    opened = await Store.open(db_config)
    try:
        yield opened
    finally:
        await opened.close()
