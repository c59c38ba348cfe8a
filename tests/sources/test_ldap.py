"""The directory against a real slapd: lookups, batching, escaping, TLS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kith.config import LdapConfig, parse_ldap_section
from kith.sources.errors import LdapError, LdapUnavailable
from kith.sources.ldap import LdapDirectory
from kith.sources.ldap_numbers import normalise_msisdn
from kith.threepid import Threepid
from tests.conftest import wait_for
from tests.federation.conftest import TestPki
from tests.sources.conftest import SUFFIX, Slapd

# Phone numbers as directories hold them: Matrix's own form, national forms, and an
# international one with the trunk prefix in parentheses.
NUMBERS = f"""\
dn: uid=dave,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: dave
cn: Dave
sn: D
telephoneNumber: 447700900123

dn: uid=erin,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: erin
cn: Erin
sn: E
mobile: 07700 900456

dn: uid=frank,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: frank
cn: Frank
sn: F
telephoneNumber: (0)7700-900789
mobile: +44 (0)7700 900321
"""
NUMBER_OWNERS = {
    Threepid("msisdn", "447700900123"): "@dave:hs.test",
    Threepid("msisdn", "447700900456"): "@erin:hs.test",
    Threepid("msisdn", "447700900789"): "@frank:hs.test",
    Threepid("msisdn", "447700900321"): "@frank:hs.test",
    Threepid("msisdn", "442079460999"): "@carol:hs.test",  # "020 7946 0999"
}


def ldap_config(slapd: Slapd, **extra: Any) -> LdapConfig:
    config = parse_ldap_section({k: str(v) for k, v in slapd.ldap_section(**extra).items()},
                                env={})
    assert config is not None
    return config


@pytest.fixture
async def directory(slapd: Slapd) -> Any:
    d = LdapDirectory(ldap_config(slapd))
    yield d
    await d.close()


async def test_lookup_finds_every_mapped_attribute(directory: LdapDirectory) -> None:
    found = await directory.lookup([
        Threepid("email", "alice@example.org"), Threepid("email", "alice.work@example.org"),
        Threepid("email", "alice.other@example.net"), Threepid("msisdn", "442079460000"),
        Threepid("email", "bob@example.org"),
        Threepid("email", "nobody@example.org"), Threepid("msisdn", "442079460999"),
    ])
    assert found == {
        Threepid("email", "alice@example.org"): "@alice:hs.test",
        Threepid("email", "alice.work@example.org"): "@alice:hs.test",
        Threepid("email", "alice.other@example.net"): "@alice:hs.test",
        Threepid("msisdn", "442079460000"): "@alice:hs.test",
        Threepid("email", "bob@example.org"): "@bob:hs.test",
    }
    assert directory.searches == 1


async def test_formatted_numbers_are_matched_by_the_sync_not_by_a_search(
        directory: LdapDirectory) -> None:
    """telephoneNumberMatch ignores spaces and hyphens, not parentheses: a live search
    cannot find "+1 (415) 555-0100"; the synced copy (normalised) has it."""
    assert await directory.lookup([Threepid("msisdn", "14155550100")]) == {}
    entries = {e.mxid: set(e.threepids) for e in await directory.entries()}
    assert Threepid("msisdn", "14155550100") in entries["@alice:hs.test"]


async def test_one_search_per_chunk_and_cache(directory: LdapDirectory) -> None:
    wanted = [Threepid("email", f"user{i}@example.org") for i in range(250)]
    wanted.append(Threepid("email", "carol@example.org"))
    found = await directory.lookup(wanted)
    assert found == {Threepid("email", "carol@example.org"): "@carol:hs.test"}
    assert directory.searches == 3  # 251 addresses, chunks of 100
    assert await directory.lookup(wanted) == found
    assert directory.searches == 3  # answered from the cache, negatives included


async def test_address_on_two_entries_is_picked_deterministically(
        directory: LdapDirectory, caplog: pytest.LogCaptureFixture) -> None:
    found = await directory.lookup([Threepid("email", "shared@example.org")])
    assert found == {Threepid("email", "shared@example.org"): "@bob:hs.test"}  # lowest DN
    assert "two entries" in caplog.text
    assert "shared@example.org" not in caplog.text


@pytest.mark.parametrize("address", [
    "*", "a*)(uid=*", "x)(|(mail=*", "x\x00@example.org", "*@example.org",
    "alice@example.org)(mail=*", "\\2a", "(", ")",
])
async def test_filter_injection_finds_nothing(directory: LdapDirectory, address: str) -> None:
    assert await directory.lookup([Threepid("email", address),
                                   Threepid("msisdn", address)]) == {}


async def test_filter_is_anded_onto_every_search(slapd: Slapd) -> None:
    d = LdapDirectory(ldap_config(slapd, filter="(!(uid=bob))"))
    try:
        found = await d.lookup([Threepid("email", "bob@example.org"),
                                Threepid("email", "shared@example.org")])
        assert found == {Threepid("email", "shared@example.org"): "@carol:hs.test"}
        assert "@bob:hs.test" not in {e.mxid for e in await d.entries()}
    finally:
        await d.close()


async def test_full_mxid_attribute_without_hs_name(slapd: Slapd) -> None:
    slapd.modify("ldapmodify", f"dn: uid=bob,{slapd.ldap_section()['base']}\n"
                 "changetype: modify\nreplace: description\ndescription: @Bob:other.test\n")
    d = LdapDirectory(ldap_config(slapd, hs_name="", id_attr="description"))
    try:
        assert await d.lookup([Threepid("email", "bob@example.org"),
                               Threepid("email", "alice@example.org")]
                              ) == {Threepid("email", "bob@example.org"): "@Bob:other.test"}
    finally:
        await d.close()


async def test_entries_skip_non_e164_numbers(directory: LdapDirectory) -> None:
    entries = {e.mxid: set(e.threepids) for e in await directory.entries()}
    assert set(entries) == {"@alice:hs.test", "@bob:hs.test", "@carol:hs.test"}
    assert entries["@carol:hs.test"] == {Threepid("email", "carol@example.org"),
                                         Threepid("email", "shared@example.org")}
    assert normalise_msisdn("020 7946 0999") is None
    assert normalise_msisdn("+44 (0)20 7946 0000") == "442079460000"


async def test_matrix_form_and_national_numbers_are_found_live(slapd: Slapd) -> None:
    """Each form is matched by the search itself (one search), not by a sync."""
    slapd.modify("ldapadd", NUMBERS)
    d = LdapDirectory(ldap_config(slapd, msisdn_default_region="GB"))
    try:
        assert await d.lookup(NUMBER_OWNERS) == NUMBER_OWNERS
        assert d.searches == 1
        by_mxid = {e.mxid: set(e.threepids) for e in await d.entries()}
        for threepid, mxid in NUMBER_OWNERS.items():
            assert threepid in by_mxid[mxid]
    finally:
        await d.close()


async def test_without_a_default_region_national_numbers_are_skipped(slapd: Slapd) -> None:
    slapd.modify("ldapadd", NUMBERS)
    d = LdapDirectory(ldap_config(slapd))
    try:
        international = {t: m for t, m in NUMBER_OWNERS.items()
                         if t.address in ("447700900123", "447700900321")}
        assert await d.lookup(NUMBER_OWNERS) == international
        synced = {t for e in await d.entries() for t in e.threepids if t.medium == "msisdn"}
        assert synced & set(NUMBER_OWNERS) == set(international)
    finally:
        await d.close()


async def test_wrong_password_is_a_clear_error(slapd: Slapd) -> None:
    d = LdapDirectory(ldap_config(slapd, bind_pw="wrong"))
    try:
        with pytest.raises(LdapError, match="bind as cn=admin"):
            await d.lookup([Threepid("email", "alice@example.org")])
    finally:
        await d.close()


async def test_dead_directory_is_an_error_not_a_hang(slapd: Slapd) -> None:
    slapd.stop()
    d = LdapDirectory(ldap_config(slapd))
    try:
        with pytest.raises(LdapError):
            await d.lookup([Threepid("email", "alice@example.org")])
    finally:
        await d.close()


async def test_a_hung_directory_costs_one_timeout_then_nothing(slapd: Slapd) -> None:
    d = LdapDirectory(ldap_config(slapd, pool_size=2, lookup_timeout=1,
                                  breaker_cooldown=3600))
    try:
        assert await d.entries()  # a pooled connection, made by a sync (search_timeout)
        with slapd.paused():
            # More lookups at once than threads: none waits past the timeout.
            started = time.monotonic()
            results = await asyncio.gather(
                *(d.lookup([Threepid("email", f"user{i}@example.org")]) for i in range(10)),
                return_exceptions=True)
            assert time.monotonic() - started < 6
            assert all(isinstance(r, LdapError) for r in results), results
            # The breaker is open: no waiting at all.
            started = time.monotonic()
            with pytest.raises(LdapUnavailable):
                await d.lookup([Threepid("email", "carol@example.org")])
            assert time.monotonic() - started < 0.5
            # The pool's threads gave up with the lookups, though the directory still
            # hangs (a sync's connection would wait search_timeout, 5 s).
            await wait_for("the threads to give up", lambda: d.calls_in_flight == 0,
                           timeout_s=3)
            with pytest.raises(LdapError):
                await d.check()  # the probe fails too, within the timeout
        await d.check()  # answering again: the breaker closes
        assert await d.lookup([Threepid("email", "carol@example.org")]) == {
            Threepid("email", "carol@example.org"): "@carol:hs.test"}
    finally:
        await d.close()


# ---------------------------------------------------------------------- TLS

async def test_starttls_with_the_right_ca(slapd: Slapd, pki: TestPki) -> None:
    d = LdapDirectory(ldap_config(slapd, startls="true", ca_file=pki.ca_file))
    try:
        assert await d.lookup([Threepid("email", "bob@example.org")]) == {
            Threepid("email", "bob@example.org"): "@bob:hs.test"}
        conn = d._idle.get_nowait()
        assert conn.tls_started
        d._idle.put(conn)
    finally:
        await d.close()


async def test_ldaps_with_the_right_ca(slapd: Slapd, pki: TestPki) -> None:
    d = LdapDirectory(ldap_config(slapd, uri=slapd.ldaps_uri, ca_file=pki.ca_file))
    try:
        assert await d.lookup([Threepid("email", "bob@example.org")]) == {
            Threepid("email", "bob@example.org"): "@bob:hs.test"}
    finally:
        await d.close()


@pytest.mark.parametrize("scheme", ["startls", "ldaps"])
async def test_wrong_ca_fails_closed(slapd: Slapd, pki: TestPki, scheme: str) -> None:
    extra: dict[str, Any] = {"ca_file": pki.other_ca_file}
    if scheme == "startls":
        extra["startls"] = "true"
    else:
        extra["uri"] = slapd.ldaps_uri
    d = LdapDirectory(ldap_config(slapd, **extra))
    try:
        with pytest.raises(LdapError):
            await d.lookup([Threepid("email", "bob@example.org")])
        assert d._idle.empty()
    finally:
        await d.close()


async def test_starttls_against_a_plain_port_fails_closed(tmp_path: Any) -> None:
    """A server that cannot do StartTLS (here: nothing TLS at all) is an error."""
    import asyncio

    async def answer_garbage(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(answer_garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = parse_ldap_section({"uri": f"ldap://127.0.0.1:{port}", "base": "dc=x",
                                 "startls": "true", "connect_timeout": "1",
                                 "search_timeout": "1"}, env={})
    assert config is not None
    d = LdapDirectory(config)
    try:
        with pytest.raises(LdapError):
            await d.lookup([Threepid("email", "bob@example.org")])
    finally:
        await d.close()
        server.close()


async def test_a_restarted_directory_is_reconnected(slapd: Slapd) -> None:
    d = LdapDirectory(ldap_config(slapd, cache_ttl=0.001))
    try:
        assert await d.lookup([Threepid("email", "bob@example.org")])
        slapd.stop()
        slapd.start()
        assert await d.lookup([Threepid("email", "bob@example.org")]) == {
            Threepid("email", "bob@example.org"): "@bob:hs.test"}
    finally:
        await d.close()


async def test_a_wrong_base_is_an_error_not_an_empty_directory(slapd: Slapd) -> None:
    """Else a full sync would remove every synced address."""
    d = LdapDirectory(ldap_config(slapd, base="ou=nowhere,dc=kith,dc=test"))
    try:
        with pytest.raises(LdapError, match="No such object|noSuchObject"):
            await d.entries()
        with pytest.raises(LdapError):
            await d.lookup([Threepid("email", "bob@example.org")])
    finally:
        await d.close()
