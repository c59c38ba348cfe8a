"""Element's lookups through a proxying kith: matrix-js-sdk looks up addresses on a kith
whose [proxy] upstream is a second kith on loopback, and follows the upstream's change of
pepper the way Element does (its lookup fails once with M_INVALID_PEPPER; the next one
reads hash_details again)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import KithFactory, wait_for
from tests.e2e.element_sdk import ElementSdk, SdkError
from tests.sources.test_adopt_pepper import (
    FAR,
    LOCAL,
    NOBODY,
    hash_details,
    proxying_kith,
    rotate_pepper,
    upstream_kith,
)

pytestmark = pytest.mark.e2e


async def bulk_lookup(sdk: ElementSdk, token: str, addresses: list[str]) -> set[tuple[str, ...]]:
    """bulkLookupThreePids (Element's invite dialog), run off the event loop the kiths
    serve on; its [medium, address, mxid] triples."""
    result: Any = await asyncio.to_thread(
        sdk.call, "alice", "bulkLookupThreePids", [["email", a] for a in addresses], token)
    return {tuple(triple) for triple in result["threepids"]}


async def test_element_finds_addresses_bound_upstream_across_its_pepper_change(
        element_sdk: ElementSdk, kith_factory: KithFactory) -> None:
    upstream, access_token = await upstream_kith(kith_factory)
    kith, token = await proxying_kith(kith_factory, upstream.base, access_token)
    await kith.bind(LOCAL, "@local:hs.test")
    await asyncio.to_thread(
        element_sdk.client, "alice", homeserver_url="http://127.0.0.1:9",
        identity_server_url=kith.base, user_id="@alice:hs.test", access_token="unused")
    both = {("email", FAR, "@far:hs.test"), ("email", LOCAL, "@local:hs.test")}

    await asyncio.to_thread(element_sdk.take_requests)
    assert await bulk_lookup(element_sdk, token, [FAR, LOCAL, NOBODY]) == both
    upstream_pepper = (await hash_details(upstream, await upstream.register("bob"))
                       )["lookup_pepper"]
    sent = [r for r in await asyncio.to_thread(element_sdk.take_requests)
            if r.path.endswith("/v2/lookup")]
    assert [(r.body["algorithm"], r.body["pepper"]) for r in sent] == [
        ("sha256", upstream_pepper)]

    assert (await rotate_pepper(upstream))[0] == 0
    upstream_token = await upstream.register("carol")

    async def rotated() -> bool:
        return bool((await hash_details(upstream, upstream_token))["lookup_pepper"]
                    != upstream_pepper)

    await wait_for("the upstream to announce its new pepper", rotated)
    new = (await hash_details(upstream, upstream_token))["lookup_pepper"]
    # NOBODY's negative answer is cached for a minute: ask for an address not asked yet,
    # so that the upstream is asked with the old pepper.
    with pytest.raises(SdkError) as refused:
        await bulk_lookup(element_sdk, token, [FAR, LOCAL, "other@example.org"])
    assert (refused.value.http_status, refused.value.errcode) == (400, "M_INVALID_PEPPER")
    assert await bulk_lookup(element_sdk, token, [FAR, LOCAL, "other@example.org"]) == both
    sent = [r for r in await asyncio.to_thread(element_sdk.take_requests)
            if r.path.endswith("/v2/lookup")]
    assert sent[-1].body["pepper"] == new

