"""Outbound address policy: which IPs kith may connect to (no SSRF).

Homeserver names come from untrusted callers, so every outbound connection is
checked against the policy *after* DNS resolution, on the exact addresses the
socket will use.  Semantics follow Sydent's `ip.blacklist` / `ip.whitelist`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from kith.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Used when the operator configures no blacklist: everything that is not a
# public unicast address (Synapse/Sydent's list plus a few reserved ranges).
DEFAULT_BLACKLIST: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # former 6to4 relay anycast
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. 255.255.255.255
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # deprecated IPv4-compatible
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)


class AddressRefusedError(OSError):
    """No address of a host is allowed by the outbound policy."""

    def __init__(self, host: str) -> None:
        super().__init__(f"address of {host!r} refused by the outbound IP policy")
        self.host = host


def _parse(ip: str | IPAddress) -> IPAddress | None:
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet is translated to:
# IPv4-compatible (deprecated), SIIT's IPv4-translated, and NAT64's well-known prefix.
_LAST_32_BITS_ARE_IPV4 = tuple(ipaddress.ip_network(cidr) for cidr in (
    "::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
# NAT64's local-use prefix (RFC 8215): where in it an IPv4 address sits depends on the
# prefix length the network chose (RFC 6052), so every layout is considered.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_RFC6052_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a connection to `addr` may reach or reveal: IPv4-mapped,
    IPv4-compatible, IPv4-translated, NAT64 (well-known and local-use prefixes), 6to4,
    and both ends of Teredo."""
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if any(addr in net for net in _LAST_32_BITS_ARE_IPV4):
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr in _LOCAL_NAT64:
        found += [_rfc6052_ipv4(addr, length) for length in _RFC6052_PREFIX_LENGTHS]
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found += addr.teredo
    return found


def _rfc6052_ipv4(addr: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a `prefix_length` NAT64 prefix (RFC 6052 §2.2):
    bits 64-71 are reserved and skipped."""
    octets = addr.packed
    start = prefix_length // 8
    embedded = [i for i in range(start, 16) if i != 8][:4]
    return ipaddress.IPv4Address(bytes(octets[i] for i in embedded))


class OutboundAddressPolicy:
    """Whitelist beats blacklist; an empty blacklist means DEFAULT_BLACKLIST.

    An IPv6 address that carries an IPv4 address (mapped, NAT64, 6to4, Teredo, ...; see
    `embedded_ipv4`) is allowed only if that IPv4 address is too; an IPv4-mapped one is
    judged as the IPv4 address alone.  0.0.0.0 and :: are always refused: connecting to
    them reaches the local host.
    """

    def __init__(
        self, blacklist: Sequence[IPNetwork] = (), whitelist: Sequence[IPNetwork] = ()
    ) -> None:
        self.blacklist: tuple[IPNetwork, ...] = tuple(blacklist) or DEFAULT_BLACKLIST
        self.whitelist: tuple[IPNetwork, ...] = tuple(whitelist)

    def is_allowed(self, ip: str | IPAddress) -> bool:
        addr = _parse(ip)
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv4Address):
            return self._allows(addr)
        if addr.ipv4_mapped is not None:
            return self._allows(addr.ipv4_mapped)
        return self._allows(addr) and all(self._allows(v4) for v4 in embedded_ipv4(addr))

    def _allows(self, addr: IPAddress) -> bool:
        if addr.is_unspecified:
            return False
        return _contains(self.whitelist, addr) or not _contains(self.blacklist, addr)


def _contains(networks: Iterable[IPNetwork], addr: IPAddress) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


class PolicyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then drops refused addresses.

    aiohttp connects only to what the resolver returns, so filtering here
    closes the DNS-rebinding gap a name-based check would leave.  IP-literal
    URLs bypass resolvers: callers must check those with the policy first.
    """

    def __init__(
        self, policy: OutboundAddressPolicy, inner: AbstractResolver | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.is_allowed(r["host"])]
        if not allowed:
            raise AddressRefusedError(host)
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
