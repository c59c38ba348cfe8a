"""The Prometheus listener (`[general] prometheus_port`): what it serves and when.

The registry is process-global (other tests count too), so values are compared before
and after, never as absolute numbers.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from kith import __version__
from kith.config import load_config
from kith.threepid import lookup_hash
from tests.conftest import (
    KithFactory,
    KithProcessFactory,
    RunningKith,
    SmtpSink,
    free_port,
    wait_for,
    write_config,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(kith: RunningKith) -> Samples:
    port = kith.config.general.prometheus_port
    async with kith.http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    return parse(text)


def parse(text: str) -> Samples:
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


async def test_one_scrape_sums_two_workers(tmp_path: Path,
                                           kith_process: KithProcessFactory) -> None:
    """With `workers = 2` every scrape, whichever worker answers it, counts the requests
    and binds of both; the shared directory is removed when kith stops."""
    path = write_config(tmp_path, {"general": {"workers": 2, "prometheus_port": free_port()}})
    config = load_config(str(path), env={})
    proc = kith_process(path)
    proc.start(config.http.client_port)
    assert proc.proc is not None
    pid = proc.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # The workers map their sample files from the shared directory.
    mapped = {Path(line.split(maxsplit=5)[-1]).parent for child in children
              for line in Path(f"/proc/{child}/maps").read_text().splitlines()
              if "/kith-metrics-" in line}
    assert len(children) == 2 and len(mapped) == 1, (children, mapped)
    directory = mapped.pop()
    internal = f"http://127.0.0.1:{config.http.internal_port}/_matrix/identity/internal"
    metrics = f"http://127.0.0.1:{config.general.prometheus_port}/metrics"
    binds = 20
    # A new connection per request, so the kernel spreads them over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(binds):
            async with http.post(f"{internal}/bind", json={
                    "medium": "email", "address": f"user{i}@example.org",
                    "mxid": f"@user{i}:hs.test"}) as resp:
                assert resp.status == 200
        for _ in range(8):
            async with http.get(metrics) as resp:
                assert resp.status == 200
                samples = parse(await resp.text())
            assert value(samples, "kith_binds_total") == binds
            assert value(samples, "kith_http_requests_total", method="POST", status="200",
                         route="/_matrix/identity/internal/bind") == binds
            assert value(samples, "kith_bindings", source="local") == binds
            assert value(samples, "kith_onbind_queue", state="pending") == 0
            assert value(samples, "kith_build_info", version=__version__) == 1
    proc.kill(15)
    assert not directory.exists()


async def test_gauges_of_the_onbind_queue_and_a_breaker(kith_factory: KithFactory,
                                                       smtp: SmtpSink) -> None:
    """An invite whose homeserver cannot be reached waits in the onbind queue; an
    upstream identity server that does not answer opens its breaker."""
    kith: RunningKith = await kith_factory({
        "general": {"prometheus_port": free_port()},
        "email": {"email.smtpport": smtp.port},
        "proxy": {"identity": f"http://127.0.0.1:{free_port()}", "breaker_failures": 1}})
    token = await kith.register("alice")
    headers = {"Authorization": f"Bearer {token}"}
    before = await scrape(kith)
    assert value(before, "kith_onbind_queue", state="pending") == 0
    assert value(before, "kith_onbind_oldest_pending_age_seconds") == 0
    assert value(before, "kith_breaker_open", dependency="upstream") == 0
    async with kith.http.post(f"{kith.base}/_matrix/identity/v2/store-invite", json={
            "medium": "email", "address": "bob@example.org", "room_id": "!r:hs.test",
            "sender": "@alice:hs.test"}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    # bob's homeserver does not exist: the onbind delivery waits.
    await kith.bind("bob@example.org", "@bob:unreachable.invalid")
    # Only a plain ("none") lookup names an address the upstream could be asked about.
    assert await kith.lookup(token, "none", ["nobody@example.org email"]) == {}

    async def pending_a_while() -> Samples | None:
        samples = await scrape(kith)
        return samples if value(samples, "kith_onbind_oldest_pending_age_seconds") > 0 \
            else None
    after = await wait_for("the onbind delivery to wait", pending_a_while)
    assert value(after, "kith_onbind_queue", state="pending") == 1
    assert value(after, "kith_bindings", source="local") == 1
    assert value(after, "kith_breaker_open", dependency="upstream") == 1
