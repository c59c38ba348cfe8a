"""`kith status`: what a running kith holds, read from its store by a separate process,
for a person (at a glance) and for tools (`--json`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kith.store import AssociationRow, Store
from kith.threepid import lookup_hash
from tests.conftest import KithFactory, RunningKith, SmtpSink, wait_for
from tests.sources.conftest import Slapd

V2 = "/_matrix/identity/v2"


def status(kith: RunningKith, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kith", "--config", kith.config.path,
                           "status", *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(kith.config.path).parent)


async def test_status_shows_bindings_queues_and_the_ldap_sync(
        kith_factory: KithFactory, slapd: Slapd, smtp: SmtpSink) -> None:
    kith: RunningKith = await kith_factory({"ldap": slapd.ldap_section(sync_interval=1),
                                            "email": {"email.smtpport": smtp.port}})
    store: Store = kith.server.store  # type: ignore[assignment]
    await wait_for("the first LDAP sync", lambda: store.state.get("ldap_sync"))
    token = await kith.register("alice")
    auth = {"Authorization": f"Bearer {token}"}
    for address in ("zed@elsewhere.example", "yan@elsewhere.example"):
        async with kith.http.post(f"{kith.base}{V2}/store-invite", headers=auth, json={
                "medium": "email", "address": address, "room_id": "!r:hs.test",
                "sender": "@alice:hs.test"}) as resp:
            assert resp.status == 200, await resp.text()
    async with kith.http.post(f"{kith.base}{V2}/validate/email/requestToken", headers=auth,
                              json={"client_secret": "s3cret", "email": "dave@example.org",
                                    "send_attempt": 1}) as resp:
        assert resp.status == 200, await resp.text()
    await kith.bind("zed@elsewhere.example", "@zed:unreachable.invalid")  # its onbind waits
    pepper = kith.server.services.lookup.pepper  # type: ignore[union-attr]
    await store.associations.write_replicated([AssociationRow(
        source="local", medium="email", address="erin@peer.example", mxid="@erin:hs.test",
        ts=1, not_before=1, not_after=2**40, origin_server="peer.test", origin_id=3,
        lookup_hash=lookup_hash("email", "erin@peer.example", pepper))])
    ldap_bindings = len(kith.server.services.index.source("ldap"))  # type: ignore[union-attr]
    assert ldap_bindings > 0

    human = status(kith)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == (f"bindings:  {ldap_bindings + 2} ({ldap_bindings} ldap, "
                        "1 local, 1 peer peer.test)")
    assert lines[1] == "sessions:  1 waiting for their token, 0 validated"
    assert lines[2] == "invites:   1 waiting for their address to be bound"
    assert lines[3].startswith("onbind:    1 pending (oldest ")
    assert lines[3].endswith(", 0 gave up, 0 done")
    assert lines[4] == "peers:     none"
    assert lines[5].startswith("ldap:      last sync 20")
    assert ", last full sync 20" in lines[5] and " entries)" in lines[5], lines[5]

    machine = status(kith, "--json")
    assert machine.returncode == 0, machine.stderr
    answer = json.loads(machine.stdout)
    assert answer["bindings"] == {"ldap": ldap_bindings, "local": 1, "peer peer.test": 1}
    assert (answer["sessions_waiting"], answer["invites_pending"]) == (1, 1)
    assert answer["onbind"] == {"pending": 1}
    assert answer["onbind_oldest_pending_age_s"] >= 0
    assert answer["ldap_configured"] is True
    assert answer["ldap_sync"]["last_success_ts"] > 0
    assert "last_error" not in answer["ldap_sync"]

    # A directory that stops answering shows in the next syncs' state.
    slapd.stop()

    def failing() -> str | None:
        line = status(kith).stdout.splitlines()[5]
        return line if "; last error 20" in line else None
    line = await wait_for("the failed sync in the status", failing, timeout_s=20)
    assert line.startswith("ldap:      last sync 20"), line
