"""The discovery rules, with fake DNS and `.well-known`."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from kith.federation.discovery import (
    SRV_CACHE_S,
    WELL_KNOWN_DEFAULT_CACHE_S,
    WELL_KNOWN_ERROR_CACHE_S,
    WELL_KNOWN_MAX_CACHE_S,
    WELL_KNOWN_MIN_CACHE_S,
    ResolvedServer,
    ServerResolver,
    SrvRecord,
    WellKnownResult,
    cache_period,
    parse_well_known,
    pick_srv_target,
    resolve_server_name,
)


class FakeNet:
    """Scripted `.well-known` answers and SRV records; records every query."""

    def __init__(
        self,
        well_known: dict[str, WellKnownResult] | None = None,
        srv: dict[str, list[SrvRecord]] | None = None,
    ) -> None:
        self.well_known = well_known or {}
        self.srv = srv or {}
        self.well_known_queries: list[str] = []
        self.srv_queries: list[str] = []

    async def fetch_well_known(self, hostname: str) -> WellKnownResult:
        self.well_known_queries.append(hostname)
        return self.well_known.get(hostname, WellKnownResult(None, WELL_KNOWN_ERROR_CACHE_S))

    async def lookup_srv(self, name: str) -> Sequence[SrvRecord]:
        self.srv_queries.append(name)
        return self.srv.get(name, [])

    async def resolve(self, server_name: str) -> ResolvedServer:
        return await resolve_server_name(
            server_name, fetch_well_known=self.fetch_well_known, lookup_srv=self.lookup_srv
        )


def srv(target: str, port: int, priority: int = 10, weight: int = 0) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


async def test_ip_literal_connects_directly_without_lookups() -> None:
    net = FakeNet()
    assert await net.resolve("1.2.3.4") == ResolvedServer("1.2.3.4", 8448, "1.2.3.4", "1.2.3.4")
    assert await net.resolve("[2001:db8::1]:443") == ResolvedServer(
        "2001:db8::1", 443, "2001:db8::1", "[2001:db8::1]:443"
    )
    assert net.well_known_queries == [] and net.srv_queries == []


async def test_hostname_with_port_connects_directly_without_lookups() -> None:
    net = FakeNet()
    assert await net.resolve("hs.example.org:8000") == ResolvedServer(
        "hs.example.org", 8000, "hs.example.org", "hs.example.org:8000"
    )
    assert net.well_known_queries == [] and net.srv_queries == []


async def test_well_known_delegation_with_port() -> None:
    net = FakeNet(well_known={"example.org": WellKnownResult("matrix.example.org:443", 60.0)})
    assert await net.resolve("example.org") == ResolvedServer(
        "matrix.example.org", 443, "matrix.example.org", "matrix.example.org:443"
    )
    assert net.well_known_queries == ["example.org"]
    assert net.srv_queries == []


async def test_well_known_delegation_to_ip_literal() -> None:
    net = FakeNet(well_known={"example.org": WellKnownResult("[2001:db8::5]", 60.0)})
    assert await net.resolve("example.org") == ResolvedServer(
        "2001:db8::5", 8448, "2001:db8::5", "[2001:db8::5]"
    )
    assert net.srv_queries == []


async def test_well_known_delegation_then_matrix_fed_srv() -> None:
    net = FakeNet(
        well_known={"example.org": WellKnownResult("matrix.example.org", 60.0)},
        srv={
            "_matrix-fed._tcp.matrix.example.org": [srv("fed.example.net.", 8443)],
            "_matrix._tcp.matrix.example.org": [srv("old.example.net", 1)],
        },
    )
    # Connect to the SRV target; certificate and Host header are the delegated name.
    assert await net.resolve("example.org") == ResolvedServer(
        "fed.example.net", 8443, "matrix.example.org", "matrix.example.org"
    )
    assert net.srv_queries == ["_matrix-fed._tcp.matrix.example.org"]


async def test_well_known_delegation_then_deprecated_srv_then_8448() -> None:
    net = FakeNet(
        well_known={"example.org": WellKnownResult("matrix.example.org", 60.0)},
        srv={"_matrix._tcp.matrix.example.org": [srv("old.example.net", 8009)]},
    )
    assert await net.resolve("example.org") == ResolvedServer(
        "old.example.net", 8009, "matrix.example.org", "matrix.example.org"
    )
    assert net.srv_queries == [
        "_matrix-fed._tcp.matrix.example.org",
        "_matrix._tcp.matrix.example.org",
    ]
    net.srv.clear()
    assert await net.resolve("example.org") == ResolvedServer(
        "matrix.example.org", 8448, "matrix.example.org", "matrix.example.org"
    )


async def test_without_well_known_srv_on_the_server_name() -> None:
    net = FakeNet(srv={"_matrix-fed._tcp.example.org": [srv("hs.example.net", 443)]})
    assert await net.resolve("example.org") == ResolvedServer(
        "hs.example.net", 443, "example.org", "example.org"
    )
    assert net.well_known_queries == ["example.org"]


async def test_without_well_known_deprecated_srv_then_default_port() -> None:
    net = FakeNet(srv={"_matrix._tcp.example.org": [srv("hs.example.net", 9000)]})
    assert await net.resolve("example.org") == ResolvedServer(
        "hs.example.net", 9000, "example.org", "example.org"
    )
    assert await FakeNet().resolve("example.org") == ResolvedServer(
        "example.org", 8448, "example.org", "example.org"
    )


async def test_srv_target_dot_means_no_service() -> None:
    net = FakeNet(srv={"_matrix-fed._tcp.example.org": [srv(".", 0)]})
    assert (await net.resolve("example.org")).port == 8448


def test_pick_srv_target_prefers_lowest_priority() -> None:
    records = [srv("b.example", 2, priority=20), srv("a.example", 1, priority=10, weight=5)]
    assert pick_srv_target(records) == ("a.example", 1)
    assert pick_srv_target([]) is None
    same = [srv("x.example", 1, weight=0), srv("y.example", 2, weight=0)]
    assert pick_srv_target(same) in {("x.example", 1), ("y.example", 2)}
    weighted = [srv("never.example", 1, weight=0), srv("always.example", 2, weight=7)]
    assert {pick_srv_target(weighted) for _ in range(20)} == {("always.example", 2)}


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, WELL_KNOWN_DEFAULT_CACHE_S),
        ("", WELL_KNOWN_DEFAULT_CACHE_S),
        ("public, max-age=7200", 7200.0),
        ("max-age=1", WELL_KNOWN_MIN_CACHE_S),
        ("max-age=99999999", WELL_KNOWN_MAX_CACHE_S),
        ("max-age=abc", WELL_KNOWN_DEFAULT_CACHE_S),
        ("no-store", WELL_KNOWN_MIN_CACHE_S),
        ("private", WELL_KNOWN_DEFAULT_CACHE_S),
    ],
)
def test_cache_period(header: str | None, seconds: float) -> None:
    assert cache_period(header) == seconds


@pytest.mark.parametrize(
    ("body", "server"),
    [
        ({"m.server": "hs.example.org:443"}, "hs.example.org:443"),
        ({"m.server": "[::1]:8448"}, "[::1]:8448"),
        ({"m.server": "https://hs.example.org"}, None),
        ({"m.server": 5}, None),
        ({}, None),
        (["m.server"], None),
        ("hs.example.org", None),
    ],
)
def test_parse_well_known(body: object, server: str | None) -> None:
    assert parse_well_known(body) == server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_resolver_caches_for_the_well_known_period() -> None:
    net = FakeNet(well_known={"example.org": WellKnownResult("hs.example.org:443", 600.0)})
    clock = Clock()
    servers = ServerResolver(net.fetch_well_known, net.lookup_srv, clock=clock)
    first = await servers.resolve("example.org")
    clock.now += 599
    assert await servers.resolve("example.org") == first
    assert net.well_known_queries == ["example.org"]
    clock.now += 2
    await servers.resolve("example.org")
    assert net.well_known_queries == ["example.org", "example.org"]


async def test_resolver_caches_failures_for_an_hour_and_srv_no_longer() -> None:
    net = FakeNet(
        well_known={"long.example": WellKnownResult("hs.long.example", WELL_KNOWN_MAX_CACHE_S)}
    )
    clock = Clock()
    servers = ServerResolver(net.fetch_well_known, net.lookup_srv, clock=clock)
    await servers.resolve("example.org")  # no well-known: cached as an error
    await servers.resolve("long.example")  # SRV consulted: capped
    clock.now += min(WELL_KNOWN_ERROR_CACHE_S, SRV_CACHE_S) - 1
    await servers.resolve("example.org")
    await servers.resolve("long.example")
    assert len(net.well_known_queries) == 2
    clock.now += 2
    await servers.resolve("example.org")
    await servers.resolve("long.example")
    assert len(net.well_known_queries) == 4


async def test_resolver_does_not_cache_direct_answers_and_stays_bounded() -> None:
    net = FakeNet()
    servers = ServerResolver(net.fetch_well_known, net.lookup_srv, max_entries=3)
    for i in range(10):
        await servers.resolve(f"hs{i}.example")
        await servers.resolve(f"10.0.0.{i}:8448")
    assert len(servers._cache) == 3
    assert list(servers._cache) == ["hs7.example", "hs8.example", "hs9.example"]


async def test_resolver_overrides_skip_discovery() -> None:
    net = FakeNet()
    target = ResolvedServer("127.0.0.1", 5555, "127.0.0.1", "hs.test", "http")
    servers = ServerResolver(net.fetch_well_known, net.lookup_srv, overrides={"hs.test": target})
    assert await servers.resolve("hs.test") is target
    assert net.well_known_queries == [] and net.srv_queries == []


async def test_catch_all_override_takes_every_other_name_without_dns() -> None:
    net = FakeNet()
    exact = ResolvedServer("127.0.0.1", 5555, "127.0.0.1", "hs.test", "http")
    catch_all = ResolvedServer("127.0.0.1", 6666, "127.0.0.1", "*", "http")
    servers = ServerResolver(net.fetch_well_known, net.lookup_srv,
                             overrides={"hs.test": exact, "*": catch_all})
    assert await servers.resolve("hs.test") is exact
    for name in ("example.org", "fuzzed.invalid:8448", "[::1]"):
        assert await servers.resolve(name) == ResolvedServer(
            "127.0.0.1", 6666, "127.0.0.1", name, "http")
    assert net.well_known_queries == [] and net.srv_queries == []


class FakeDnsResolver:
    def __init__(self, answer: list[object] | type[Exception]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, float]] = []

    async def resolve(self, name: str, rdtype: str, *, lifetime: float) -> list[object]:
        self.calls.append((name, rdtype, lifetime))
        if isinstance(self.answer, type):
            raise self.answer
        return self.answer


async def test_lookup_srv_dns_reads_records_and_treats_failures_as_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dns.exception
    import dns.name
    import dns.resolver

    from kith.federation import discovery

    record = SimpleNamespace(priority=1, weight=2, port=8448, target=dns.name.from_text("hs.x."))
    fake = FakeDnsResolver([record])
    monkeypatch.setattr(discovery, "_dns_resolver", fake)
    assert await discovery.lookup_srv_dns("_matrix-fed._tcp.x", timeout_s=1.5) == [
        SrvRecord(1, 2, 8448, "hs.x")
    ]
    assert fake.calls == [("_matrix-fed._tcp.x", "SRV", 1.5)]
    for failure in (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
        monkeypatch.setattr(discovery, "_dns_resolver", FakeDnsResolver(failure))
        assert await discovery.lookup_srv_dns("_matrix._tcp.x") == []
