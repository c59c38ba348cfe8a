"""hash_details and lookup: sha256, none, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kith.services import lookup_table
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith

V2 = "/_matrix/identity/v2"


async def hash_details(kith: RunningKith, token: str) -> dict[str, Any]:
    async with kith.http.get(f"{kith.base}{V2}/hash_details",
                             headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def lookup(kith: RunningKith, token: str, body: object) -> tuple[int, dict[str, Any]]:
    async with kith.http.post(f"{kith.base}{V2}/lookup", json=body,
                              headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return resp.status, await resp.json()


async def test_hash_details(kith: RunningKith, token: str) -> None:
    details = await hash_details(kith, token)
    assert set(details["algorithms"]) == {"sha256", "none"}
    assert isinstance(details["lookup_pepper"], str) and details["lookup_pepper"]


async def test_hash_details_with_query_token_as_synapse_sends_it(kith: RunningKith,
                                                                 token: str) -> None:
    async with kith.http.get(f"{kith.base}{V2}/hash_details",
                             params={"access_token": token}) as resp:
        assert resp.status == 200


async def test_sha256_lookup_finds_bindings(kith: RunningKith, token: str) -> None:
    await kith.bind("alice@example.com", "@alice:hs.test")
    await kith.bind("18005552067", "@bob:hs.test", medium="msisdn")
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    alice = lookup_hash("email", "alice@example.com", pepper)
    bob = lookup_hash("msisdn", "18005552067", pepper)
    nobody = lookup_hash("email", "nobody@example.com", pepper)
    status, body = await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                              "addresses": [alice, bob, nobody]})
    assert status == 200
    assert body == {"mappings": {alice: "@alice:hs.test", bob: "@bob:hs.test"}}


async def test_lookups_answered_by_the_compiled_probe(kith_factory: KithFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Small installations are answered from a dict; here every map is arrays from the
    start, so that what clients send reaches the compiled probe: hits, misses, strings
    that are no hash (the client's own), after binds, unbinds, and a start that reads
    the store."""
    assert lookup_table.COMPILED
    monkeypatch.setattr(lookup_table, "ARRAYS_FROM", 0)
    kith = await kith_factory()
    token = await kith.register()
    for i in range(40):
        await kith.bind(f"user{i}@example.com", f"@user{i}:hs.test")
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    bound = [lookup_hash("email", f"user{i}@example.com", pepper) for i in range(40)]
    odd = ["", "x" * 43, "\x00" * 43, "é" * 43, bound[0][:-1] + "=", bound[1][:42] + "\n",
           bound[2][:42] + "B", bound[3] + "A", "+" * 43, "a" * 42 + "é"]
    asked = bound + [lookup_hash("email", "nobody@example.com", pepper)] + odd + bound[:5]
    want = {h: f"@user{i}:hs.test" for i, h in enumerate(bound)}
    for batch in (asked, asked[:1], asked[40:], asked * 15):
        status, body = await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                                  "addresses": batch})
        assert status == 200
        assert body == {"mappings": {h: m for h, m in want.items() if h in batch}}
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "user7@example.com",
            "mxid": "@user7:hs.test"}) as resp:
        assert resp.status == 200
    await kith.bind("user8@example.com", "@someone.else:hs.test")
    del want[bound[7]]
    want[bound[8]] = "@someone.else:hs.test"
    assert (await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                       "addresses": asked}))[1] == {"mappings": want}
    again = await kith_factory({"db": {"db.file": kith.config.db.file}}, name="again")
    token = await again.register()
    assert (await lookup(again, token, {"algorithm": "sha256", "pepper": pepper,
                                        "addresses": asked}))[1] == {"mappings": want}


async def test_bind_stores_casefolded_email(kith: RunningKith, token: str) -> None:
    signed = await kith.bind("Alice@Example.COM", "@alice:hs.test")
    assert signed["address"] == "alice@example.com"
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    h = lookup_hash("email", "alice@example.com", pepper)
    assert (await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                       "addresses": [h]}))[1]["mappings"] == {
        h: "@alice:hs.test"}


async def test_none_lookup(kith: RunningKith, token: str) -> None:
    await kith.bind("alice@example.com", "@alice:hs.test")
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    status, body = await lookup(kith, token, {
        "algorithm": "none", "pepper": pepper,
        "addresses": ["alice@example.com email", "bob@example.com email", "junk",
                      "alice@example.com msisdn", ""]})
    assert status == 200
    assert body == {"mappings": {"alice@example.com email": "@alice:hs.test"}}


