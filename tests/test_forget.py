"""`kith forget`: erasing a user, or one address, while two workers serve.

Everything about the user is made through the API of a running kith (with two workers),
then `kith forget` runs as a separate process, as an operator would run it: its dry run
changes nothing, the real run removes everything in one go, every worker's lookups and
token checks stop answering for the user, other users keep theirs, and a second run
finds nothing."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from kith.config import KithConfig, load_config
from kith.store import AssociationRow, Store
from kith.store.schema import (
    accepted_terms_urls,
    account_tokens,
    accounts,
    invite_tokens,
    onbind_deliveries,
    threepid_associations,
    threepid_validation_sessions,
)
from kith.threepid import lookup_hash
from tests.api.test_terms import TERMS
from tests.api.test_validation import mailed_token
from tests.conftest import (
    Homeserver,
    KithProcessFactory,
    SmtpSink,
    wait_for,
    write_config,
)

V2 = "/_matrix/identity/v2"
ALICE, BOB = "@alice:hs.test", "@bob:hs.test"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"db.file": tmp_path / "kith.db"}
    return {"db.url": request.getfixturevalue("postgresql_url")}


def forget(config: KithConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kith", "--config", config.path, "forget",
                           *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(config.path).parent)


class Client:
    """Calls to the running kith, each on a new connection so both workers answer."""

    def __init__(self, http: aiohttp.ClientSession, config: KithConfig) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{config.http.client_port}"
        self.internal = f"http://127.0.0.1:{config.http.internal_port}"

    async def call(self, method: str, path: str, body: Any = None, token: str = "",
                   expect: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.base + path, json=body,
                                     headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == expect, (path, resp.status, answer)
            return answer

    async def register(self, hs: Homeserver, localpart: str) -> str:
        answer = await self.call("POST", f"{V2}/account/register", {
            "access_token": hs.issue(localpart), "token_type": "Bearer",
            "matrix_server_name": hs.server_name, "expires_in": 3600})
        return str(answer["token"])

    async def status(self, token: str) -> int:
        async with self.http.get(f"{self.base}{V2}/account",
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status

    async def lookup(self, token: str, *threepids: tuple[str, str]) -> dict[str, str]:
        pepper = (await self.call("GET", f"{V2}/hash_details", token=token))["lookup_pepper"]
        hashes = {lookup_hash(m, a, pepper): a for m, a in threepids}
        answer = await self.call("POST", f"{V2}/lookup", {
            "algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)}, token=token)
        return {hashes[h]: mxid for h, mxid in answer["mappings"].items()}


async def count(store: Store, table: Any, *where: Any) -> int:
    async with store.db.engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(table).where(*where))).scalar() or 0)


async def test_forget_a_user_and_an_address_with_two_workers(
        tmp_path: Path, kith_process: KithProcessFactory, homeserver: Homeserver,
        smtp: SmtpSink, db_section: dict[str, Any]) -> None:
    (tmp_path / "terms.yaml").write_text(TERMS)
    path = write_config(tmp_path, {
        "general": {"workers": 2, "terms.path": tmp_path / "terms.yaml"},
        "db": db_section,
        "email": {"email.smtpport": smtp.port},
        "http": {"federation.test_overrides": f"{homeserver.server_name}={homeserver.url}"},
    })
    config = load_config(str(path), env={})
    kith = kith_process(path)
    kith.start(config.http.client_port)
    alice_mail, alice_phone = ("email", "alice@example.org"), ("msisdn", "447700900123")
    bob_mail, carol_mail = ("email", "bob@example.org"), ("email", "carol@example.org")
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as http:
        c = Client(http, config)
        alice, bob = await c.register(homeserver, "alice"), await c.register(homeserver, "bob")
        for token in (alice, bob):
            await c.call("POST", f"{V2}/terms", {"user_accepts": [
                "https://example.org/privacy-1.1-en.html",
                "https://example.org/tos-2.0-en.html"]}, token=token)
        # Bob invites alice's address before she binds it (an onbind delivery follows),
        # and carol's, who never binds; alice invites someone too.
        for sender, token, address in ((BOB, bob, alice_mail[1]),
                                       (BOB, bob, carol_mail[1]),
                                       (ALICE, alice, "dave@example.org")):
            await c.call("POST", f"{V2}/store-invite", {
                "medium": "email", "address": address, "room_id": "!room:hs.test",
                "sender": sender}, token=token)
        sid = (await c.call("POST", f"{V2}/validate/email/requestToken", {
            "client_secret": "alice-secret", "email": alice_mail[1], "send_attempt": 1},
            token=alice))["sid"]
        await c.call("POST", f"{V2}/validate/email/submitToken", {
            "sid": sid, "client_secret": "alice-secret", "token": mailed_token(smtp)},
            token=alice)
        await c.call("POST", f"{V2}/3pid/bind", {
            "sid": sid, "client_secret": "alice-secret", "mxid": ALICE}, token=alice)
        await wait_for("the onbind callback", lambda: homeserver.onbinds)
        for medium, address, mxid in (("msisdn", alice_phone[1], ALICE),
                                      ("email", bob_mail[1], BOB)):
            async with http.post(f"{c.internal}/_matrix/identity/internal/bind", json={
                    "medium": medium, "address": address, "mxid": mxid}) as resp:
                assert resp.status == 200
        everyone = (alice_mail, alice_phone, bob_mail)
        assert await c.lookup(bob, *everyone) == {
            alice_mail[1]: ALICE, alice_phone[1]: ALICE, bob_mail[1]: BOB}

        # An association of alice's a replication peer owns.
        store = await Store.open(config.db)
        try:
            pepper = (await c.call("GET", f"{V2}/hash_details", token=bob))["lookup_pepper"]
            await store.associations.write_replicated([AssociationRow(
                source="local", medium="email", address="alice@peer.example", mxid=ALICE,
                ts=1, not_before=1, not_after=2**40,
                lookup_hash=lookup_hash("email", "alice@peer.example", pepper),
                origin_server="peer.test", origin_id=7)])
            before = await store.associations.max_id()

            dry = forget(config, ALICE, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert dry.stdout.splitlines()[0] == f"{ALICE}: would remove:"
            for line in ("  binding email alice@example.org -> @alice:hs.test",
                         "  binding msisdn 447700900123 -> @alice:hs.test",
                         "  binding email alice@peer.example -> @alice:hs.test (replicated "
                         "from peer.test: forget it there too)",
                         "  1 validation sessions", "  1 pending invites the user sent",
                         "  1 onbind deliveries", "  1 account", "  1 access tokens",
                         "  2 terms acceptances"):
                assert line in dry.stdout.splitlines(), dry.stdout
            assert await store.associations.max_id() == before
            assert await c.status(alice) == 200
            assert await c.lookup(bob, *everyone) == {
                alice_mail[1]: ALICE, alice_phone[1]: ALICE, bob_mail[1]: BOB}

            done = forget(config, ALICE)
            assert done.returncode == 0, done.stderr
            assert done.stdout.replace("removed:", "would remove:") == dry.stdout

            # Every worker stops answering for alice (new connections: both answer).
            async def alice_gone() -> bool:
                answers = [await c.lookup(bob, *everyone) for _ in range(6)]
                return all(a == {bob_mail[1]: BOB} for a in answers)
            await wait_for("lookups to stop answering for alice", alice_gone, timeout_s=5)

            async def token_refused() -> bool:
                return [await c.status(alice) for _ in range(6)] == [401] * 6
            await wait_for("alice's token to be refused", token_refused, timeout_s=15)
            assert await c.status(bob) == 200

            alice_addresses = [alice_mail[1], alice_phone[1], "alice@peer.example"]
            a = threepid_associations
            assert await count(store, a, a.c.mxid == ALICE) == 0
            assert await count(store, a, a.c.address.in_(alice_addresses),
                               a.c.mxid.is_(None)) == 3
            assert await count(store, a, a.c.mxid == BOB) == 1
            s = threepid_validation_sessions
            assert await count(store, s, s.c.address.in_(alice_addresses)) == 0
            i = invite_tokens
            assert await count(store, i, i.c.sender == ALICE) == 0
            assert await count(store, i, i.c.address == alice_mail[1]) == 0
            assert await count(store, i, i.c.address == carol_mail[1]) == 1
            assert await count(store, onbind_deliveries, onbind_deliveries.c.mxid == ALICE) \
                == 0
            for table in (accounts, account_tokens, accepted_terms_urls):
                assert await count(store, table, table.c.user_id == ALICE) == 0
                assert await count(store, table, table.c.user_id == BOB) >= 1
            # Peers learn of alice's own bindings' end as of an unbind; the association
            # the peer owns keeps its origin and is not pushed back to anyone.
            pushed = {(ch.address, ch.mxid) for ch in await store.associations.own_changes(
                before, 100)}
            assert pushed == {(alice_mail[1], None), (alice_phone[1], None)}
            replicated = await store.associations.get("local", "email", "alice@peer.example")
            assert replicated is not None
            assert (replicated.mxid, replicated.origin_server, replicated.origin_id) == (
                None, "peer.test", 7)

            again = forget(config, ALICE)
            assert (again.returncode, again.stdout) == (
                0, f"{ALICE}: nothing is held; nothing removed\n")

            # One address: carol's pending invite, whoever sent it.
            carol = forget(config, "--address", "email", "Carol@Example.org")
            assert carol.returncode == 0, carol.stderr
            assert carol.stdout.splitlines() == [
                "email Carol@Example.org: removed:", "  1 pending invites to these addresses"]
            assert await count(store, i, i.c.address == carol_mail[1]) == 0
            bob_address = forget(config, "--address", *bob_mail)
            assert "  binding email bob@example.org -> @bob:hs.test" in bob_address.stdout
            await wait_for("bob's address to stop answering",
                           lambda: asyncio.ensure_future(_empty(c, bob, bob_mail)),
                           timeout_s=5)
        finally:
            await store.close()

    bad = forget(config, "--address", "email", "not an address")
    assert bad.returncode == 1 and "M_INVALID_PARAM" in bad.stderr
    neither = forget(config)
    assert neither.returncode == 2 and "either a Matrix ID or --address" in neither.stderr
    assert re.search(r"M_INVALID_PARAM", forget(config, "not-an-mxid").stderr)


async def _empty(c: Client, token: str, threepid: tuple[str, str]) -> bool:
    return await c.lookup(token, threepid) == {}
