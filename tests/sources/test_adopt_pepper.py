"""[proxy] adopt_pepper: sha256 lookups, made as matrix-js-sdk makes them, answered by a
second kith on loopback as the upstream identity server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from base64 import urlsafe_b64encode
from typing import Any

import pytest
from aiohttp import web

import kith.server as kith_server
from kith.services.adopted_pepper import AdoptedPepper
from tests.conftest import KithFactory, RunningKith, free_port, wait_for
from tests.sources.test_upstream import fake_upstream, upstream_of

FAR, LOCAL, NOBODY = "far@example.org", "local@example.org", "nobody@example.org"


def sdk_hash(address: str, medium: str, pepper: str) -> str:
    """A lookup hash as matrix-js-sdk computes it (identityHashedLookup)."""
    digest = hashlib.sha256(f"{address.lower()} {medium} {pepper}".encode()).digest()
    return urlsafe_b64encode(digest).decode().rstrip("=")


async def hash_details(kith: RunningKith, token: str) -> dict[str, Any]:
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/hash_details",
                             headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def sdk_lookup(kith: RunningKith, token: str,
                     addresses: list[str]) -> tuple[int, dict[str, Any]]:
    """What matrix-js-sdk does: read hash_details, hash with its pepper, POST /lookup;
    the answer's mappings by address (or the error body)."""
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    hashes = {sdk_hash(address, "email", pepper): address for address in addresses}
    async with kith.http.post(f"{kith.base}/_matrix/identity/v2/lookup", json={
            "algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json()
        if resp.status != 200:
            return resp.status, body
        return 200, {hashes[h]: mxid for h, mxid in body["mappings"].items()}


def adopted_of(kith: RunningKith) -> AdoptedPepper:
    adopted = kith.server.services.lookup.adopted  # type: ignore[union-attr]
    assert adopted is not None
    return adopted


async def upstream_kith(kith_factory: KithFactory) -> tuple[RunningKith, str]:
    """The upstream: FAR bound only there, LOCAL bound to someone else; and the access
    token the proxying kith uses with it."""
    upstream: RunningKith = await kith_factory(name="upstream")
    await upstream.bind(FAR, "@far:hs.test")
    await upstream.bind(LOCAL, "@elsewhere:hs.test")
    return upstream, await upstream.register("proxy")


async def proxying_kith(kith_factory: KithFactory, identity: str, access_token: str = "",
                        name: str = "kith", **proxy: Any) -> tuple[RunningKith, str]:
    kith: RunningKith = await kith_factory({"proxy": {
        "identity": identity, "access_token": access_token, "timeout": 0.5,
        "breaker_failures": 3, **proxy}}, name=name)
    return kith, await kith.register("alice")


async def rotate_pepper(kith: RunningKith) -> tuple[int, str]:
    """`kith rotate-pepper` run on `kith`'s configuration: exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kith", "--config", kith.config.path, "rotate-pepper",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_sha256_lookups_unresolved_here_are_answered_by_the_upstream(
        kith_factory: KithFactory) -> None:
    upstream, access_token = await upstream_kith(kith_factory)
    kith, token = await proxying_kith(kith_factory, upstream.base, access_token)
    await kith.bind(LOCAL, "@local:hs.test")
    upstream_token = await upstream.register("bob")
    assert (await hash_details(kith, token))["lookup_pepper"] == \
        (await hash_details(upstream, upstream_token))["lookup_pepper"]

    assert await sdk_lookup(kith, token, [FAR, LOCAL, NOBODY]) == (200, {
        FAR: "@far:hs.test",  # bound only upstream
        LOCAL: "@local:hs.test",  # the local binding wins
    })
    client = upstream_of(kith)
    assert client.forwarded == 2  # FAR and NOBODY: LOCAL never left kith
    requests = client.requests
    assert await sdk_lookup(kith, token, [FAR, LOCAL, NOBODY]) == (200, {
        FAR: "@far:hs.test", LOCAL: "@local:hs.test"})
    assert client.requests == requests  # positive and negative answers are cached
    assert client.forwarded == 2


async def test_the_upstream_changing_its_pepper_costs_one_invalid_pepper(
        kith_factory: KithFactory) -> None:
    upstream, access_token = await upstream_kith(kith_factory)
    kith, token = await proxying_kith(kith_factory, upstream.base, access_token)
    await kith.bind(LOCAL, "@local:hs.test")
    old = (await hash_details(kith, token))["lookup_pepper"]
    assert await sdk_lookup(kith, token, [FAR, LOCAL]) == (200, {
        FAR: "@far:hs.test", LOCAL: "@local:hs.test"})

    assert (await rotate_pepper(upstream))[0] == 0
    upstream_token = await upstream.register("bob")

    async def upstream_announces_a_new_pepper() -> bool:
        return bool((await hash_details(upstream, upstream_token))["lookup_pepper"] != old)

    await wait_for("the upstream to announce its new pepper", upstream_announces_a_new_pepper)
    new = (await hash_details(upstream, upstream_token))["lookup_pepper"]
    # The client still has kith's old pepper: the upstream refuses it (for NOBODY, whose
    # answer is not cached), kith follows the upstream and says so with the spec's error,
    # naming the new pepper.
    status, body = await sdk_lookup(kith, token, [FAR, LOCAL, NOBODY])
    assert (status, body.get("errcode"), body.get("lookup_pepper"), body.get("algorithm")) \
        == (400, "M_INVALID_PEPPER", new, "sha256")
    # The client's retry reads hash_details again and finds both.
    assert (await hash_details(kith, token))["lookup_pepper"] == new
    assert await sdk_lookup(kith, token, [FAR, LOCAL, NOBODY]) == (200, {
        FAR: "@far:hs.test", LOCAL: "@local:hs.test"})


async def test_an_upstream_unreachable_at_start_is_adopted_on_a_later_start(
        kith_factory: KithFactory, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(logging.INFO, logger="kith.services.adopted_pepper")
    kith, token = await proxying_kith(kith_factory, dead)
    lines = [r for r in caplog.records if r.name == "kith.services.adopted_pepper"]
    assert len(lines) == 1 and "keeps its lookup pepper" in lines[0].getMessage()
    await kith.bind(LOCAL, "@local:hs.test")
    own = (await hash_details(kith, token))["lookup_pepper"]
    assert await sdk_lookup(kith, token, [FAR, LOCAL]) == (200, {LOCAL: "@local:hs.test"})
    assert upstream_of(kith).requests == 1  # the hash_details at start; no hash forwarded
    assert await adopted_of(kith).check() == 0  # still dead: no second log line
    assert len([r for r in caplog.records if r.name == "kith.services.adopted_pepper"]) == 1
    await kith.server.stop()

    # Started again (same store) with the upstream up: its pepper replaces kith's, and
    # what kith had bound is found under it.
    upstream, access_token = await upstream_kith(kith_factory)
    kith, token = await proxying_kith(kith_factory, upstream.base, access_token)
    adopted = (await hash_details(kith, token))["lookup_pepper"]
    assert adopted != own
    assert adopted == (await hash_details(upstream, await upstream.register("bob"))
                       )["lookup_pepper"]
    assert await sdk_lookup(kith, token, [FAR, LOCAL]) == (200, {
        FAR: "@far:hs.test", LOCAL: "@local:hs.test"})


async def test_an_upstream_offering_no_sha256_is_not_adopted(
        kith_factory: KithFactory) -> None:
    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/hash_details"):
            return web.json_response({"algorithms": ["none"], "lookup_pepper": "theirs"})
        body = await request.json()
        return web.json_response({"mappings": {a: "@far:hs.test" for a in body["addresses"]
                                               if a.startswith("far@")}})

    async with fake_upstream(answer) as url:
        kith, token = await proxying_kith(kith_factory, url)
        await kith.bind(LOCAL, "@local:hs.test")
        assert (await hash_details(kith, token))["lookup_pepper"] != "theirs"
        assert await sdk_lookup(kith, token, [FAR, LOCAL]) == (200, {LOCAL: "@local:hs.test"})
        assert upstream_of(kith).forwarded == 0
        # Plain-text lookups are still forwarded.
        assert await kith.lookup(token, "none", [f"{FAR} email"]) == {
            f"{FAR} email": "@far:hs.test"}


async def test_a_dead_or_slow_upstream_costs_at_most_the_timeout(
        kith_factory: KithFactory) -> None:
    slow = {"now": False}

    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/hash_details"):
            return web.json_response({"algorithms": ["sha256"], "lookup_pepper": "theirs"})
        if slow["now"]:
            await asyncio.sleep(5)
        return web.json_response({"mappings": {}})

    async with fake_upstream(answer) as url:
        kith, token = await proxying_kith(kith_factory, url)
        await kith.bind(LOCAL, "@local:hs.test")
        assert (await hash_details(kith, token))["lookup_pepper"] == "theirs"
        assert await sdk_lookup(kith, token, [FAR, LOCAL]) == (200, {LOCAL: "@local:hs.test"})
        slow["now"] = True
        started = time.monotonic()
        assert await sdk_lookup(kith, token, [NOBODY, LOCAL]) == (200, {
            LOCAL: "@local:hs.test"})
        assert time.monotonic() - started < 1.5  # the timeout is 0.5 s

    # The upstream gone: the breaker opens after three failures; local answers go on.
    client = upstream_of(kith)
    requests = client.requests
    for n in range(4):
        started = time.monotonic()
        assert await sdk_lookup(kith, token, [f"gone{n}@example.org", LOCAL]) == (200, {
            LOCAL: "@local:hs.test"})
        assert time.monotonic() - started < 1.5
    assert client.requests == requests + 2  # 3 failures in a row with the slow one: open


async def test_local_rotation_is_refused_while_the_upstream_owns_the_pepper(
        kith_factory: KithFactory, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    periods: list[float | None] = []  # what the server's pepper upkeep is asked to keep

    async def upkeep(store: Any, period_s: float | None) -> int:
        periods.append(period_s)
        return 0

    monkeypatch.setattr(kith_server, "pepper_upkeep", upkeep)
    upstream, access_token = await upstream_kith(kith_factory)
    kith: RunningKith = await kith_factory({
        "general": {"lookup_pepper.rotation": 1},
        "proxy": {"identity": upstream.base, "access_token": access_token}})
    assert "lookup_pepper.rotation is ignored" in caplog.text
    token = await kith.register("alice")
    pepper = (await hash_details(kith, token))["lookup_pepper"]
    status, err = await rotate_pepper(kith)
    assert status == 2 and "adopt_pepper" in err
    assert (await hash_details(kith, token))["lookup_pepper"] == pepper
    # The server still finishes interrupted changes, but makes no periodic one.
    await wait_for("the pepper upkeep of both servers", lambda: len(periods) >= 2)
    assert periods == [None, None]

