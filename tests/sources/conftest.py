"""A real OpenLDAP slapd on loopback, from a throwaway slapd.conf, seeded with LDIF."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.federation.conftest import TestPki, pki  # noqa: F401 - the shared test CA

SUFFIX = "dc=kith,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "secret"
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"

SEED = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: kith
dc: kith

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: uid=alice,ou=people,{SUFFIX}
objectClass: inetOrgPerson
objectClass: extensibleObject
uid: Alice
cn: Alice
sn: Liddell
mail: alice@example.org
mail: Alice.Work@Example.ORG
emailAddress: alice.other@example.net
telephoneNumber: +44 20 7946 0000
mobile: +1 (415) 555-0100

dn: uid=bob,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: Builder
mail: bob@example.org
mail: shared@example.org

dn: uid=carol,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: Singer
mail: carol@example.org
mail: shared@example.org
telephoneNumber: 020 7946 0999

dn: cn=printer,{SUFFIX}
objectClass: device
cn: printer
"""


@dataclass
class Slapd:
    directory: Path
    port: int
    tls_port: int
    pid: int = 0

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def ldap_section(self, **extra: object) -> dict[str, object]:
        section: dict[str, object] = {
            "uri": self.uri, "base": f"ou=people,{SUFFIX}", "email": "mail, email",
            "msisdn": "telephoneNumber, mobile", "id_attr": "uid", "hs_name": "hs.test",
            "bind_dn": ROOT_DN, "bind_pw": ROOT_PW, "filter": "(objectClass=inetOrgPerson)",
            "search_timeout": 5, "connect_timeout": 2,
        }
        section.update(extra)
        return section

    def modify(self, tool: str, ldif: str = "", *args: str) -> None:
        """Run ldapadd / ldapmodify / ldapdelete against this server as the root DN."""
        done = subprocess.run(
            [tool, "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PW, *args],
            input=ldif.encode(), capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.decode()}")

    def start(self, tls: bool = True) -> None:
        (self.directory / "slapd.pid").unlink(missing_ok=True)  # a killed slapd's
        urls = f"{self.uri}/ {self.ldaps_uri}/" if tls else f"{self.uri}/"
        subprocess.run(
            [SLAPD, "-f", str(self.directory / "slapd.conf"), "-h", urls],
            check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        pidfile = self.directory / "slapd.pid"
        while time.monotonic() < deadline:
            try:
                self.pid = int(pidfile.read_text())
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("slapd did not start")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """slapd stopped by SIGSTOP: connections stay open and nothing answers."""
        pid = self.pid
        assert pid, "slapd is not running"
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while not _all_threads_stopped(pid):  # a running thread may still answer
                if time.monotonic() > deadline:
                    raise RuntimeError("slapd did not stop")
                time.sleep(0.01)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        if not self.pid:
            return
        # The database is thrown away: SIGKILL spares slapd's second-long shutdown.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            self.pid = 0
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                break
            time.sleep(0.02)
        self.pid = 0


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            # The state follows the command name, which is in parentheses.
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    return bool(states) and all(state in ("T", "t") for state in states)


def write_slapd_conf(directory: Path, certs: TestPki | None) -> None:
    (directory / "db").mkdir()
    schema = "/etc/ldap/schema"
    tls = f"""\
TLSCACertificateFile {certs.ca_file}
TLSCertificateFile {certs.cert_file}
TLSCertificateKeyFile {certs.key_file}
""" if certs else ""
    (directory / "slapd.conf").write_text(f"""\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
pidfile {directory}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
{tls}database mdb
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {directory}/db
maxsize 1073741824
index objectClass eq
index mail,telephoneNumber,mobile,uid eq
""")


@pytest.fixture
def slapd(tmp_path: Path, pki: TestPki) -> Iterator[Slapd]:  # noqa: F811
    if not os.path.exists(SLAPD):
        if os.environ.get("CI"):
            pytest.fail("slapd is not installed (.ci/run installs slapd and ldap-utils)")
        pytest.skip("slapd is not installed (apt-get install slapd ldap-utils)")
    directory = tmp_path / "slapd"
    directory.mkdir()
    write_slapd_conf(directory, pki)
    server = Slapd(directory, free_port(), free_port())
    server.start()
    try:
        server.modify("ldapadd", SEED)
        yield server
    finally:
        server.stop()
