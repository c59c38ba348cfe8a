"""onbind: a bind of an invited address tells the invitee's homeserver, durably.

The homeserver is a stand-in (aiohttp on 127.0.0.1, reached through
`federation.test_overrides`) that records every POST /3pid/onbind and can answer
errors or be down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from kith.config import load_config
from kith.server import KithServer
from kith.services.onbind import OnbindService, backoff_s
from kith.store import Store
from kith.store.associations import AssociationRow
from kith.store.invites import DONE, GAVE_UP, PENDING
from kith.threepid import lookup_hash
from tests.api.test_invites import mail_config, mailed_invite, store_invite
from tests.api.test_threepid import validated_session
from tests.api.test_validation import SECRET, call
from tests.conftest import (
    Homeserver,
    KithFactory,
    RunningKith,
    SmtpSink,
    free_port,
    wait_for,
    write_config,
)

ONBIND = "/_matrix/federation/v1/3pid/onbind"
BOB = "@bob:hs.test"


def onbind_outcomes(outcome: str) -> float:
    """kith_onbind_deliveries_total{outcome} (process-global: compare before/after)."""
    return REGISTRY.get_sample_value("kith_onbind_deliveries_total",
                                     {"outcome": outcome}) or 0.0


@dataclass
class OnbindHomeserver(Homeserver):
    """The conftest homeserver plus /3pid/onbind; `fail_with` statuses are answered
    first, in order, then 200."""

    port: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)  # every attempt
    delivered: list[dict[str, Any]] = field(default_factory=list)  # answered 200
    fail_with: list[int] = field(default_factory=list)
    always_fail: bool = False
    hang: asyncio.Event | None = None  # set: answer only once it is set, uncounted
    runner: web.AppRunner | None = None

    async def onbind(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if self.hang is not None:
            await asyncio.wait_for(self.hang.wait(), 30)
            return web.json_response({})
        if self.always_fail or self.fail_with:
            status = self.fail_with.pop(0) if self.fail_with else 500
            return web.json_response({"errcode": "M_UNKNOWN", "error": "no"}, status=status)
        self.delivered.append(body)
        return web.json_response({})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/_matrix/federation/v1/openid/userinfo", self.userinfo)
        app.router.add_post(ONBIND, self.onbind)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def homeserver() -> AsyncIterator[OnbindHomeserver]:
    """Overrides conftest's: kith_factory then talks to this one."""
    port = free_port()
    hs = OnbindHomeserver(server_name="hs.test", url=f"http://127.0.0.1:{port}", port=port)
    await hs.start()
    yield hs
    await hs.stop()


@pytest.fixture
async def mail_kith(kith_factory: KithFactory, smtp: SmtpSink) -> RunningKith:
    return await kith_factory(mail_config(smtp))  # type: ignore[no-any-return]


async def invite(kith: RunningKith, token: str, address: str = "bob@example.com",
                 room_id: str = "!room:hs.test") -> str:
    status, body = await store_invite(kith, token, address=address, room_id=room_id)
    assert status == 200, body
    return str(body["token"])


async def server_verify_key(kith: RunningKith) -> Any:
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/pubkey/ed25519:0") as r:
        key = (await r.json())["public_key"]
    return decode_verify_key_bytes("ed25519:0", decode_base64(key))


async def check_onbind_body(kith: RunningKith, body: dict[str, Any], address: str,
                            mxid: str, tokens: list[str]) -> None:
    """The signed association with its invites, every signature kith's."""
    verify_key = await server_verify_key(kith)
    verify_signed_json(body, "kith.test", verify_key)
    assert (body["medium"], body["address"], body["mxid"]) == ("email", address, mxid)
    assert sorted(i["token"] for i in body["invites"]) == sorted(tokens)
    for item in body["invites"]:
        assert (item["medium"], item["address"], item["mxid"]) == ("email", address, mxid)
        assert item["sender"] == "@alice:hs.test" and item["room_id"].startswith("!")
        signed = item["signed"]
        assert (signed["mxid"], signed["token"], signed["sender"]) == (
            mxid, item["token"], "@alice:hs.test")
        verify_signed_json(signed, "kith.test", verify_key)


async def start_kith(directory: Path, sections: dict[str, dict[str, Any]],
                     homeserver: OnbindHomeserver) -> RunningKith:
    """kith in-process on the config and store in `directory` (kept across restarts)."""
    config = load_config(str(write_config(directory, sections)), env={})
    server = KithServer(config)
    await server.start()
    return RunningKith(config, server, aiohttp.ClientSession(), homeserver)