async def test_unbind_removes_from_lookup_at_once(kith: RunningKith, token: str) -> None:
    await kith.bind("alice@example.com", "@alice:hs.test")
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "alice@example.com",
            "mxid": "@alice:hs.test"}) as resp:
        assert resp.status == 200
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    h = lookup_hash("email", "alice@example.com", pepper)
    assert (await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                       "addresses": [h]}))[1] == {"mappings": {}}


async def test_wrong_pepper(kith: RunningKith, token: str) -> None:
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    status, body = await lookup(kith, token, {"algorithm": "sha256", "pepper": "stale",
                                              "addresses": []})
    assert status == 400
    assert body["errcode"] == "M_INVALID_PEPPER"
    assert body["lookup_pepper"] == pepper and body["algorithm"] == "sha256"


async def test_made_up_peppers_spend_the_budget_and_share_reads(
        kith_factory: KithFactory) -> None:
    """A pepper the process does not hold is looked for in the store (another process
    may just have announced it): each such lookup costs one address of the budget, and
    lookups in flight at once share one read of the store."""
    kith = await kith_factory({"general": {"address_lookup_limit": 10,
                                           "lookup.budget.account": 10}})
    token = await kith.register("alice")
    for i in range(10):
        status, body = await lookup(kith, token, {"algorithm": "sha256",
                                                  "pepper": f"made-up-{i}", "addresses": []})
        assert (status, body["errcode"]) == (400, "M_INVALID_PEPPER")
    status, body = await lookup(kith, token, {"algorithm": "sha256", "pepper": "made-up",
                                              "addresses": []})
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")

    services = kith.server.services
    state = kith.server.store.state
    reads = 0
    get_many = state.get_many

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await get_many(*args, **kwargs)

    state.get_many = counted
    try:
        held = await asyncio.gather(*(services.lookup.peppers.accepts(f"made-up-{i}")
                                      for i in range(50)))
    finally:
        del state.get_many
    assert not any(held)
    # The first read, and one more for the lookups that came while it ran.
    assert reads == 2


async def test_unknown_algorithm(kith: RunningKith, token: str) -> None:
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    status, body = await lookup(kith, token, {"algorithm": "md5", "pepper": pepper,
                                              "addresses": []})
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


async def test_more_addresses_than_the_limit(kith_factory: KithFactory) -> None:
    kith = await kith_factory({"general": {"address_lookup_limit": 3}})
    token = await kith.register("alice")
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    status, body = await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                              "addresses": ["a", "b", "c", "d"]})
    assert (status, body["errcode"]) == (400, "M_TOO_LARGE")
    assert "3" in body["error"]
    status, _ = await lookup(kith, token, {"algorithm": "sha256", "pepper": pepper,
                                           "addresses": ["a", "b", "c"]})
    assert status == 200


@pytest.mark.parametrize("body,errcode", [
    ({}, "M_MISSING_PARAMS"),
    ({"algorithm": "sha256", "pepper": "p"}, "M_MISSING_PARAMS"),
    ({"algorithm": "sha256", "addresses": []}, "M_MISSING_PARAMS"),
    ({"pepper": "p", "addresses": []}, "M_MISSING_PARAMS"),
    ({"algorithm": 1, "pepper": "p", "addresses": []}, "M_INVALID_PARAM"),
    ({"algorithm": "sha256", "pepper": None, "addresses": []}, "M_INVALID_PARAM"),
    ({"algorithm": "sha256", "pepper": "p", "addresses": "abc"}, "M_INVALID_PARAM"),
    ({"algorithm": "sha256", "pepper": "p", "addresses": [1, 2]}, "M_INVALID_PARAM"),
    ([1], "M_BAD_JSON"),
    (42, "M_BAD_JSON"),
])
async def test_lookup_bad_bodies(kith: RunningKith, token: str, body: object,
                                 errcode: str) -> None:
    status, answer = await lookup(kith, token, body)
    assert (status, answer["errcode"]) == (400, errcode), answer


@pytest.mark.parametrize("raw,errcode", [
    (b"", "M_NOT_JSON"), (b"{]", "M_NOT_JSON"), (b"addresses", "M_NOT_JSON"),
    (b"\x00\x01", "M_NOT_JSON"), (b"null", "M_BAD_JSON"), (b'"text"', "M_BAD_JSON"),
])
async def test_lookup_not_json(kith: RunningKith, token: str, raw: bytes, errcode: str) -> None:
    async with kith.http.post(f"{kith.base}{V2}/lookup", data=raw, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == errcode
