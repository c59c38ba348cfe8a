"""The Prometheus listener (`[general] prometheus_port`): what it serves and when.

The registry is process-global (other tests count too), so values are compared before
and after, never as absolute numbers.
"""

from __future__ import annotations

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from kith import __version__
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(kith: RunningKith) -> Samples:
    port = kith.config.general.prometheus_port
    async with kith.http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_binds_and_lookups(kith_factory: KithFactory) -> None:
    kith: RunningKith = await kith_factory({"general": {
        "prometheus_port": free_port(), "prometheus_addr": "127.0.0.1"}})
    before = await scrape(kith)
    token = await kith.register("alice")
    await kith.bind("alice@example.org", "@alice:hs.test")
    headers = {"Authorization": f"Bearer {token}"}
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/hash_details",
                             headers=headers) as resp:
        pepper = (await resp.json())["lookup_pepper"]
    address = lookup_hash("email", "alice@example.org", pepper)
    async with kith.http.post(f"{kith.base}/_matrix/identity/v2/lookup", headers=headers,
                              json={"algorithm": "sha256", "pepper": pepper,
                                    "addresses": [address]}) as resp:
        assert (await resp.json())["mappings"] == {address: "@alice:hs.test"}
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/unbind", json={
            "medium": "email", "address": "alice@example.org", "mxid": "@alice:hs.test"}) as resp:
        assert resp.status == 200
    async with kith.http.get(f"{kith.base}/_matrix/identity/v2/no/such/path") as resp:
        assert resp.status == 404
    after = await scrape(kith)

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return value(after, name, **labels) >= value(before, name, **labels) + by

    lookup_route = "/_matrix/identity/v2/lookup"
    assert grew("kith_http_requests_total", method="POST", route=lookup_route, status="200")
    assert grew("kith_http_requests_total", method="POST", status="200",
                route="/_matrix/identity/v2/account/register")
    assert grew("kith_http_requests_total", method="POST", status="200",
                route="/_matrix/identity/internal/bind")
    assert grew("kith_http_requests_total", method="GET", route="unmatched", status="404")
    assert grew("kith_http_request_duration_seconds_count", route=lookup_route)
    assert not any(name == "kith_http_requests_total" and ("route", "/_matrix/identity/v2/no/"
                   "such/path") in labels for name, labels in after)
    assert grew("kith_lookup_addresses_total", source="local")
    assert grew("kith_binds_total")
    assert grew("kith_unbinds_total")
    assert value(after, "kith_build_info", version=__version__) == 1


async def test_no_prometheus_port_no_listener(kith_factory: KithFactory) -> None:
    kith: RunningKith = await kith_factory()
    assert kith.config.general.prometheus_port is None
    assert len(kith.server.runners) == 2  # the client and internal APIs only
    port = free_port()
    other: RunningKith = await kith_factory({"general": {"prometheus_port": port}},
                                            name="other")
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200  # an empty prometheus_addr listens on 127.0.0.1
    assert len(other.server.runners) == 3