async def stop_kith(kith: RunningKith) -> None:
    await kith.http.close()
    await kith.server.stop()


async def nothing_more_is_sent(kith: RunningKith, homeserver: OnbindHomeserver) -> None:
    """Once every delivery has its outcome, another pass of the deliverer sends nothing."""
    assert kith.server.services is not None and kith.server.services.onbind is not None
    sent = len(homeserver.received)
    assert await kith.server.services.onbind.deliver_due() == 0
    assert len(homeserver.received) == sent


async def deliveries(kith: RunningKith) -> list[tuple[int, str]]:
    assert kith.server.store is not None
    return [(d.attempts, state) for d, state in
            await kith.server.store.invites.deliveries()]


async def settled(kith: RunningKith, expected: list[tuple[int, str]],
                  timeout_s: float = 5.0) -> None:
    """The deliveries reach `expected` (the outcome is stored just after the answer)."""
    deadline = time.monotonic() + timeout_s
    while await deliveries(kith) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await deliveries(kith) == expected


# ------------------------------------------------------------------------------ tests

async def test_v2_bind_delivers_the_signed_invites(
        mail_kith: RunningKith, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    alice = await mail_kith.register("alice")
    tokens = [await invite(mail_kith, alice, room_id="!one:hs.test"),
              await invite(mail_kith, alice, address="Bob@Example.com",
                           room_id="!two:hs.test")]
    bob = await mail_kith.register("bob")
    sid = await validated_session(mail_kith, bob, smtp, email="bob@example.com")
    status, signed = await call(mail_kith, bob, "POST", "/3pid/bind", {
        "sid": sid, "client_secret": SECRET, "mxid": BOB})
    assert status == 200, signed
    # The bind answers the association with the invites, as the homeserver gets it.
    await check_onbind_body(mail_kith, signed, "bob@example.com", BOB, tokens)

    await wait_for("the onbind", lambda: homeserver.delivered)
    assert homeserver.delivered == [signed]
    await check_onbind_body(mail_kith, homeserver.delivered[0], "bob@example.com", BOB,
                            tokens)
    await settled(mail_kith, [(1, DONE)])
    # delete_tokens_on_bind (default true): the tokens are gone once delivered.
    status, body = await call(mail_kith, bob, "POST", "/sign-ed25519", {
        "mxid": BOB, "token": tokens[0], "private_key": mailed_invite(smtp, 0)[1]})
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")


async def test_internal_bind_delivers_and_later_binds_send_nothing(
        mail_kith: RunningKith, homeserver: OnbindHomeserver) -> None:
    alice = await mail_kith.register("alice")
    token = await invite(mail_kith, alice)
    signed = await mail_kith.bind("bob@example.com", BOB)
    assert [i["token"] for i in signed["invites"]] == [token]
    await wait_for("the onbind", lambda: homeserver.delivered)
    await check_onbind_body(mail_kith, homeserver.delivered[0], "bob@example.com", BOB,
                            [token])
    # Binding again (or elsewhere) carries no invites: each is sent once.
    again = await mail_kith.bind("bob@example.com", BOB)
    assert "invites" not in again
    plain = await mail_kith.bind("someone@example.com", "@someone:hs.test")
    assert "invites" not in plain
    await settled(mail_kith, [(1, DONE)])
    await nothing_more_is_sent(mail_kith, homeserver)
    assert len(homeserver.received) == 1


async def test_tokens_kept_when_delete_tokens_on_bind_is_off(
        kith_factory: KithFactory, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    kith = await kith_factory({**mail_config(smtp),
                               "general": {"delete_tokens_on_bind": "false"}})
    alice = await kith.register("alice")
    token = await invite(kith, alice)
    await kith.bind("bob@example.com", BOB)
    await wait_for("the onbind", lambda: homeserver.delivered)
    await settled(kith, [(1, DONE)])
    status, body = await call(kith, alice, "POST", "/sign-ed25519", {
        "mxid": BOB, "token": token, "private_key": mailed_invite(smtp)[1]})
    assert status == 200, body


async def test_errors_are_retried_and_delivered_once(
        mail_kith: RunningKith, homeserver: OnbindHomeserver) -> None:
    homeserver.fail_with = [500, 400]
    retries, delivered = onbind_outcomes("retry"), onbind_outcomes("delivered")
    alice = await mail_kith.register("alice")
    await invite(mail_kith, alice)
    signed = await mail_kith.bind("bob@example.com", BOB)
    # 500, then (1 s later) 400, then (2 s later) 200.
    await wait_for("the onbind after two errors", lambda: homeserver.delivered,
                   timeout_s=15)
    assert len(homeserver.received) == 3
    assert homeserver.delivered == [signed]
    await settled(mail_kith, [(3, DONE)])
    await nothing_more_is_sent(mail_kith, homeserver)
    assert len(homeserver.received) == 3
    assert (onbind_outcomes("retry"), onbind_outcomes("delivered")) == (retries + 2, delivered + 1)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_s(30) == backoff_s(1000) == 600


async def test_delivery_survives_a_restart_while_the_homeserver_is_down(
        tmp_path: Path, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    directory = tmp_path / "kith"
    directory.mkdir()
    sections = {**mail_config(smtp),
                "http": {"federation.test_overrides": f"hs.test={homeserver.url}"}}

    first = await start_kith(directory, sections, homeserver)
    try:
        alice = await first.register("alice")
        await invite(first, alice)
        await homeserver.stop()
        signed = await first.bind("bob@example.com", BOB)
        await settled(first, [(1, PENDING)])  # the first attempt met a closed port
    finally:
        await stop_kith(first)

    await homeserver.start()
    second = await start_kith(directory, sections, homeserver)
    try:
        await wait_for("the onbind after the restart", lambda: homeserver.delivered)
        assert homeserver.delivered == [signed]
        await settled(second, [(2, DONE)])
        assert len(homeserver.received) == 1
    finally:
        await stop_kith(second)


async def test_gives_up_after_the_configured_time(
        kith_factory: KithFactory, smtp: SmtpSink, homeserver: OnbindHomeserver,
        caplog: pytest.LogCaptureFixture) -> None:
    homeserver.always_fail = True
    gave_up = onbind_outcomes("gave_up")
    kith = await kith_factory({**mail_config(smtp),
                               "general": {"onbind.give_up_after": "1.5"}})
    alice = await kith.register("alice")
    await invite(kith, alice)
    with caplog.at_level(logging.WARNING, logger="kith.services.onbind"):
        await kith.bind("bob@example.com", BOB)
        record = await wait_for("the give-up warning", lambda: [
            r for r in caplog.records if "giving up" in r.getMessage()], timeout_s=15)
    assert record[0].levelno == logging.WARNING
    assert "hs.test" in record[0].getMessage() and BOB in record[0].getMessage()
    attempts = len(homeserver.received)
    assert attempts >= 2
    await settled(kith, [(attempts, GAVE_UP)])
    await nothing_more_is_sent(kith, homeserver)
    assert len(homeserver.received) == attempts
    assert onbind_outcomes("gave_up") == gave_up + 1


async def test_two_deliverers_send_each_row_once(
        kith_factory: KithFactory, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    """Workers sharing a database each run a deliverer: claims make them send once."""
    mail_kith = await kith_factory(mail_config(smtp, **{"email.ratelimit_sender.burst": 50}))
    server = mail_kith.server
    assert server.store is not None and server.services is not None
    assert server.federation is not None
    alice = await mail_kith.register("alice")
    others = [OnbindService(server.store, server.services.keys, server.federation,
                            give_up_after_s=60, delete_tokens=True) for _ in range(3)]
    for n in range(10):
        await invite(mail_kith, alice, address=f"user{n}@example.com")
    # Queue without waking the running deliverer, then race four deliverers.
    onbind = server.services.onbind
    assert onbind is not None
    for n in range(10):
        await onbind.attach_invites("email", f"user{n}@example.com", f"@user{n}:hs.test",
                                    {"medium": "email", "address": f"user{n}@example.com",
                                     "mxid": f"@user{n}:hs.test"})
    await asyncio.gather(*(other.deliver_due() for other in others))
    await wait_for("ten onbinds", lambda: len(homeserver.delivered) == 10)
    await settled(mail_kith, [(1, DONE)] * 10)
    await asyncio.gather(*(other.deliver_due() for other in others))
    await nothing_more_is_sent(mail_kith, homeserver)
    assert len(homeserver.received) == 10
    assert sorted(b["mxid"] for b in homeserver.delivered) == sorted(
        f"@user{n}:hs.test" for n in range(10))


async def test_an_invitee_bound_without_onbind_is_caught_up_at_start(
        tmp_path: Path, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    """A bind that stopped after storing the association and before queuing the onbind
    (a crash) is caught up by the sweep at the next start."""
    sections = {**mail_config(smtp),
                "http": {"federation.test_overrides": f"hs.test={homeserver.url}"}}
    first = await start_kith(tmp_path, sections, homeserver)
    try:
        alice = await first.register("alice")
        token = await invite(first, alice)
        assert first.server.services is not None
        pepper = first.server.services.lookup.pepper
    finally:
        await stop_kith(first)
    store = await Store.open(first.config.db)
    try:
        now = int(time.time() * 1000)
        await store.associations.write([AssociationRow(
            source="local", medium="email", address="bob@example.com", mxid=BOB, ts=now,
            not_before=now, not_after=now + 3600_000,
            lookup_hash=lookup_hash("email", "bob@example.com", pepper))])
        assert await store.invites.has_pending("email", "bob@example.com")
    finally:
        await store.close()
    second = await start_kith(tmp_path, sections, homeserver)
    try:
        await wait_for("the swept onbind", lambda: homeserver.delivered)
        await check_onbind_body(second, homeserver.delivered[0], "bob@example.com", BOB,
                                [token])
    finally:
        await stop_kith(second)


async def test_a_delivery_cut_short_by_a_stop_is_sent_after_restart(
        tmp_path: Path, smtp: SmtpSink, homeserver: OnbindHomeserver) -> None:
    """Stopping kith mid-request gives the claim back: the next start sends at once
    instead of waiting for the lease to run out."""
    directory = tmp_path / "kith"
    directory.mkdir()
    sections = {**mail_config(smtp),
                "http": {"federation.test_overrides": f"hs.test={homeserver.url}",
                         "federation.timeout": 20}}

    release = homeserver.hang = asyncio.Event()
    first = await start_kith(directory, sections, homeserver)
    try:
        alice = await first.register("alice")
        await invite(first, alice)
        signed = await first.bind("bob@example.com", BOB)
        await wait_for("the first request", lambda: homeserver.received)
    finally:
        await stop_kith(first)
    homeserver.hang = None
    release.set()

    started = time.monotonic()
    second = await start_kith(directory, sections, homeserver)
    try:
        await wait_for("the onbind after the restart", lambda: homeserver.delivered)
        assert time.monotonic() - started < 10  # not the 70 s lease
        assert homeserver.delivered == [signed]
        await settled(second, [(1, DONE)])
    finally:
        await stop_kith(second)



async def test_worker_processes_deliver_each_onbind_once(
        tmp_path: Path, smtp: SmtpSink, homeserver: OnbindHomeserver,
        kith_process: Callable[[Path], Any]) -> None:
    """Two workers: an invite stored by one is carried by a bind in the other at once
    (the shared counter), and every onbind is sent exactly once."""
    path = write_config(tmp_path, {
        **mail_config(smtp, **{"email.ratelimit_sender.burst": 50}),
        "general": {"workers": 2},
        "http": {"federation.test_overrides": f"hs.test={homeserver.url}"}})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    await asyncio.to_thread(proc.start, config.http.client_port)
    # A new connection per request, so the kernel spreads requests over both workers.
    kith = RunningKith(config, KithServer(config),
                       aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)),
                       homeserver)
    try:
        alice = await kith.register("alice")
        for n in range(8):
            await invite(kith, alice, address=f"user{n}@example.com")
            signed = await kith.bind(f"user{n}@example.com", f"@user{n}:hs.test")
            assert len(signed["invites"]) == 1, signed
        await wait_for("eight onbinds", lambda: len(homeserver.delivered) == 8)
        # Every delivery has its outcome in the shared store: no worker sends again.
        store = await Store.open(config.db)
        try:
            deadline = time.monotonic() + 10
            while [state for _, state in await store.invites.deliveries()] != [DONE] * 8:
                assert time.monotonic() < deadline, await store.invites.deliveries()
                await asyncio.sleep(0.05)
        finally:
            await store.close()
        assert len(homeserver.received) == 8
        assert sorted(b["mxid"] for b in homeserver.delivered) == sorted(
            f"@user{n}:hs.test" for n in range(8))
    finally:
        await kith.http.close()
        proc.kill(15)
