"""SQL parameters (client secrets, tokens) stay out of the database errors kith may log."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from kith.store import Store

SECRET = "client-secret-that-must-not-be-quoted"


async def test_a_failing_statement_does_not_quote_its_parameters(store: Store) -> None:
    with pytest.raises(DBAPIError) as failed:
        async with store.db.engine.connect() as conn:
            await conn.execute(text("SELECT * FROM no_such_table WHERE secret = :secret"),
                               {"secret": SECRET})
    assert "no_such_table" in str(failed.value)
    assert SECRET not in str(failed.value)
