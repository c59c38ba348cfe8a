"""The outbound address policy: what kith refuses to connect to, and why."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from kith.federation.policy import AddressRefusedError, OutboundAddressPolicy, PolicyResolver


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


REFUSED_BY_DEFAULT = [
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",  # RFC 1918
    "127.0.0.1",
    "127.255.0.9",
    "::1",  # loopback
    "169.254.169.254",
    "fe80::1",  # link-local (cloud metadata!)
    "100.64.0.1",
    "100.127.255.255",  # CGNAT
    "fc00::1",
    "fd12:3456::1",  # unique local
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",  # multicast
    "0.1.2.3",
    "192.0.0.8",
    "198.18.0.1",
    "198.19.255.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "2001:db8::1",
    "fec0::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::1",
    "2002:0a00:0001::",  # 6to4 of 127.0.0.1 / 10.0.0.1
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",  # NAT64 (well-known prefix) of 127.0.0.1 / 169.254.169.254
    "64:ff9b::10.0.0.1",
    "64:ff9b:1:7f00:0:100::",  # local-use NAT64 (RFC 8215) of 127.0.0.1, /48 layout
    "64:ff9b:1::808:808",  # local-use NAT64 is refused whatever it embeds
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT) 127.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo: client 127.0.0.1
    "2001:0:a00:1:8000:63bf:3fff:fdd2",  # Teredo: server 10.0.0.1
]
ALLOWED_BY_DEFAULT = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",
    "100.128.0.1",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "2002:0808:0808::1",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: server 65.54.227.120, client 8.8.8.8
]


@pytest.mark.parametrize("ip", REFUSED_BY_DEFAULT)
def test_default_blacklist_refuses_private_and_reserved(ip: str) -> None:
    assert not OutboundAddressPolicy().is_allowed(ip)


@pytest.mark.parametrize("ip", ALLOWED_BY_DEFAULT)
def test_default_blacklist_allows_public_unicast(ip: str) -> None:
    assert OutboundAddressPolicy().is_allowed(ip)
    assert OutboundAddressPolicy().is_allowed(ipaddress.ip_address(ip))


def test_whitelist_overrides_blacklist_including_mapped_form() -> None:
    policy = OutboundAddressPolicy(whitelist=nets("127.0.0.1/32"))
    assert policy.is_allowed("127.0.0.1")
    assert policy.is_allowed("::ffff:127.0.0.1")
    assert not policy.is_allowed("127.0.0.2")
    assert not policy.is_allowed("::1")


@pytest.mark.parametrize("ip", ["0.0.0.0", "::", "::ffff:0.0.0.0"])
def test_unspecified_addresses_are_refused_even_if_whitelisted(ip: str) -> None:
    policy = OutboundAddressPolicy(
        blacklist=nets("203.0.113.0/24"), whitelist=nets("0.0.0.0/0", "::/0")
    )
    assert not policy.is_allowed(ip)
    assert policy.is_allowed("10.0.0.1")


def test_embedded_ipv4_is_judged_by_the_operators_lists_too() -> None:
    policy = OutboundAddressPolicy(blacklist=nets("8.8.8.0/24"))
    assert not policy.is_allowed("64:ff9b::808:808")
    assert not policy.is_allowed("2002:808:808::1")
    whitelisted = OutboundAddressPolicy(whitelist=nets("10.0.0.0/8"))
    assert whitelisted.is_allowed("64:ff9b::a00:1")
    assert not whitelisted.is_allowed("64:ff9b::7f00:1")
    assert not whitelisted.is_allowed("64:ff9b::")  # NAT64 of 0.0.0.0
    # Local-use NAT64 under a list that does not name its prefix: every RFC 6052 layout.
    loopback_only = OutboundAddressPolicy(blacklist=nets("127.0.0.0/8"))
    assert not loopback_only.is_allowed("64:ff9b:1:7f00:0:100::")
    assert loopback_only.is_allowed("64:ff9b::808:808")


def test_configured_blacklist_replaces_the_default() -> None:
    policy = OutboundAddressPolicy(blacklist=nets("8.8.8.0/24"))
    assert not policy.is_allowed("8.8.8.8")
    assert not policy.is_allowed("::ffff:8.8.8.8")
    assert policy.is_allowed("10.0.0.1")


@pytest.mark.parametrize("junk", ["", "localhost", "1.2.3", "::g", "example.org"])
def test_non_addresses_are_refused(junk: str) -> None:
    assert not OutboundAddressPolicy(whitelist=nets("0.0.0.0/0")).is_allowed(junk)


class FakeResolver(AbstractResolver):
    def __init__(self, *ips: str) -> None:
        self.ips = ips
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=family, proto=0, flags=0)
            for ip in self.ips
        ]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_drops_refused_addresses() -> None:
    inner = FakeResolver("10.0.0.1", "93.184.216.34", "::1", "2001:4860:4860::8888")
    resolver = PolicyResolver(OutboundAddressPolicy(), inner)
    results = await resolver.resolve("rebind.example", 443)
    assert [r["host"] for r in results] == ["93.184.216.34", "2001:4860:4860::8888"]
    await resolver.close()
    assert inner.closed


async def test_resolver_raises_oserror_when_nothing_is_left() -> None:
    resolver = PolicyResolver(OutboundAddressPolicy(), FakeResolver("127.0.0.1", "::1"))
    with pytest.raises(AddressRefusedError) as info:
        await resolver.resolve("localhost", 80)
    assert isinstance(info.value, OSError)


async def test_resolver_uses_real_dns_for_localhost_and_filters_it() -> None:
    allowed = PolicyResolver(OutboundAddressPolicy(whitelist=nets("127.0.0.0/8")))
    results = await allowed.resolve("localhost", 80, socket.AF_INET)
    assert {r["host"] for r in results} == {"127.0.0.1"}
    refused = PolicyResolver(OutboundAddressPolicy())
    with pytest.raises(AddressRefusedError):
        await refused.resolve("localhost", 80, socket.AF_INET)
    await allowed.close()
    await refused.close()
