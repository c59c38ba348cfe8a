"""Limits hold across worker processes and across instances sharing PostgreSQL: one
address gets no more mail than its limit, and a lookup budget spent anywhere is spent
everywhere."""

from __future__ import annotations

import functools
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kith.config import DbConfig, KithConfig, load_config
from kith.services.limits import Limit, now_us
from kith.store import Store
from tests.conftest import (
    KithFactory,
    KithProcessFactory,
    RunningKith,
    SmtpSink,
    serving,
    wait_for,
    write_config,
)

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"
ALICE = "@alice:hs.test"
BUDGET = 100  # addresses a minute per account: one every 0.6 s


@pytest.fixture
async def homeserver_url() -> AsyncIterator[str]:
    """A homeserver whose OpenID tokens are the user IDs they stand for."""
    async def userinfo(request: web.Request) -> web.Response:
        return web.json_response({"sub": request.query["access_token"]})

    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", userinfo)
    async with serving(app) as url:
        yield url


def worker_config(tmp_path: Path, smtp: SmtpSink, hs_url: str) -> KithConfig:
    path = write_config(tmp_path, {
        "general": {"workers": 2, "lookup.budget.account": BUDGET, "address_lookup_limit": 50,
                    "client_ip.ratelimit.burst": 1000},
        "http": {"federation.test_overrides": f"hs.test={hs_url}"},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port,
                  "email.ratelimit_sender.burst": 1000,
                  "email.ratelimit_recipient.burst": 3}})
    return load_config(str(path), env={})


async def request_token(http: aiohttp.ClientSession, base: str, n: int) -> int:
    async with http.post(f"{base}{V1}/validate/email/requestToken", json={
            "client_secret": f"secret-{n}", "email": "victim@example.com",
            "send_attempt": 1}) as resp:
        return resp.status


async def lookup(http: aiohttp.ClientSession, base: str, token: str, pepper: str,
                 addresses: int = 1) -> dict[str, Any]:
    async with http.post(f"{base}{V2}/lookup", headers={"Authorization": f"Bearer {token}"},
                         json={"algorithm": "none", "pepper": pepper,
                               "addresses": [f"a{n}@example.com email"
                                             for n in range(addresses)]}) as resp:
        body: dict[str, Any] = await resp.json()
        return {"status": resp.status, **body}


LOOKUP_BUDGET = Limit("lookup.account", BUDGET, BUDGET / 60)


async def spend_elsewhere(store: Store, user_id: str, addresses: int) -> None:
    """What another instance would write: `addresses` charged to the user's budget."""
    await store.rate_limits.add(
        {LOOKUP_BUDGET.bucket(user_id): LOOKUP_BUDGET.cost_us(addresses)}, now_us())


async def refused_everywhere(store: Store, user_id: str, check: Any) -> None:
    """Ask (`check`) until ten answers in a row are 429, then require twenty more.

    A worker may accept a lookup it had not seen spent elsewhere yet; each accepted one
    is waited for in the store (its worker's next flush), after which that worker knows
    the shared total.  So at most one is accepted per worker."""
    bucket = LOOKUP_BUDGET.bucket(user_id)
    accepted = 0

    async def flushed(since: int) -> bool:
        tat = await store.rate_limits.time_of(bucket) or 0
        return tat >= since + LOOKUP_BUDGET.cost_us(1)

    async def ten_refused() -> bool:
        nonlocal accepted
        for _ in range(10):
            before = await store.rate_limits.time_of(bucket) or 0
            answer = await check()
            if answer["status"] == 200:
                accepted += 1

                await wait_for("the worker's flush", functools.partial(flushed, before))
                return False
        return True

    await wait_for("every worker to refuse", ten_refused, timeout_s=20)
    assert accepted <= 2  # one per worker at most
    for _ in range(20):
        answer = await check()
        assert answer["status"] == 429 and answer["errcode"] == "M_LIMIT_EXCEEDED", answer
        assert answer["retry_after_ms"] > 0


async def test_workers_share_the_mail_limit_and_the_lookup_budget(
        tmp_path: Path, smtp: SmtpSink, homeserver_url: str,
        kith_process: KithProcessFactory) -> None:
    config = worker_config(tmp_path, smtp, homeserver_url)
    process = kith_process(Path(config.path))
    process.start(config.http.client_port)
    assert process.proc is not None
    children = Path(f"/proc/{process.proc.pid}/task/{process.proc.pid}/children") \
        .read_text().split()
    assert len(children) == 2
    base = f"http://127.0.0.1:{config.http.client_port}"
    # A new connection per request: the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    store = await Store.open(DbConfig(file=config.db.file))
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            statuses = [await request_token(http, base, n) for n in range(12)]
            assert sorted(statuses) == [200] * 3 + [429] * 9
            assert len(smtp.messages) == 3

            async with http.post(f"{base}{V2}/account/register", json={
                    "access_token": ALICE, "matrix_server_name": "hs.test"}) as resp:
                token = (await resp.json())["token"]
            async with http.get(f"{base}{V2}/hash_details",
                                headers={"Authorization": f"Bearer {token}"}) as resp:
                pepper = (await resp.json())["lookup_pepper"]
            for _ in range(20):  # both workers come to know alice's budget
                assert (await lookup(http, base, token, pepper))["status"] == 200
            # Another instance spends far more than the budget: every worker refuses.
            await spend_elsewhere(store, ALICE, 1000)
            await refused_everywhere(store, ALICE, lambda: lookup(http, base, token, pepper))
    finally:
        await store.close()
        process.kill(signal.SIGTERM)


@pytest.mark.postgres
async def test_instances_on_postgresql_share_limits(
        kith_factory: KithFactory, smtp: SmtpSink, postgresql_url: str) -> None:
    sections = {
        "db": {"db.url": postgresql_url},
        "general": {"lookup.budget.account": BUDGET, "address_lookup_limit": 50},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port,
                  "email.ratelimit_recipient.burst": 3}}
    first: RunningKith = await kith_factory(sections, name="first")
    second: RunningKith = await kith_factory(sections, name="second")
    statuses = [await request_token(kith.http, kith.base, n)
                for n, kith in enumerate([first, second] * 5)]
    assert statuses.count(200) == 3 and len(smtp.messages) == 3

    tokens = [await kith.register("alice") for kith in (first, second)]
    pepper = first.server.services.lookup.pepper  # type: ignore[union-attr]
    assert pepper == second.server.services.lookup.pepper  # type: ignore[union-attr]
    # 60 addresses through the first instance, shared by its flush; the second reads
    # the total at its own next flush (run here by hand instead of by its timer).
    for _ in range(6):
        assert (await lookup(first.http, first.base, tokens[0], pepper, 10))["status"] == 200
    assert (await lookup(second.http, second.base, tokens[1], pepper, 1))["status"] == 200
    for kith in (first, second):
        await kith.server.services.lookup.budget.flush()  # type: ignore[union-attr]
    answer = await lookup(second.http, second.base, tokens[1], pepper, 40)
    assert answer["status"] == 429, answer  # 61 + 40 > 100: the first's count counts
    assert (await lookup(second.http, second.base, tokens[1], pepper, 30))["status"] == 200
