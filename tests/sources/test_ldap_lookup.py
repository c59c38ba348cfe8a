"""kith with [ldap]: plain-text and sha256 lookups, the sync, precedence, bind refusal."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kith.services.coherence import SharedCounters
from kith.services.ldap_sync import LdapSync
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith, wait_for
from tests.sources.conftest import Slapd
from tests.sources.test_ldap import NUMBER_OWNERS, NUMBERS

PEOPLE = "ou=people,dc=kith,dc=test"


async def hashed(kith: RunningKith, token: str, *threepids: tuple[str, str]) -> dict[str, str]:
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    hashes = {lookup_hash(m, a, pepper): a for m, a in threepids}
    found = await kith.lookup(token, "sha256", list(hashes))
    return {hashes[h]: mxid for h, mxid in found.items()}


def sync_of(kith: RunningKith) -> LdapSync:
    sync = kith.server.services.ldap_sync  # type: ignore[union-attr]
    assert sync is not None
    return sync


async def start(kith_factory: KithFactory, slapd: Slapd, **ldap: Any) -> RunningKith:
    kith: RunningKith = await kith_factory({"ldap": slapd.ldap_section(**ldap)})
    await sync_of(kith).full()
    return kith


async def test_plain_text_lookup_answers_from_ldap(kith_factory: KithFactory,
                                                   slapd: Slapd) -> None:
    kith = await start(kith_factory, slapd)
    token = await kith.register("alice")
    directory = kith.server.services.lookup.directory  # type: ignore[union-attr]
    assert directory is not None
    before = directory.searches
    found = await kith.lookup(token, "none", [
        "Alice@Example.org email", "alice.work@example.org email", "442079460000 msisdn",
        "14155550100 msisdn", "nobody@example.org email", "*@example.org email",
        "x)(|(mail=*@example.org email", "a*)(uid=* email",
    ])
    assert found == {
        "Alice@Example.org email": "@alice:hs.test",
        "alice.work@example.org email": "@alice:hs.test",
        "442079460000 msisdn": "@alice:hs.test",
        "14155550100 msisdn": "@alice:hs.test",  # "+1 (415) 555-0100": from the sync
    }
    assert directory.searches - before == 1  # every address in one OR-filter


async def test_sha256_lookups_follow_the_directory(kith_factory: KithFactory, slapd: Slapd,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    kith = await start(kith_factory, slapd)
    token = await kith.register("alice")
    assert await hashed(kith, token, ("email", "alice@example.org"),
                        ("msisdn", "14155550100"), ("email", "shared@example.org"),
                        ("msisdn", "442079460999")) == {
        "alice@example.org": "@alice:hs.test", "14155550100": "@alice:hs.test",
        "shared@example.org": "@bob:hs.test"}

    slapd.modify("ldapadd", f"""dn: uid=dave,{PEOPLE}
objectClass: inetOrgPerson
uid: dave
cn: Dave
sn: D
mail: dave@example.org
mobile: +33 1 23 45 67 89
""")
    slapd.modify("ldapmodify", f"""dn: uid=alice,{PEOPLE}
changetype: modify
delete: mail
mail: alice.work@example.org
""")
    result = await sync_of(kith).incremental()
    assert result.entries >= 2 and result.written == 2 and result.removed == 1
    assert await hashed(kith, token, ("email", "dave@example.org"), ("msisdn", "33123456789"),
                        ("email", "alice.work@example.org"),
                        ("email", "alice@example.org")) == {
        "dave@example.org": "@dave:hs.test", "33123456789": "@dave:hs.test",
        "alice@example.org": "@alice:hs.test"}

    slapd.modify("ldapdelete", "", f"uid=dave,{PEOPLE}")
    slapd.modify("ldapdelete", "", f"uid=bob,{PEOPLE}")
    result = await sync_of(kith).full()
    assert (result.removed, result.written) == (3, 1)  # dave 2, bob 1; shared@ → carol
    assert await hashed(kith, token, ("email", "dave@example.org"),
                        ("email", "bob@example.org"), ("email", "shared@example.org")) == {
        "shared@example.org": "@carol:hs.test"}

    # A second kith on the same database sees the synced rows at start.
    other: RunningKith = await kith_factory({"ldap": slapd.ldap_section(),
                                             "db": {"db.file": kith.config.db.file}},
                                            name="second")
    other_token = await other.register("alice")
    assert await hashed(other, other_token, ("email", "carol@example.org")) == {
        "carol@example.org": "@carol:hs.test"}

    # Without [ldap], the synced rows are not served, and kith says so at start.
    with caplog.at_level(logging.WARNING, logger="kith.server"):
        plain: RunningKith = await kith_factory({"db": {"db.file": kith.config.db.file}},
                                                name="third")
    assert "addresses synced from an LDAP directory are in the store but not served" in (
        caplog.text)
    plain_token = await plain.register("alice")
    assert await hashed(plain, plain_token, ("email", "carol@example.org")) == {}


async def test_ldap_beats_a_local_binding(kith_factory: KithFactory, slapd: Slapd) -> None:
    answered_by_ldap = REGISTRY.get_sample_value(
        "kith_lookup_addresses_total", {"source": "ldap"}) or 0.0
    # Live answers are kept for a moment only: the directory is asked again below.
    kith = await start(kith_factory, slapd, cache_ttl="0.001")
    token = await kith.register("alice")
    await kith.bind("erin@example.org", "@mallory:hs.test")
    assert await kith.lookup(token, "none", ["erin@example.org email"]) == {
        "erin@example.org email": "@mallory:hs.test"}
    slapd.modify("ldapadd", f"""dn: uid=erin,{PEOPLE}
