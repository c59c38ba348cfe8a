"""`kith rotate-pepper` while two workers answer lookups: every answer is checked against
the pepper it was asked with."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kith.config import load_config
from kith.threepid import lookup_hash
from tests.conftest import KithProcessFactory, serving, wait_for, write_config

V2 = "/_matrix/identity/v2"
BOUND = 200
ROTATIONS = 3


def rotate_pepper(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kith", "--config", str(config_path),
                           "rotate-pepper"], cwd=config_path.parent, capture_output=True,
                          text=True, timeout=60)


async def test_rotation_under_load_never_answers_wrongly(
        tmp_path: Path, kith_process: KithProcessFactory) -> None:
    async def userinfo(request: web.Request) -> web.Response:
        return web.json_response({"sub": request.query["access_token"]})

    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", userinfo)
    async with serving(app) as hs_url:
        path = write_config(tmp_path, {
            "general": {"workers": 2, "lookup.budget.account": 10_000_000,
                        "lookup.budget.ip": 10_000_000},
            "http": {"federation.test_overrides": f"hs.test={hs_url}"}})
        config = load_config(str(path), env={})
        proc = kith_process(path)
        proc.start(config.http.client_port)
        await check_rotation_under_load(
            path, f"http://127.0.0.1:{config.http.client_port}",
            f"http://127.0.0.1:{config.http.internal_port}/_matrix/identity/internal")


async def check_rotation_under_load(path: Path, base: str, internal: str) -> None:
    bound = {f"user{i}@example.com": f"@user{i}:hs.test" for i in range(BOUND)}
    # A new connection per request: the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True, limit=32)
    async with aiohttp.ClientSession(connector=connector) as http:
        for address, mxid in bound.items():
            async with http.post(f"{internal}/bind", json={
                    "medium": "email", "address": address, "mxid": mxid}) as r:
                assert r.status == 200
        async with http.post(f"{base}{V2}/account/register", json={
                "access_token": "@alice:hs.test", "matrix_server_name": "hs.test"}) as r:
            auth = {"Authorization": f"Bearer {(await r.json())['token']}"}

        async def hash_details() -> str:
            async with http.get(f"{base}{V2}/hash_details", headers=auth) as r:
                return str((await r.json())["lookup_pepper"])

        async def lookup(pepper: str, addresses: list[str]) -> tuple[int, Any]:
            hashes = {lookup_hash("email", a, pepper): a for a in addresses}
            async with http.post(f"{base}{V2}/lookup", headers=auth, json={
                    "algorithm": "sha256", "pepper": pepper,
                    "addresses": list(hashes)}) as r:
                body = await r.json()
            if r.status == 200:
                # Exactly the bound addresses asked, each with its own mxid.
                answered = {hashes[h]: mxid for h, mxid in body["mappings"].items()}
                assert answered == {a: bound[a] for a in addresses if a in bound}, pepper
            return r.status, body

        answered: dict[str, int] = {}
        refused = 0
        stop = asyncio.Event()

        async def client(n: int) -> None:
            nonlocal refused
            pepper = await hash_details()
            i = n
            while not stop.is_set():
                i += 7
                addresses = [f"user{(i + k) % BOUND}@example.com" for k in range(5)]
                addresses.append(f"nobody{i}@example.com")
                status, body = await lookup(pepper, addresses)
                if status == 200:
                    answered[pepper] = answered.get(pepper, 0) + 1
                    continue
                # Only a pepper that is no longer held is refused, with the new one.
                assert (status, body["errcode"]) == (400, "M_INVALID_PEPPER"), body
                assert body["lookup_pepper"] != pepper
                refused += 1
                pepper = body["lookup_pepper"]
                status, body = await lookup(pepper, addresses)  # the one retry
                assert status == 200, body

        first = await hash_details()
        clients = [asyncio.create_task(client(n)) for n in range(6)]
        try:
            await wait_for("lookups under way", lambda: sum(answered.values()) >= 20,
                           timeout_s=30)
            for _ in range(ROTATIONS):
                started = time.monotonic()
                result = await asyncio.to_thread(rotate_pepper, path)
                assert result.returncode == 0, result.stderr
                assert time.monotonic() - started < 30
            stop.set()
            await asyncio.gather(*clients)
        finally:
            stop.set()
            for task in clients:
                task.cancel()
        # Every worker announces the last pepper soon; lookups with it find everyone.
        last: set[str] = set()

        async def all_announce_one() -> bool:
            last.clear()
            for _ in range(8):
                last.add(await hash_details())
            return len(last) == 1 and first not in last

        await wait_for("every worker announces the new pepper", all_announce_one,
                       timeout_s=15)
        (pepper,) = last
        status, _ = await lookup(pepper, list(bound))
        assert status == 200
        assert len(answered) >= 2, answered  # lookups were answered under several peppers
