"""An LDAP directory (OpenLDAP, Active Directory) as a trusted source of 3PID → MXID.

ldap3 is synchronous: every call runs on a small thread pool (one thread per pooled
connection), never on the event loop.  Every value put into a filter is escaped
(RFC 4515), the operator's `filter` is ANDed onto every search, StartTLS really runs and
a failure is an error (never a fall back to plaintext), and plain-text lookups put all
the addresses of a request into one OR-filter per chunk.

A live lookup waits `lookup_timeout` at most, and the thread doing it gives up at the
same moment (its socket times out), so a hung directory neither holds a request nor
ties up the pool for long.  The first failure opens a circuit breaker: lookups then
answer without the directory at once, and a probe in the background (at most once per
`breaker_cooldown`, and every sync) finds out when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from kith.breaker import CircuitBreaker
from kith.caches import AnswerCache
from kith.config import LdapConfig
from kith.metrics import BREAKER_OPEN
from kith.sources.errors import LdapError, LdapUnavailable
from kith.sources.ldap_numbers import directory_forms, normalise_msisdn
from kith.threepid import EMAIL, MEDIUMS, MSISDN, Threepid, is_valid_mxid, normalise_address

log = logging.getLogger(__name__)

T = TypeVar("T")

LOOKUP_CHUNK = 100  # addresses per OR-filter
PAGE_SIZE = 1000  # Active Directory's default MaxPageSize


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    dn: str
    mxid: str
    threepids: tuple[Threepid, ...]
    changed: str  # the change attribute's raw value ("" when absent)


def normalise_email(value: str) -> str | None:
    if value[:5].lower() == "smtp:":  # Active Directory proxyAddresses
        value = value[5:]
    return normalise_address(EMAIL, value)


class LdapDirectory:
    """Searches the directory; `searches` counts the searches sent (for tests/metrics)."""

    def __init__(self, config: LdapConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(config.pool_size, thread_name_prefix="kith-ldap")
        self._idle: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        # What the directory answered, "nobody" included, for cache_ttl.
        self._cache: AnswerCache[Threepid, str] = AnswerCache(
            config.cache_ttl_s, config.cache_ttl_s, clock=clock)
        self.searches = 0
        self._breaker = CircuitBreaker(f"LDAP directory {config.uri}", threshold=1,
                                       cooldown_s=config.breaker_cooldown_s, clock=clock,
                                       logger=log,
                                       on_state=BREAKER_OPEN.labels(dependency="ldap").set)
        self._probes: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    @property
    def calls_in_flight(self) -> int:
        """Jobs running in the pool's threads now (each ends by its deadline)."""
        return self._in_flight

    @property
    def probing(self) -> bool:
        """Whether a probe of a failed directory is under way."""
        return bool(self._probes)

    # ------------------------------------------------------------------ lookups

    async def lookup(self, threepids: Iterable[Threepid]) -> dict[Threepid, str]:
        """The MXID of each (medium, normalised address) the directory maps."""
        found, uncached = self._cache.split(dict.fromkeys(threepids))
        missing = [threepid for threepid in uncached
                   if threepid.medium in MEDIUMS and self.config.attrs_for(threepid.medium)]
        if not missing:
            return found
        if self._breaker.is_open:
            if not self._probes and self._breaker.allow():  # one probe at a time
                self._probe_soon()
            raise LdapUnavailable(f"LDAP {self.config.uri} failed and has not answered since")
        deadline = time.monotonic() + self.config.lookup_timeout_s
        for start in range(0, len(missing), LOOKUP_CHUNK):
            chunk = missing[start:start + LOOKUP_CHUNK]
            filter_ = self._lookup_filter(chunk)
            entries = await self._run(partial(self._search_sync, filter_=filter_), deadline)
            answers = pick_owners(entries, set(chunk))
            self._cache.remember(chunk, answers)
            found.update(answers)
        return found

    def _lookup_filter(self, chunk: Sequence[Threepid]) -> str:
        terms: list[str] = []
        for threepid in chunk:
            values = [threepid.address]
            if threepid.medium == MSISDN:
                values = directory_forms(threepid.address, self.config.msisdn_default_region)
            for attr in self.config.attrs_for(threepid.medium):
                terms += [f"({attr}={escape_filter_chars(v)})" for v in values]
        return self._and_filter(f"(|{''.join(terms)})")

    def _and_filter(self, clause: str) -> str:
        return f"(&{self.config.filter}{clause})" if self.config.filter else clause

    # ------------------------------------------------------------------ sync

    async def entries(self, changed_since: str | None = None) -> list[DirectoryEntry]:
        """Every entry with a mapped attribute (changed at or after `changed_since`)."""
        present = "".join(f"({a}=*)" for a in (*self.config.email, *self.config.msisdn))
        clause = f"(|{present})"
        if changed_since is not None:
            changed = f"({self.config.changed_attr}>={escape_filter_chars(changed_since)})"
            clause = f"(&{changed}{clause})"
        filter_ = self._and_filter(clause)
        # No bound on the whole sync (a big directory takes a while); each read has one.
        return await self._run(lambda conn: self._paged_search_sync(conn, filter_), None)

    def changed_cursor(self, changed: str, margin_s: float) -> str:
        """A change-attribute value `margin_s` before `changed` (generalized time)."""
        moment = datetime.strptime(changed[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        earlier = (moment - timedelta(seconds=margin_s)).strftime("%Y%m%d%H%M%S")
        return earlier + (".0Z" if self.config.preset == "active_directory" else "Z")

    # ------------------------------------------------------------------ plumbing

    async def check(self) -> None:
        """Search the base entry: fails unless the directory answers within the lookup
        timeout.  A success closes the breaker."""
        await self._run(self._probe_sync, time.monotonic() + self.config.lookup_timeout_s)

    async def close(self) -> None:
        for probe in list(self._probes):
            probe.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        # Threads still in ldap3 calls end at their socket timeouts; queued jobs are
        # dropped.
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            _quietly_unbind(conn)

    def _probe_soon(self) -> None:
        async def probe() -> None:
            with contextlib.suppress(LdapError):  # the breaker has the outcome
                await self.check()

        task = asyncio.create_task(probe(), name="kith-ldap-probe")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _run(self, job: Callable[[ldap3.Connection], T], deadline: float | None) -> T:
        """Run `job` on a pooled connection in the pool's thread, by `deadline`
        (time.monotonic(); None: each read waits search_timeout), telling the breaker
        whether the directory answered."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, self._in_thread, job, deadline)
        try:
            if deadline is None:
                result = await work
            else:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    result = await work
        except TimeoutError:
            # The thread gives up at its socket timeout (or never starts the job).
            error = LdapError(f"LDAP {self.config.uri}: no answer within "
                              f"{self.config.lookup_timeout_s:g} s")
            self._breaker.failed(str(error))
            raise error from None
        except LdapError as exc:
            self._breaker.failed(str(exc))
            raise
        self._breaker.succeeded()
        return result

    def _in_thread(self, job: Callable[[ldap3.Connection], T], deadline: float | None) -> T:
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._with_connection(job, deadline)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _with_connection(self, job: Callable[[ldap3.Connection], T],
                         deadline: float | None) -> T:
        """Run `job` on a pooled connection; a stale one is replaced once, in time."""
        for attempt in (1, 2):
            wait_s = self._wait_s(deadline)  # before taking a connection: time may be up
            fresh = False
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect(wait_s)
                fresh = True
            try:
                _set_read_timeout(conn, self._wait_s(deadline))
                result = job(conn)
            except LDAPException as exc:
                _quietly_unbind(conn)
                # A pooled connection the server dropped fails at once: replace it.  A
                # timeout is the directory's, not the connection's: asking again would
                # only wait again.
                if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                    raise LdapError(f"LDAP {self.config.uri}: {exc}") from exc
                continue
            except BaseException:
                _quietly_unbind(conn)
                raise
            self._idle.put(conn)
            return result
        raise AssertionError("unreachable")

    def _wait_s(self, deadline: float | None) -> float:
        """How long one read may wait: search_timeout, or what is left until `deadline`."""
        if deadline is None:
            return self.config.search_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise LdapError(f"LDAP {self.config.uri}: no answer within "
                            f"{self.config.lookup_timeout_s:g} s")
        return min(left, self.config.search_timeout_s)

    def _connect(self, wait_s: float) -> ldap3.Connection:
        cfg = self.config
        uri = cfg.uri
        use_ssl = uri.lower().startswith("ldaps://")
        tls = None
        if use_ssl or cfg.startls:
            if not cfg.verify_certs:
                log.warning("[ldap] verify_certs = false: the directory's certificate is "
                            "not checked")
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED if cfg.verify_certs else ssl.CERT_NONE,
                ca_certs_file=cfg.ca_file or None,
            )
        try:
            server = ldap3.Server(uri, use_ssl=use_ssl, tls=tls, get_info=ldap3.NONE,
                                  connect_timeout=min(cfg.connect_timeout_s, wait_s))
            # ldap3 wants whole seconds here (the TLS handshake); reads after it are
            # bounded to the fraction by _set_read_timeout.
            conn = ldap3.Connection(
                server, user=cfg.bind_dn or None, password=cfg.bind_pw or None,
                auto_bind=ldap3.AUTO_BIND_NONE, read_only=True, auto_referrals=False,
                receive_timeout=math.ceil(wait_s), raise_exceptions=False,
            )
            conn.open()
            _set_read_timeout(conn, wait_s)
            if cfg.startls and not conn.start_tls():
                _quietly_unbind(conn)
                raise LdapError(f"LDAP {uri}: StartTLS failed: {_describe(conn)}")
            if cfg.startls and not conn.tls_started:
                _quietly_unbind(conn)
                raise LdapError(f"LDAP {uri}: StartTLS did not start")
            if not conn.bind():
                _quietly_unbind(conn)
                raise LdapError(f"LDAP {uri}: bind as {cfg.bind_dn or 'anonymous'} failed: "
                                f"{_describe(conn)}")
        except LDAPException as exc:
            raise LdapError(f"LDAP {uri}: cannot connect: {exc}") from exc
        return conn

    def _probe_sync(self, conn: ldap3.Connection) -> None:
        ok = conn.search(self.config.base, "(objectClass=*)", search_scope=ldap3.BASE,
                         attributes=[], time_limit=int(max(1, self.config.lookup_timeout_s)))
        if not ok:
            raise LdapError(f"LDAP search of {self.config.base} failed: {_describe(conn)}")

    def _search_sync(self, conn: ldap3.Connection, filter_: str) -> list[DirectoryEntry]:
        self.searches += 1
        ok = conn.search(self.config.base, filter_, search_scope=ldap3.SUBTREE,
                         attributes=self._attributes(), time_limit=int(
                             max(1, self.config.search_timeout_s)))
        if not ok and (conn.result or {}).get("result") != 0:
            raise LdapError(f"LDAP search failed: {_describe(conn)}")
        return list(self._entries(conn.response or ()))

    def _paged_search_sync(self, conn: ldap3.Connection,
                           filter_: str) -> list[DirectoryEntry]:
        self.searches += 1
        pages = conn.extend.standard.paged_search(
            self.config.base, filter_, search_scope=ldap3.SUBTREE,
            attributes=self._attributes(), paged_size=PAGE_SIZE, generator=True)
        entries = list(self._entries(pages))
        if (conn.result or {}).get("result", 0) != 0:
            raise LdapError(f"LDAP search failed: {_describe(conn)}")
        return entries

    def _attributes(self) -> list[str]:
        return list(dict.fromkeys((*self.config.attributes, self.config.changed_attr)))

    def _entries(self, response: Iterable[dict[str, Any]]) -> Iterator[DirectoryEntry]:
        cfg = self.config
        for item in response:
            if item.get("type") != "searchResEntry":
                continue
            raw = {k.lower(): v for k, v in item.get("raw_attributes", {}).items()}
            mxid = self._mxid(_values(raw, cfg.id_attr))
            if mxid is None:
                log.debug("LDAP entry %s has no usable %s", item.get("dn"), cfg.id_attr)
                continue
            threepids: dict[Threepid, None] = {}
            for attr in cfg.email:
                for value in _values(raw, attr):
                    if (email := normalise_email(value)) is not None:
                        threepids[Threepid(EMAIL, email)] = None
            for attr in cfg.msisdn:
                for value in _values(raw, attr):
                    msisdn = normalise_msisdn(value, cfg.msisdn_default_region)
                    if msisdn is not None:
                        threepids[Threepid(MSISDN, msisdn)] = None
            changed = _values(raw, cfg.changed_attr)
            yield DirectoryEntry(str(item.get("dn", "")), mxid, tuple(threepids),
                                 changed[0] if changed else "")

    def _mxid(self, values: list[str]) -> str | None:
        if not values:
            return None
        value = values[0].strip()
        mxid = f"@{value.lower()}:{self.config.hs_name}" if self.config.hs_name else value
        return mxid if is_valid_mxid(mxid) else None


def pick_owners(entries: Iterable[DirectoryEntry],
                wanted: set[Threepid] | None = None) -> dict[Threepid, str]:
    """3PID → mxid; an address on several entries goes to the lowest DN."""
    owners: dict[Threepid, tuple[str, str]] = {}
    for entry in entries:
        for threepid in entry.threepids:
            if wanted is not None and threepid not in wanted:
                continue
            current = owners.get(threepid)
            if current is None:
                owners[threepid] = (entry.dn.lower(), entry.mxid)
                continue
            if current[1] != entry.mxid:
                log.warning("LDAP: one %s address is on two entries (%s, %s); using the "
                            "first by DN", threepid.medium, current[0], entry.dn.lower())
            owners[threepid] = min(current, (entry.dn.lower(), entry.mxid))
    return {threepid: mxid for threepid, (_, mxid) in owners.items()}


def _values(raw: dict[str, Any], attr: str) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for v in raw.get(attr.lower(), ())]


def _describe(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    return str(result.get("description") or result.get("message") or "no answer")


def _set_read_timeout(conn: ldap3.Connection, wait_s: float) -> None:
    if conn.socket is not None:
        conn.socket.settimeout(wait_s)


def _quietly_unbind(conn: ldap3.Connection) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection
        conn.unbind()