objectClass: inetOrgPerson
uid: erin
cn: Erin
sn: E
mail: erin@example.org
""")
    await sync_of(kith).full()
    assert await kith.lookup(token, "none", ["erin@example.org email"]) == {
        "erin@example.org email": "@erin:hs.test"}
    assert await hashed(kith, token, ("email", "erin@example.org")) == {
        "erin@example.org": "@erin:hs.test"}
    lookups = kith.server.services.lookup  # type: ignore[union-attr]
    assert await lookups.resolve("email", "Erin@Example.org") == ("@erin:hs.test", "ldap")
    assert await lookups.resolve("email", "nobody@example.org") is None
    assert await lookups.resolve("msisdn", "not a number") is None
    await kith.bind("local@example.org", "@local:hs.test")
    assert await lookups.resolve("email", "local@example.org") == ("@local:hs.test", "local")
    assert (REGISTRY.get_sample_value("kith_lookup_addresses_total", {"source": "ldap"})
            or 0.0) >= answered_by_ldap + 2


async def test_precedence_is_configurable(kith_factory: KithFactory, slapd: Slapd) -> None:
    kith = await start(kith_factory, slapd, precedence="local, ldap, upstream")
    token = await kith.register("alice")
    await kith.bind("erin@example.org", "@mallory:hs.test")
    slapd.modify("ldapadd", f"""dn: uid=erin,{PEOPLE}
