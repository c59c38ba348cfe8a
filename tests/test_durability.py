"""An acknowledged bind survives kill -9 of the server process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from kith.config import load_config
from kith.store import Store
from kith.threepid import lookup_hash
from tests.conftest import KithProcessFactory, wait_for, write_config


async def test_acknowledged_binds_survive_sigkill(tmp_path: Path,
                                                  kith_process: KithProcessFactory) -> None:
    path = write_config(tmp_path, {})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    proc.start(config.http.client_port)
    internal = f"http://127.0.0.1:{config.http.internal_port}/_matrix/identity/internal"
    acked: list[int] = []

    async def bind(session: aiohttp.ClientSession, i: int) -> None:
        async with session.post(f"{internal}/bind", json={
                "medium": "email", "address": f"user{i}@example.com",
                "mxid": f"@user{i}:hs.test"}) as resp:
            if resp.status == 200:
                await resp.json()
                acked.append(i)

    async with aiohttp.ClientSession() as session:
        # Binds in flight when the process dies: those acknowledged must all be kept.
        tasks = [asyncio.create_task(bind(session, i)) for i in range(400)]
        try:
            # Poll often: the kill must come while most of the rest are in flight.
            await wait_for("150 acknowledged binds", lambda: len(acked) >= 150,
                           timeout_s=60, poll_s=0.005)
        finally:
            proc.kill(signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert 150 <= len(acked) < 400, "the kill must come while binds are in flight"

    proc.start(config.http.client_port)
    proc.kill(signal.SIGTERM)
    store = await Store.open(config.db)
    try:
        pepper = await store.state.get("lookup_pepper")
        assert pepper
        for i in acked:
            row = await store.associations.get("local", "email", f"user{i}@example.com")
            assert row is not None and row.mxid == f"@user{i}:hs.test"
            assert row.lookup_hash == lookup_hash("email", f"user{i}@example.com", pepper)
    finally:
        await store.close()
