"""[proxy]: unresolved plain-text lookups asked of an upstream identity server.

These run with adopt_pepper off, as an operator who forwards plain-text lookups only
would; forwarded sha256 lookups are in test_adopt_pepper.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from kith.sources.upstream import UpstreamIdentityServer
from tests.conftest import KithFactory, RunningKith, free_port, serving, wait_for


def upstream_of(kith: RunningKith) -> UpstreamIdentityServer:
    upstream = kith.server.services.lookup.upstream  # type: ignore[union-attr]
    assert upstream is not None
    return upstream


@asynccontextmanager
async def fake_upstream(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app) as url:
        yield url


async def proxied_kith(kith_factory: KithFactory, identity: str,
                       **proxy: Any) -> tuple[RunningKith, str]:
    kith: RunningKith = await kith_factory({"proxy": {
        # (a timeout a loaded machine does not reach: the upstream kith answers from the
        # same event loop; the test of the timeout sets its own)
        "identity": identity, "timeout": 3, "breaker_failures": 3, "adopt_pepper": "false",
        **proxy}})
    token = await kith.register("alice")
    await kith.bind("local@example.org", "@local:hs.test")
    return kith, token


async def test_upstream_answers_what_no_local_source_knows(kith_factory: KithFactory) -> None:
    upstream: RunningKith = await kith_factory(name="upstream")
    await upstream.bind("far@example.org", "@far:hs.test")
    await upstream.bind("local@example.org", "@elsewhere:hs.test")
    await upstream.bind("15105550123", "@phone:hs.test", medium="msisdn")
    await upstream.bind("far@other.org", "@other:hs.test")
    access_token = await upstream.register("proxy")
    kith, token = await proxied_kith(kith_factory, upstream.base, access_token=access_token,
                                     mediums="email", email_domains="example.org")
    queries = ["far@example.org email", "local@example.org email", "15105550123 msisdn",
               "far@other.org email", "none@example.org email"]
    assert await kith.lookup(token, "none", queries) == {
        "far@example.org email": "@far:hs.test",
        "local@example.org email": "@local:hs.test",  # local before upstream
    }
    client = upstream_of(kith)
    assert client.forwarded == 2  # far@ and none@example.org; msisdn, other.org never
    requests = client.requests
    assert await kith.lookup(token, "none", queries) == {
        "far@example.org email": "@far:hs.test", "local@example.org email": "@local:hs.test"}
    assert client.requests == requests  # positive and negative answers are cached
    # Without adopt_pepper, sha256 lookups are never proxied (the upstream's pepper is
    # not ours).
    assert await kith.lookup(token, "sha256", ["x"]) == {}
    assert client.requests == requests


async def test_negative_answers_are_asked_again_sooner(kith_factory: KithFactory) -> None:
    upstream: RunningKith = await kith_factory(name="upstream")
    await upstream.bind("far@example.org", "@far:hs.test")
    kith, token = await proxied_kith(kith_factory, upstream.base,
                                     access_token=await upstream.register("proxy"),
                                     cache_ttl=300, negative_cache_ttl=0.2)
    queries = ["far@example.org email", "none@example.org email"]
    expected = {"far@example.org email": "@far:hs.test"}
    assert await kith.lookup(token, "none", queries) == expected
    client = upstream_of(kith)
    assert client.forwarded == 2

    async def asked_again() -> bool:
        assert await kith.lookup(token, "none", queries) == expected
        return client.forwarded > 2

    await wait_for("the negative answer to expire", asked_again)
    assert client.forwarded == 3  # only none@ went upstream again: far@ is still cached


async def test_unauthenticated_upstream_answers_nothing(kith_factory: KithFactory) -> None:
    upstream: RunningKith = await kith_factory(name="upstream")
    await upstream.bind("far@example.org", "@far:hs.test")
    kith, token = await proxied_kith(kith_factory, upstream.base, access_token="wrong")
    assert await kith.lookup(token, "none", ["far@example.org email", "local@example.org email"]) \
        == {"local@example.org email": "@local:hs.test"}


async def test_stopped_upstream_costs_only_its_part(kith_factory: KithFactory) -> None:
    kith, token = await proxied_kith(kith_factory, f"http://127.0.0.1:{free_port()}")
    for _ in range(4):
        assert await kith.lookup(token, "none", ["far@example.org email", "local@example.org email"]
                            ) == {"local@example.org email": "@local:hs.test"}
    client = upstream_of(kith)
    assert client.requests == 3  # the breaker opened after three failures in a row


async def test_slow_upstream_is_bounded_by_the_timeout(kith_factory: KithFactory) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async with fake_upstream(slow) as url:
        kith, token = await proxied_kith(kith_factory, url, timeout=0.5)
        started = time.monotonic()
        assert await kith.lookup(token, "none", ["far@example.org email", "local@example.org email"]
                            ) == {"local@example.org email": "@local:hs.test"}
        assert time.monotonic() - started < 2


@pytest.mark.parametrize("garbage", [
    b"not json", b"[]", b'{"algorithms": "sha256", "lookup_pepper": 3}',
    b'{"algorithms": ["md5"], "lookup_pepper": "p"}',
    b'{"algorithms": ["none"], "lookup_pepper": "p", "mappings": ["x"]}',
    b'{"algorithms": ["none"], "lookup_pepper": "p", "mappings": '
    b'{"far@example.org email": "not an mxid", "local@example.org email": "@evil:x.test"}}',
])
async def test_garbage_from_upstream_is_ignored(kith_factory: KithFactory,
                                                garbage: bytes) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=garbage, content_type="application/json")

    async with fake_upstream(answer) as url:
        kith, token = await proxied_kith(kith_factory, url)
        assert await kith.lookup(token, "none", ["far@example.org email", "local@example.org email"]
                            ) == {"local@example.org email": "@local:hs.test"}


async def test_invalid_pepper_refetches_once_and_redirects_are_not_followed(
        kith_factory: KithFactory) -> None:
    peppers = iter(["old", "new", "new"])
    current = {"pepper": "old"}

    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/hash_details"):
            current["pepper"] = next(peppers)
            return web.json_response({"algorithms": ["none"],
                                      "lookup_pepper": current["pepper"]})
        body = await request.json()
        if body["pepper"] != "new":
            return web.json_response({"errcode": "M_INVALID_PEPPER", "error": "rotated"},
                                     status=400)
        assert request.headers["Authorization"] == "Bearer upstream-token"
        return web.json_response({"mappings": {a: "@far:hs.test" for a in body["addresses"]}})

    async with fake_upstream(answer) as url:
        kith, token = await proxied_kith(kith_factory, url, access_token="upstream-token")
        assert await kith.lookup(token, "none", ["far@example.org email"]) == {
            "far@example.org email": "@far:hs.test"}

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:9/")

    async with fake_upstream(redirect) as url:
        kith, token = await proxied_kith(kith_factory, url)
        assert await kith.lookup(token, "none", ["far@example.org email"]) == {}


async def test_terms_not_signed_is_one_clear_log_line(
        kith_factory: KithFactory, caplog: pytest.LogCaptureFixture) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"errcode": "M_TERMS_NOT_SIGNED", "error": "sign"},
                                 status=403)

    async with fake_upstream(answer) as url:
        kith, token = await proxied_kith(kith_factory, url, breaker_failures=10)
        for n in range(2):
            assert await kith.lookup(token, "none", [f"far{n}@example.org email"]) == {}
    terms_lines = [r for r in caplog.records if r.name == "kith.sources.upstream"]
    assert len(terms_lines) == 1 and terms_lines[0].levelname == "ERROR"
    assert "far0@example.org" not in caplog.text and "far1@example.org" not in caplog.text


async def test_an_open_breaker_lets_one_trial_per_cooldown_through(
        kith_factory: KithFactory) -> None:
    up = {"now": False}

    async def answer(request: web.Request) -> web.Response:
        if not up["now"]:
            return web.json_response({"errcode": "M_UNKNOWN", "error": "down"}, status=500)
        if request.path.endswith("/hash_details"):
            return web.json_response({"algorithms": ["none"], "lookup_pepper": "p"})
        body = await request.json()
        return web.json_response({"mappings": {a: "@far:hs.test" for a in body["addresses"]}})

    async with fake_upstream(answer) as url:
        kith, token = await proxied_kith(kith_factory, url, breaker_failures=1,
                                         breaker_cooldown=2)
        client = upstream_of(kith)
        assert await kith.lookup(token, "none", ["far@example.org email"]) == {}
        requests = client.requests
        assert await kith.lookup(token, "none", ["far@example.org email"]) == {}
        assert client.requests == requests  # open: not asked
        up["now"] = True
        assert await wait_for("a trial to find the upstream answering", lambda: kith.lookup(
            token, "none", ["far@example.org email"]), timeout_s=15) == {
            "far@example.org email": "@far:hs.test"}
        assert await kith.lookup(token, "none", ["other@example.org email"]) == {
            "other@example.org email": "@far:hs.test"}  # closed: every lookup goes again