objectClass: inetOrgPerson
uid: erin
cn: Erin
sn: E
mail: erin@example.org
""")
    await sync_of(kith).full()
    # Local bindings come first under this order.
    assert await kith.lookup(token, "none", ["erin@example.org email"]) == {
        "erin@example.org email": "@mallory:hs.test"}
    assert await hashed(kith, token, ("email", "erin@example.org")) == {
        "erin@example.org": "@mallory:hs.test"}


async def test_binding_an_address_ldap_maps_to_another_user_is_refused(
        kith_factory: KithFactory, slapd: Slapd) -> None:
    kith = await start(kith_factory, slapd)
    async with kith.http.post(f"{kith.internal}/_matrix/identity/internal/bind", json={
            "medium": "email", "address": "Bob@example.org", "mxid": "@mallory:hs.test"}) as resp:
        body = await resp.json()
        assert resp.status == 403, body
        assert body["errcode"] == "M_FORBIDDEN"
        assert "directory" in body["error"]
    await kith.bind("bob@example.org", "@bob:hs.test")  # its owner may


async def test_dead_directory_falls_back_to_the_synced_copy(
        kith_factory: KithFactory, slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    kith = await start(kith_factory, slapd)
    token = await kith.register("alice")
    await kith.bind("local@example.org", "@local:hs.test")
    slapd.stop()
    for _ in range(3):
        assert await kith.lookup(token, "none", [
            "carol@example.org email", "local@example.org email"]) == {
            "carol@example.org email": "@carol:hs.test",
            "local@example.org email": "@local:hs.test"}
    # The breaker says it once (a lookup that fell back says so again only at DEBUG).
    attempts = [r for r in caplog.records
                if r.levelno >= logging.WARNING and "cannot connect" in r.getMessage()]
    assert len(attempts) == 1  # then live lookups pause instead of each waiting


async def test_matrix_form_and_national_numbers(kith_factory: KithFactory,
                                                slapd: Slapd) -> None:
    kith = await start(kith_factory, slapd, msisdn_default_region="GB")
    token = await kith.register("alice")
    slapd.modify("ldapadd", NUMBERS)  # after the sync: only a live search finds them
    queries = {f"{t.address} msisdn": mxid for t, mxid in NUMBER_OWNERS.items()}
    assert await kith.lookup(token, "none", list(queries)) == queries
    numbers = [(t.medium, t.address) for t in NUMBER_OWNERS]
    assert await hashed(kith, token, *numbers) == {
        "442079460999": "@carol:hs.test"}  # carol was synced; the others not yet
    await sync_of(kith).full()
    assert await hashed(kith, token, *numbers) == {
        t.address: mxid for t, mxid in NUMBER_OWNERS.items()}


async def test_a_hung_directory_does_not_hang_lookups(
        kith_factory: KithFactory, slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kith.sources.ldap")
    kith = await start(kith_factory, slapd, lookup_timeout=2, breaker_cooldown=0.2)
    token = await kith.register("alice")
    await kith.bind("local@example.org", "@local:hs.test")
    expected = {"local@example.org email": "@local:hs.test",
                "carol@example.org email": "@carol:hs.test"}  # carol: from the sync
    with slapd.paused():
        started = time.monotonic()
        assert await kith.lookup(token, "none", list(expected)) == expected
        assert time.monotonic() - started < 10
        # Later lookups do not wait, while probes (one at a time) keep failing.
        assert kith.server.services is not None
        directory = kith.server.services.lookup.directory
        assert directory is not None
        probed = False
        probing_until = time.monotonic() + 3
        while time.monotonic() < probing_until:
            started = time.monotonic()
            assert await kith.lookup(token, "none", list(expected)) == expected
            assert time.monotonic() - started < 1
            probed = probed or directory.probing
            await asyncio.sleep(0.05)
        assert probed
    slapd.modify("ldapadd", f"""dn: uid=erin,{PEOPLE}
objectClass: inetOrgPerson
uid: erin
cn: Erin
sn: E
mail: erin@example.org
""")
    # Not synced yet: only a live search can answer it, once a probe found LDAP again.
    await wait_for("LDAP answers again", lambda: kith.lookup(
        token, "none", ["erin@example.org email"]), timeout_s=20)
    breaker_lines = [r.getMessage() for r in caplog.records
                     if r.name == "kith.sources.ldap" and r.levelno >= logging.INFO]
    assert len([m for m in breaker_lines if "not asked again" in m]) == 1, breaker_lines
    assert len([m for m in breaker_lines if "answers again" in m]) == 1, breaker_lines


async def test_kith_syncs_at_start(kith_factory: KithFactory, slapd: Slapd) -> None:
    kith: RunningKith = await kith_factory({"ldap": slapd.ldap_section()})
    token = await kith.register("alice")
    assert await wait_for("the sync at start", lambda: hashed(
        kith, token, ("email", "carol@example.org"))) == {
        "carol@example.org": "@carol:hs.test"}


def test_one_worker_claims_the_sync() -> None:
    counters = SharedCounters()
    assert counters.claim(SharedCounters.LDAP_SYNC)
    assert not counters.claim(SharedCounters.LDAP_SYNC)


@pytest.mark.postgres
async def test_instances_sharing_postgresql_sync_one_at_a_time(
        postgresql_url: str, kith_factory: KithFactory, slapd: Slapd) -> None:
    # (postgresql_url first: the database outlives the kiths at teardown)
    sections = {"db": {"db.url": postgresql_url},
                "ldap": slapd.ldap_section(sync_interval="0.1")}
    first = await kith_factory(sections, name="first")
    second = await kith_factory(sections, name="second")
    await wait_for("the first to sync", lambda: sync_of(first).syncing and sync_of(first).last_full)
    await wait_for("three refused turns of the second",
                   lambda: sync_of(second).turns_refused >= 3)
    assert not sync_of(second).syncing and not sync_of(second).last_full
    # Both answer from the rows the first one synced (the second reads what another
    # instance wrote within its follow interval).
    token = await second.register("alice")

    async def second_answers() -> bool:
        return await hashed(second, token, ("email", "carol@example.org")) == {
            "carol@example.org": "@carol:hs.test"}
    await wait_for("the second to answer from the synced rows", second_answers)

    await first.server.stop()
    await wait_for("the second to take over",
                   lambda: sync_of(second).syncing and sync_of(second).last_full)
