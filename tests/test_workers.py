"""Several worker processes: a bind or logout in one is seen by every other at once."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from kith.config import load_config
from kith.threepid import lookup_hash
from tests.conftest import KithProcessFactory, serving, wait_for, write_config

V2 = "/_matrix/identity/v2"


async def test_workers_share_binds_and_logouts(tmp_path: Path,
                                               kith_process: KithProcessFactory) -> None:
    async def userinfo(request: web.Request) -> web.Response:
        return web.json_response({"sub": request.query["access_token"]})

    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", userinfo)
    async with serving(app) as hs_url:
        await check_workers(tmp_path, hs_url, kith_process)


async def check_workers(tmp_path: Path, hs_url: str,
                        kith_process: KithProcessFactory) -> None:
    path = write_config(tmp_path, {
        "general": {"workers": 2},
        "http": {"federation.test_overrides": f"hs.test={hs_url}"}})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    proc.start(config.http.client_port)
    assert proc.proc is not None
    children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
    assert len(children) == 2
    base = f"http://127.0.0.1:{config.http.client_port}"
    internal = f"http://127.0.0.1:{config.http.internal_port}/_matrix/identity/internal"
    # A new connection per request, so the kernel spreads requests over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{base}{V2}/account/register", json={
                    "access_token": "@alice:hs.test", "matrix_server_name": "hs.test"}) as r:
                token = (await r.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{base}{V2}/hash_details", headers=auth) as r:
                pepper = (await r.json())["lookup_pepper"]
            for i in range(30):
                address = f"user{i}@example.com"
                async with http.post(f"{internal}/bind", json={
                        "medium": "email", "address": address,
                        "mxid": f"@user{i}:hs.test"}) as r:
                    assert r.status == 200
                h = lookup_hash("email", address, pepper)
                for _ in range(3):
                    async with http.post(f"{base}{V2}/lookup", headers=auth, json={
                            "algorithm": "sha256", "pepper": pepper, "addresses": [h]}) as r:
                        assert (await r.json())["mappings"] == {h: f"@user{i}:hs.test"}
                async with http.post(f"{internal}/unbind", json={
                        "medium": "email", "address": address,
                        "mxid": f"@user{i}:hs.test"}) as r:
                    assert r.status == 200
                async with http.post(f"{base}{V2}/lookup", headers=auth, json={
                        "algorithm": "sha256", "pepper": pepper, "addresses": [h]}) as r:
                    assert (await r.json())["mappings"] == {}
            async with http.post(f"{base}{V2}/account/logout", headers=auth) as r:
                assert r.status == 200
            for _ in range(10):
                async with http.get(f"{base}{V2}/account", headers=auth) as r:
                    assert r.status == 401
    finally:
        proc.kill(signal.SIGTERM)


async def test_workers_end_with_their_parent_even_killed(tmp_path: Path,
                                                         kith_process: KithProcessFactory) -> None:
    path = write_config(tmp_path, {"general": {"workers": 2}})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    proc.start(config.http.client_port)
    assert proc.proc is not None
    children = [int(pid) for pid in Path(
        f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()]
    assert len(children) == 2
    proc.kill(signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:  # a zombie (reaped by init soon) serves nothing either
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True
    await wait_for("both workers to end", lambda: all(map(gone, children)))
