"""LDAP figures for docs/performance.md: a real slapd with N entries (default 100k).

    .venv/bin/python -m bench.ldap_sync [N]

Measures a full sync into the store, a no-change full sync, an incremental sync after
changing 100 entries, a plain-text lookup of 1000 addresses (LDAP round trips counted)
and sha256 lookups of synced LDAP users against local bindings (in-process).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kith.config import DbConfig, parse_ldap_section
from kith.services.index import AssociationIndex
from kith.services.ldap_sync import LdapSync
from kith.services.lookup import LookupService
from kith.services.pepper import LookupPeppers
from kith.sources.ldap import LdapDirectory
from kith.store import AssociationRow, Store
from kith.threepid import lookup_hash
from tests.conftest import free_port
from tests.sources.conftest import ROOT_DN, ROOT_PW, SEED, SLAPD, SUFFIX, Slapd, write_slapd_conf

PEOPLE = f"ou=people,{SUFFIX}"


def entries_ldif(n: int) -> str:
    parts = [SEED.split("\n\ndn: uid=alice")[0], ""]
    for i in range(n):
        parts.append(f"""dn: uid=user{i},{PEOPLE}
objectClass: inetOrgPerson
uid: user{i}
cn: User {i}
sn: {i}
mail: user{i}@example.org
mail: u{i}@corp.example.org
mobile: +4420{i:08d}
""")
    return "\n".join(parts)


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "slapd"
        directory.mkdir()
        write_slapd_conf(directory, None)
        ldif = directory / "seed.ldif"
        ldif.write_text(entries_ldif(n))
        t = time.perf_counter()
        subprocess.run([SLAPD.replace("slapd", "slapadd"), "-q", "-f",  # noqa: S603
                        str(directory / "slapd.conf"), "-l", str(ldif)], check=True)
        print(f"slapadd {n} entries: {time.perf_counter() - t:.1f} s")
        time.sleep(2)  # so that the incremental sync tells new changes from the seed
        slapd = Slapd(directory, free_port(), free_port())
        slapd.start(tls=False)
        try:
            asyncio.run(measure(slapd, Path(tmp), n))
        finally:
            slapd.stop()


async def measure(slapd: Slapd, tmp: Path, n: int) -> None:
    config = parse_ldap_section({
        "uri": slapd.uri, "base": PEOPLE, "bind_dn": ROOT_DN, "bind_pw": ROOT_PW,
        "hs_name": "hs.test", "filter": "(objectClass=inetOrgPerson)"}, env={})
    assert config is not None
    store = await Store.open(DbConfig(file=str(tmp / "kith.db")))
    index = AssociationIndex(store)
    peppers = LookupPeppers(store, index)
    await peppers.load()
    directory = LdapDirectory(config)
    pepper = index.pepper
    sync = LdapSync(directory, store, index, change_margin_s=0)
    try:
        t = time.perf_counter()
        result = await sync.full()
        print(f"full sync: {result.entries} entries, {result.written} addresses written "
              f"in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        result = await sync.full()
        print(f"full sync, nothing changed: {result.written} written "
              f"in {time.perf_counter() - t:.1f} s")
        # The first incremental sync moves the cursor past the seed (slapadd's timestamps).
        for first in (0, 100):
            await asyncio.sleep(1.1)
            slapd.modify("ldapmodify", "".join(
                f"dn: uid=user{i},{PEOPLE}\nchangetype: modify\nreplace: mail\n"
                f"mail: moved{i}@example.org\n\n" for i in range(first, first + 100)))
            if first == 0:
                await sync.incremental()
        t = time.perf_counter()
        result = await sync.incremental()
        print(f"incremental sync after 100 changed entries: {result.entries} entries, "
              f"{result.written} written, {result.removed} removed "
              f"in {time.perf_counter() - t:.2f} s")

        # Local bindings, as many as LDAP users, for the sha256 comparison.
        local_rows = [AssociationRow("local", "email", f"local{i}@example.org",
                                     f"@local{i}:hs.test", 0, 0, 1,
                                     lookup_hash("email", f"local{i}@example.org", pepper))
                      for i in range(n)]
        for start in range(0, n, 5000):
            await store.associations.write(local_rows[start:start + 5000])
        await index.catch_up()
        lookups = LookupService(peppers, index, 100_000, directory=directory)
        rng = random.Random(1)
        picks = rng.sample(range(200, n), 1000)
        queries = [f"user{i}@example.org email" for i in picks]
        before = directory.searches
        t = time.perf_counter()
        found = await lookups.lookup("none", pepper, queries)
        print(f"plain-text lookup of 1000 LDAP addresses: {len(found)} found, "
              f"{directory.searches - before} LDAP searches, "
              f"{(time.perf_counter() - t) * 1000:.0f} ms")
        for label, fmt in (("LDAP", "user{}@example.org"), ("local", "local{}@example.org")):
            hashes = [lookup_hash("email", fmt.format(i), pepper) for i in picks]
            t = time.perf_counter()
            for _ in range(100):
                found = await lookups.lookup("sha256", pepper, hashes)
            elapsed = time.perf_counter() - t
            print(f"sha256 lookups of {label} users: {len(found)}/1000 found, "
                  f"{100_000 / elapsed / 1e6:.2f} M addresses/s (in-process)")
    finally:
        await directory.close()
        await store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
