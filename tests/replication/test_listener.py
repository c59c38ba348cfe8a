"""The replication listener on a running kith: what a peer's push stores, and every way a
push is refused (with nothing stored)."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from kith.threepid import lookup_hash
from tests.conftest import Homeserver, KithFactory, RunningKith, SmtpSink, wait_for
from tests.replication.conftest import MeshNode, association

pytestmark = pytest.mark.usefixtures("homeserver")


@pytest.fixture
async def receiver(kith_factory: KithFactory, node_a: MeshNode, stand_in: MeshNode,
                   smtp: SmtpSink) -> RunningKith:
    """kith as node A, with the stand-in as its only peer."""
    sections = node_a.sections(stand_in)
    sections["email"] = {"email.smtpport": smtp.port}
    return await kith_factory(sections)  # type: ignore[no-any-return]


async def found(kith: RunningKith, token: str, *addresses: str) -> dict[str, str]:
    """What a hashed lookup on `kith` answers for `addresses`, by address."""
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    hashes = {lookup_hash("email", a, pepper): a for a in addresses}
    return {hashes[h]: mxid for h, mxid in (await kith.lookup(token, "sha256",
                                                              list(hashes))).items()}


async def rows(kith: RunningKith) -> list[tuple[Any, ...]]:
    store = kith.server.store
    assert store is not None
    async with store.db.engine.connect() as conn:
        return list(await conn.execute(text(
            "SELECT id, address, mxid, origin_server, origin_id FROM threepid_associations "
            "ORDER BY id")))


async def test_a_push_is_found_by_lookups_and_is_idempotent(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    token = await receiver.register()
    push = {"3": stand_in.sign(association("Bob@Example.com", "@bob:hs.test", 1000)),
            "5": stand_in.sign(association("carol@example.com", "@carol:hs.test", 1001))}
    assert await stand_in.push(node_a, push) == (200, {"success": True})
    assert await found(receiver, token, "bob@example.com", "carol@example.com") == {
        "bob@example.com": "@bob:hs.test", "carol@example.com": "@carol:hs.test"}
    before = await rows(receiver)
    assert [r[1:] for r in before] == [
        ("bob@example.com", "@bob:hs.test", "peer.test", 3),
        ("carol@example.com", "@carol:hs.test", "peer.test", 5)]
    assert await stand_in.push(node_a, push) == (200, {"success": True})
    assert await rows(receiver) == before  # same origin, same id: nothing new


async def test_every_lookup_and_store_invite_see_a_peers_binding(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    token = await receiver.register()
    push = {"7": stand_in.sign(association("frank@example.com", "@frank:hs.test", 1234))}
    assert (await stand_in.push(node_a, push))[0] == 200
    assert await receiver.lookup(token, "none", ["frank@example.com email"]) == {
        "frank@example.com email": "@frank:hs.test"}
    async with receiver.http.get(f"{receiver.base}/_matrix/identity/api/v1/lookup",
                                 params={"medium": "email",
                                         "address": "frank@example.com"}) as resp:
        v1 = await resp.json()
    assert (v1["mxid"], v1["ts"]) == ("@frank:hs.test", 1234)  # the peer's association
    assert node_a.name in v1["signatures"]  # signed by this server, which answers
    async with receiver.http.post(f"{receiver.base}/_matrix/identity/api/v1/store-invite",
                                  json={"medium": "email", "address": "frank@example.com",
                                        "room_id": "!room:hs.test",
                                        "sender": "@alice:hs.test"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == "M_THREEPID_IN_USE"


async def test_newest_ts_wins_and_a_tombstone_removes_the_address(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    token = await receiver.register()
    await receiver.bind("dave@example.com", "@dave-here:hs.test")
    ours = (await rows(receiver))[-1]
    older = {"1": stand_in.sign(association("dave@example.com", "@dave-there:hs.test", 1))}
    assert (await stand_in.push(node_a, older))[0] == 200
    assert await found(receiver, token, "dave@example.com") == {
        "dave@example.com": "@dave-here:hs.test"}
    assert (await rows(receiver))[-1] == ours
    far_future = 2**50
    newer = {"2": stand_in.sign(association("dave@example.com", "@dave-there:hs.test",
                                            far_future))}
    assert (await stand_in.push(node_a, newer))[0] == 200
    assert await found(receiver, token, "dave@example.com") == {
        "dave@example.com": "@dave-there:hs.test"}
    unbind = {"4": stand_in.sign(association("dave@example.com", None, far_future + 1))}
    assert (await stand_in.push(node_a, unbind))[0] == 200
    assert await found(receiver, token, "dave@example.com") == {}


async def test_invites_waiting_here_are_delivered_when_a_peer_binds_the_address(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode,
        homeserver: Homeserver) -> None:
    async with receiver.http.post(f"{receiver.base}/_matrix/identity/api/v1/store-invite",
                                  json={"medium": "email", "address": "erin@example.com",
                                        "room_id": "!room:hs.test",
                                        "sender": "@alice:hs.test"}) as resp:
        assert resp.status == 200, await resp.text()
    push = {"9": stand_in.sign(association("erin@example.com", "@erin:hs.test", 1000))}
    assert (await stand_in.push(node_a, push))[0] == 200
    onbind = await wait_for("the onbind", lambda: homeserver.onbinds, timeout_s=20)
    assert onbind[0]["mxid"] == "@erin:hs.test"
    assert onbind[0]["address"] == "erin@example.com"
    assert [i["room_id"] for i in onbind[0]["invites"]] == ["!room:hs.test"]


# --------------------------------------------------------------------------- refusals


async def test_a_forged_signature_refuses_the_whole_push(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode, node_b: MeshNode) -> None:
    await receiver.bind("kept@example.com", "@kept:hs.test")
    before = await rows(receiver)
    forged = node_b.sign(association("mallory@example.com", "@mallory:hs.test", 2000))
    forged["signatures"] = {stand_in.name: forged["signatures"][node_b.name]}
    tampered = stand_in.sign(association("x@example.com", "@x:hs.test", 2000))
    tampered["mxid"] = "@mallory:hs.test"
    push = {"1": stand_in.sign(association("kept@example.com", None, 2**50)),  # tombstone
            "2": forged,
            "3": stand_in.sign(association("fine@example.com", "@fine:hs.test", 2000)),
            "10": tampered,
            "11": "not an association",
            "12": {k: v for k, v in stand_in.sign(association("y@example.com", "@y:hs.test",
                                                              1)).items() if k != "signatures"}}
    status, body = await stand_in.push(node_a, push)
    assert (status, body["errcode"]) == (400, "M_VERIFICATION_FAILED")
    assert body["failed_ids"] == ["2", "10", "11", "12"]
    assert await rows(receiver) == before  # the tombstone too


async def test_a_certificate_of_another_ca_or_none_is_refused_at_the_handshake(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    push = {"1": stand_in.sign(association("a@example.com", "@a:hs.test", 1))}
    foreign = stand_in.pki.certificate(stand_in.name, ca="other-ca")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await stand_in.push(node_a, push, certificate=foreign)
    anonymous = ssl.create_default_context(cafile=stand_in.pki.ca_file)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        async with aiohttp.ClientSession() as session:
            await session.post(f"{node_a.url}_matrix/identity/replicate/v1/push",
                               json={"sgAssocs": push}, ssl=anonymous)
    assert await rows(receiver) == []


async def test_an_unknown_common_name_is_an_unknown_peer(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode,
        caplog: pytest.LogCaptureFixture) -> None:
    push = {"1": stand_in.sign(association("a@example.com", "@a:hs.test", 1))}
    stranger = stand_in.pki.certificate("stranger.test")
    status, body = await stand_in.push(node_a, push, certificate=stranger)
    assert (status, body["errcode"]) == (403, "M_UNKNOWN_PEER")
    refusals = [r.getMessage() for r in caplog.records if "refused a push" in r.getMessage()]
    assert refusals == ["replication: refused a push from 127.0.0.1: its certificate names "
                        "'stranger.test', which is not a configured peer"]
    # A certificate made only for servers cannot be used to push at all.
    server_only = stand_in.pki.certificate(stand_in.name, usage="serverAuth")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await stand_in.push(node_a, push, certificate=server_only)
    assert await rows(receiver) == []


@pytest.mark.parametrize(("body", "content_type", "errcode"), [
    (b"not json", "application/json", "M_NOT_JSON"),
    (b'{"sgAssocs": {}}', "text/plain", "M_NOT_JSON"),
    (b'{"sgAssocs": ["x"]}', "application/json", "M_INVALID_PARAM"),
    (b'{"nothing": 1}', "application/json", "M_MISSING_PARAMS"),
    (b'{"sgAssocs": {"one": {}}}', "application/json", "M_BAD_JSON"),
])
async def test_a_body_that_is_not_a_push(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode, body: bytes,
        content_type: str, errcode: str) -> None:
    status, answer = await stand_in.push(node_a, body=body, content_type=content_type)
    assert (status, answer["errcode"]) == (400, errcode)
    assert await rows(receiver) == []


async def test_too_many_associations_in_one_push(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    signed = stand_in.sign(association("a@example.com", "@a:hs.test", 1))
    status, body = await stand_in.push(node_a, {str(i): signed for i in range(10_000)})
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")  # over the body limit
    status, body = await stand_in.push(node_a, {str(i): signed for i in range(1001)})
    assert (status, body["errcode"]) == (400, "M_TOO_LARGE")  # small, but too many
    assert await rows(receiver) == []


async def test_the_push_is_served_on_the_replication_port_only(
        receiver: RunningKith, node_a: MeshNode, stand_in: MeshNode) -> None:
    push = {"1": stand_in.sign(association("a@example.com", "@a:hs.test", 1))}
    async with receiver.http.post(
            f"{receiver.base}/_matrix/identity/replicate/v1/push",
            json={"sgAssocs": push}) as resp:
        assert resp.status == 404
    status, body = await stand_in.push(node_a, push, path="/_matrix/identity/v2")
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")
    assert await rows(receiver) == []
