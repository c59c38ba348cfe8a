"""Two kith instances (separate processes) on one PostgreSQL database behave as one: what
one binds the other finds within a second, sessions, invites, tokens and keys are
shared, and what must be sent once (mail, onbind) is sent once.  When PostgreSQL goes
away under load, an instance answers 503 M_UNKNOWN (never a stale "not found"), loses no
acknowledged bind, and serves again when it returns, without a restart."""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from signedjson.key import encode_signing_key_base64, generate_signing_key

from kith.config import DbConfig, KithConfig, load_config
from kith.services.coherence import STALE_AFTER_S
from kith.store import Store
from kith.threepid import lookup_hash
from tests.conftest import (
    Homeserver,
    KithProcess,
    KithProcessFactory,
    SmtpSink,
    wait_for,
    write_config,
)
from tests.pg import PostgresCluster

pytestmark = pytest.mark.postgres

V2 = "/_matrix/identity/v2"
INTERNAL = "/_matrix/identity/internal"
SECRET = "instances-secret"


@dataclass
class Instance:
    """One kith process and a client for its client and internal APIs."""

    config: KithConfig
    process: KithProcess
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.config.http.client_port}"

    @property
    def internal(self) -> str:
        return f"http://127.0.0.1:{self.config.http.internal_port}"

    async def call(self, method: str, path: str, body: Any = None,
                   token: str | None = None, base: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, (base or self.base) + path, json=body,
                                     headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def bind(self, address: str, mxid: str) -> tuple[int, Any]:
        return await self.call("POST", f"{INTERNAL}/bind", {
            "medium": "email", "address": address, "mxid": mxid}, base=self.internal)

    async def unbind(self, address: str, mxid: str) -> tuple[int, Any]:
        return await self.call("POST", f"{INTERNAL}/unbind", {
            "medium": "email", "address": address, "mxid": mxid}, base=self.internal)

    async def lookup(self, token: str, pepper: str,
                     addresses: list[str]) -> tuple[int, Any]:
        hashes = [lookup_hash("email", a, pepper) for a in addresses]
        return await self.call("POST", f"{V2}/lookup", {
            "algorithm": "sha256", "pepper": pepper, "addresses": hashes}, token)

    async def pepper(self) -> str:
        status, body = await self.call("GET", f"{V2}/hash_details", token=await self.token())
        assert status == 200, body
        return str(body["lookup_pepper"])

    _token: str | None = None

    async def token(self) -> str:
        """An access token registered on this instance (once)."""
        if self._token is None:
            self._token = await register(self, "alice")
        return self._token


async def register(instance: Instance, localpart: str) -> str:
    """A kith access token, through the OpenID flow against the homeserver stand-in."""
    homeserver = HOMESERVERS[0]
    status, body = await instance.call("POST", f"{V2}/account/register", {
        "access_token": homeserver.issue(localpart), "token_type": "Bearer",
        "matrix_server_name": homeserver.server_name, "expires_in": 3600})
    assert status == 200, body
    return str(body["token"])


HOMESERVERS: list[Homeserver] = []


@pytest.fixture
async def start_instances(tmp_path: Path, homeserver: Homeserver, smtp: SmtpSink,
                          kith_process: KithProcessFactory
                          ) -> AsyncIterator[Callable[..., Any]]:
    """Start kith processes sharing `db_url` and one signing key (as an operator
    configures several instances: [crypto] is the same everywhere)."""
    HOMESERVERS[:] = [homeserver]
    key = generate_signing_key("0")
    key_text = f"ed25519 0 {encode_signing_key_base64(key)}"
    sessions: list[aiohttp.ClientSession] = []

    async def start(db_url: str, names: tuple[str, ...] = ("a", "b")) -> list[Instance]:
        instances = []
        for name in names:
            directory = tmp_path / name
            directory.mkdir()
            path = write_config(directory, {
                "db": {"db.url": db_url},
                "crypto": {"ed25519.signingkey": key_text},
                "general": {"client_ip.ratelimit.burst": 100000,
                            "lookup.budget.account": 10**7, "lookup.budget.ip": 10**7},
                "http": {"federation.test_overrides":
                         f"{homeserver.server_name}={homeserver.url}"},
                "email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}})
            config = load_config(str(path), env={})
            process = kith_process(path)
            await asyncio.to_thread(process.start, config.http.client_port)
            http = aiohttp.ClientSession()
            sessions.append(http)
            instances.append(Instance(config, process, http))
        return instances

    yield start
    for http in sessions:
        await http.close()


async def found_on(instance: Instance, token: str, pepper: str, address: str,
                   mxid: str | None) -> bool:
    status, body = await instance.lookup(token, pepper, [address])
    assert status == 200, body
    return bool(body["mappings"].get(lookup_hash("email", address, pepper)) == mxid)


async def test_two_instances_on_one_postgresql_behave_as_one(
        postgresql_url: str, start_instances: Callable[..., Any], smtp: SmtpSink,
        homeserver: Homeserver) -> None:
    a, b = await start_instances(postgresql_url)
    # One pepper, one signing key, one account: a token issued by A works on B.
    pepper = await a.pepper()
    token = await a.token()
    b._token = token
    assert await b.pepper() == pepper
    assert (await a.call("GET", f"{V2}/pubkey/ed25519:0"))[1] == \
        (await b.call("GET", f"{V2}/pubkey/ed25519:0"))[1]

    # A bind on A is found on B within a second (INDEX_FOLLOW_INTERVAL_S decides).
    delays = []
    for i in range(20):
        address, mxid = f"seen{i}@example.com", f"@seen{i}:hs.test"
        status, body = await a.bind(address, mxid)
        assert status == 200, body
        bound = time.monotonic()
        await wait_for("B to find it", partial(found_on, b, token, pepper, address, mxid),
                       timeout_s=1.0, poll_s=0.01)
        delays.append(time.monotonic() - bound)
    print(f"bind on A -> found on B: median {statistics.median(delays) * 1000:.0f} ms, "
          f"max {max(delays) * 1000:.0f} ms over {len(delays)}")

    # An unbind on B is gone from A's answers as quickly.
    assert (await b.unbind("seen0@example.com", "@seen0:hs.test"))[0] == 200
    await wait_for("A to forget it",
                   lambda: found_on(a, token, pepper, "seen0@example.com", None),
                   timeout_s=1.0, poll_s=0.01)

    # A session requested on A (one mail) is validated and bound on B; A finds it.
    status, body = await a.call("POST", f"{V2}/validate/email/requestToken", {
        "client_secret": SECRET, "email": "carol@example.com", "send_attempt": 1}, token)
    assert status == 200, body
    sid = body["sid"]
    await wait_for("the validation mail", lambda: len(smtp.messages) == 1)
    code = re.search(r"token=([A-Za-z0-9]{32})", smtp.messages[0][1])
    assert code
    status, body = await b.call("POST", f"{V2}/validate/email/submitToken", {
        "sid": sid, "client_secret": SECRET, "token": code.group(1)}, token)
    assert status == 200 and body == {"success": True}, body
    # The same send_attempt on B sends nothing again: the session is shared.
    status, body = await b.call("POST", f"{V2}/validate/email/requestToken", {
        "client_secret": SECRET, "email": "carol@example.com", "send_attempt": 1}, token)
    assert status == 200 and body["sid"] == sid, body
    status, body = await b.call("POST", f"{V2}/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": "@alice:hs.test"}, token)
    assert status == 200, body
    await wait_for("A to find carol",
                   lambda: found_on(a, token, pepper, "carol@example.com", "@alice:hs.test"),
                   timeout_s=1.0, poll_s=0.01)

    # An invite stored on A (one mail) is delivered once when the address is bound on B.
    status, body = await a.call("POST", f"{V2}/store-invite", {
        "medium": "email", "address": "dave@example.com", "room_id": "!room:hs.test",
        "sender": "@alice:hs.test"}, token)
    assert status == 200, body
    await wait_for("the invite mail", lambda: len(smtp.messages) == 2)
    assert smtp.messages[1][0] == ["dave@example.com"]
    status, body = await b.call("POST", f"{V2}/store-invite", {
        "medium": "email", "address": "dave@example.com", "room_id": "!other:hs.test",
        "sender": "@alice:hs.test"}, token)
    assert status == 200, body
    await wait_for("the second invite mail", lambda: len(smtp.messages) == 3)
    assert (await b.bind("dave@example.com", "@dave:hs.test"))[0] == 200
    await wait_for("the onbind", lambda: homeserver.onbinds, timeout_s=15)
    store = await Store.open(DbConfig(file="", url=postgresql_url))
    try:
        async def delivered() -> bool:
            return [state for _, state in await store.invites.deliveries()] == ["done"]
        await wait_for("the delivery to be done", delivered, timeout_s=15)
    finally:
        await store.close()
    # ...and both invites went to the homeserver in one onbind, by one instance.
    assert len(homeserver.onbinds) == 1, homeserver.onbinds
    assert len(homeserver.onbinds[0]["invites"]) == 2
    assert len(smtp.messages) == 3


async def test_an_instance_that_loses_postgresql_answers_503_and_recovers(
        own_postgresql_server: PostgresCluster, start_instances: Callable[..., Any]) -> None:
    pg = own_postgresql_server
    pg.psql("CREATE DATABASE kith")
    a, b = await start_instances(pg.url("kith"))
    pepper = await a.pepper()
    token = await a.token()
    b._token = token
    pids = [a.process.proc.pid, b.process.proc.pid]
    acknowledged: list[tuple[str, str]] = []
    refused: list[tuple[int, Any]] = []
    stop_load = asyncio.Event()

    async def bind_load(instance: Instance, name: str) -> None:
        n = 0
        while not stop_load.is_set():
            n += 1
            address, mxid = f"{name}{n}@example.com", f"@{name}{n}:hs.test"
            try:
                status, body = await instance.bind(address, mxid)
            except aiohttp.ClientError as exc:  # pragma: no cover - reported below
                refused.append((0, repr(exc)))
                continue
            if status == 200:
                acknowledged.append((address, mxid))
            else:
                refused.append((status, body))
                await asyncio.sleep(0.01)  # a client backing off before it retries

    load = [asyncio.create_task(bind_load(instance, f"{name}{worker}-"))
            for name, instance in (("a", a), ("b", b)) for worker in range(4)]
    try:
        await wait_for("binds under load", lambda: len(acknowledged) >= 200, timeout_s=30)
        known = acknowledged[0]
        await asyncio.to_thread(pg.halt)
        halted = time.monotonic()

        # Lookups on both instances answer 503 M_UNKNOWN, within STALE_AFTER_S at most.
        async def unavailable(instance: Instance) -> bool:
            status, body = await instance.lookup(token, pepper, [known[0]])
            if status == 200:
                assert body["mappings"], "a bound address answered 'not found'"
                return False
            assert (status, body["errcode"]) == (503, "M_UNKNOWN"), (status, body)
            return True
        for instance in (a, b):
            await wait_for("a 503 lookup", partial(unavailable, instance),
                           timeout_s=STALE_AFTER_S + 2)
        print(f"lookups answer 503 {time.monotonic() - halted:.2f} s after PostgreSQL "
              "stopped")
        down = len(refused)
        await wait_for("binds refused while PostgreSQL is down",
                       lambda: len(refused) > down + 20, timeout_s=10)
        for instance in (a, b):  # and stay 503, never a stale answer, while it is down
            assert await unavailable(instance)

        await asyncio.to_thread(pg.resume)
        resumed = time.monotonic()
        async def served(instance: Instance) -> bool:
            status, body = await instance.lookup(token, pepper, [known[0]])
            if status == 503:
                return False
            assert status == 200 and body["mappings"], (status, body)
            return True
        for instance in (a, b):
            await wait_for("lookups served again", partial(served, instance), timeout_s=15)
        serving = len(acknowledged)
        await wait_for("binds acknowledged again", lambda: len(acknowledged) > serving + 100,
                       timeout_s=15)
        print(f"serving again {time.monotonic() - resumed:.2f} s after PostgreSQL returned")
    finally:
        stop_load.set()
        await asyncio.gather(*load)

    # Nothing but the documented 503 M_UNKNOWN while it was down; both still the same
    # processes; every acknowledged bind is in the store and found on both instances.
    assert {(status, body["errcode"]) for status, body in refused} == {(503, "M_UNKNOWN")}
    assert [a.process.proc.pid, b.process.proc.pid] == pids
    print(f"{len(acknowledged)} binds acknowledged, {len(refused)} refused with 503")
    async def all_found(instance: Instance) -> bool:
        for start in range(0, len(acknowledged), 500):
            chunk = acknowledged[start:start + 500]
            status, body = await instance.lookup(token, pepper, [addr for addr, _ in chunk])
            assert status == 200, body
            expected = {lookup_hash("email", addr, pepper): mxid for addr, mxid in chunk}
            if body["mappings"] != expected:
                missing = set(expected) - set(body["mappings"])
                print(f"{instance.base}: {len(missing)} missing")
                return False
        return True
    for instance in (a, b):  # (the last binds of the other instance within a second)
        await wait_for("every acknowledged bind", partial(all_found, instance), timeout_s=5)
    for instance in (a, b):
        instance.process.kill(signal.SIGTERM)
