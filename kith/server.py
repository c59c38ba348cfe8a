"""Builds the services and the aiohttp apps (client API, internal API, replication) and
runs them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from kith import logs, metrics_multiprocess
from kith.api import (
    account,
    internal,
    invites,
    lookup,
    pubkey,
    terms,
    threepid,
    validate,
    versions,
)
from kith.api.edge import EdgeAppRunner
from kith.api.http import OBEY_X_FORWARDED_FOR, SERVICES, V1_PREFIX, new_app
from kith.config import LDAP, LOCAL, UPSTREAM, ConfigError, KithConfig, parse_signing_key
from kith.delivery.email import EmailSender, EmailTemplates
from kith.delivery.sms import SmsProvider, sms_provider_from_config
from kith.delivery.templates import Templates
from kith.federation.client import FederationClient
from kith.federation.keys import ServerKeyFetcher
from kith.federation.policy import OutboundAddressPolicy
from kith.replication.node import ReplicationNode
from kith.services import Services, lookup_table
from kith.services.accounts import AccountService
from kith.services.adopted_pepper import AdoptedPepper
from kith.services.bindings import BindingService
from kith.services.coherence import SharedCounters
from kith.services.erasure import ErasureService
from kith.services.homeserver_auth import HomeserverAuthenticator
from kith.services.index import AssociationIndex
from kith.services.invites import InviteService, public_base_url
from kith.services.keys import ServerKeys
from kith.services.ldap_sync import LdapSync
from kith.services.limits import LookupBudget, SendLimits
from kith.services.lookup import LookupService
from kith.services.onbind import OnbindService
from kith.services.pepper import LookupPeppers, pepper_upkeep
from kith.services.status import export_binding_gauges, export_queue_gauges
from kith.services.terms import TermsSource
from kith.services.validation import ValidationService
from kith.sources.ldap import LdapDirectory
from kith.sources.upstream import UpstreamIdentityServer
from kith.store import Store
from kith.threepid import new_pepper, now_ms
from kith.tls import ClientTls

log = logging.getLogger(__name__)

# How often each process reads what other instances wrote: a bind on one instance is
# found by lookups on the others within about this long (docs/performance.md).
INDEX_FOLLOW_INTERVAL_S = 0.25
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# How often an instance asks whether the lookup pepper is due for a change.
PEPPER_CHECK_INTERVAL_S = 60.0
# How often, with [proxy] adopt_pepper, each process reads the upstream's hash_details
# (a forwarded lookup answered M_INVALID_PEPPER has it read at once).
UPSTREAM_PEPPER_INTERVAL_S = 300.0
# Expired sessions (as often as Sydent purges them), invites, empty rate-limit buckets.
PURGE_INTERVAL_S = 600.0


# Connections the kernel completes and queues while kith is busy accepting others
# (aiohttp's default: 128); a burst past the queue has its handshakes dropped and retried
# a second later.  Linux caps it at net.core.somaxconn (4096 since 5.4).
LISTEN_BACKLOG = 1024

# A validation request waits at most this long for the SMTP server or SMS provider.
DELIVERY_TIMEOUT_S = 10.0


class ListenError(Exception):
    """A listener could not be opened (port in use, address not available, ...)."""


async def build_services(config: KithConfig, store: Store, federation: FederationClient,
                         counters: SharedCounters | None = None, *,
                         serving: bool = True) -> Services:
    """Everything one process serves with; `counters` when it is one of several workers.
    Not `serving` (a command run offline): the upstream's pepper is not adopted."""
    # The config falls back to the host name (with a warning) when server.name is empty.
    keys = ServerKeys(config.general.server_name,
                      parse_signing_key(config.crypto.signing_key))
    terms_source = TermsSource.from_config(config.general.terms_path)
    sources = config.sources
    index = AssociationIndex(
        store, counters.counter(SharedCounters.ASSOCIATIONS) if counters else None,
        order=[source for source in sources.precedence if source != UPSTREAM])
    peppers = LookupPeppers(store, index)
    upstream = UpstreamIdentityServer(sources.proxy, OutboundAddressPolicy(
        config.general.ip_blacklist, config.general.ip_whitelist)) if sources.proxy else None
    adopted = None
    if serving and upstream is not None and upstream.config.adopt_pepper:
        adopted = AdoptedPepper(store, peppers, upstream)
        await adopted.start()
    await peppers.load()
    directory = LdapDirectory(sources.ldap) if sources.ldap else None
    general = config.general
    lookup_service = LookupService(
        peppers, index, general.address_lookup_limit, precedence=sources.precedence,
        directory=directory, upstream=upstream, adopted=adopted,
        budget=LookupBudget(store, general.lookup_budget_account, general.lookup_budget_ip))
    limits = SendLimits(store, config)
    templates = Templates.from_config(config)
    onbind = OnbindService(store, keys, federation,
                           give_up_after_s=config.general.onbind_give_up_after_s,
                           delete_tokens=config.general.delete_tokens_on_bind,
                           lease_s=2 * config.http.federation_timeout_s + 30,
                           changes=counters.counter(SharedCounters.INVITES)
                           if counters else None)
    validation = validation_service(config, store, templates, limits)
    services = Services(
        keys=keys,
        terms=terms_source,
        accounts=AccountService(
            store, terms_source, federation.openid_userinfo,
            config.general.homeserver_allow_list,
            counters.counter(SharedCounters.ACCOUNTS) if counters else None, limits),
        index=index,
        lookup=lookup_service,
        bindings=BindingService(store, index, keys, lookup=lookup_service,
                                onbind=onbind, validation=validation),
        homeserver_auth=HomeserverAuthenticator(
            ServerKeyFetcher(federation), (keys.server_name, *config.general.server_aliases)),
        validation=validation,
        templates=templates,
        ldap_sync=LdapSync(directory, store, index) if directory else None,
        invites=invite_service(config, store, keys, lookup_service, templates, onbind, limits),
        limits=limits,
        onbind=onbind,
    )
    services.erasure = ErasureService(store, index, services.accounts,
                                      services.bindings.on_change)
    return services


def invite_service(config: KithConfig, store: Store, keys: ServerKeys,
                   lookup_service: LookupService, templates: Templates,
                   onbind: OnbindService, limits: SendLimits) -> InviteService:
    email = config.email
    return InviteService(
        store, keys, lookup_service, email=email,
        email_sender=EmailSender(email, timeout_s=DELIVERY_TIMEOUT_S),
        email_templates=EmailTemplates(templates, email),
        limits=limits,
        base_url=public_base_url(config.http.client_http_base, keys.server_name),
        v1_enabled=config.general.enable_v1_access,
        onbind=onbind,
        lifetime_s=config.general.invite_lifetime_s,
    )


def sms_provider(config: KithConfig) -> SmsProvider | None:
    """The configured provider, or None (msisdn requests then fail with M_SEND_ERROR)."""
    base_url = config.sms.base_url or None
    try:
        return sms_provider_from_config(config.sms, base_url=base_url,
                                        timeout_s=DELIVERY_TIMEOUT_S)
    except (ConfigError, ValueError) as exc:
        log.warning("[sms] %s: phone numbers cannot be validated", exc)
        return None


def validation_service(config: KithConfig, store: Store, templates: Templates,
                       limits: SendLimits) -> ValidationService:
    email = config.email
    return ValidationService(
        store,
        email_sender=EmailSender(email, timeout_s=DELIVERY_TIMEOUT_S),
        email_templates=EmailTemplates(templates, email),
        limits=limits,
        sms=config.sms,
        sms_provider=sms_provider(config),
        client_http_base=config.http.client_http_base,
    )


def client_app(config: KithConfig, services: Services) -> web.Application:
    app = new_app(config.http.max_body_bytes, config.general.allow_query_access_token,
                  body_timeout_s=config.http.body_timeout_s)
    app[SERVICES] = services
    app[OBEY_X_FORWARDED_FOR] = config.http.obey_x_forwarded_for
    versions.add_routes(app.router)
    account.add_routes(app.router)
    terms.add_routes(app.router)
    pubkey.add_routes(app.router, "/_matrix/identity/v2")
    lookup.add_routes(app)
    validate.add_routes(app.router)
    threepid.add_routes(app.router)
    invites.add_routes(app.router)
    if config.general.enable_v1_access:
        add_v1_routes(app.router, config)
    return app


def add_v1_routes(router: web.UrlDispatcher, config: KithConfig) -> None:
    """The legacy API (Identity Service r0.3.0): the v2 handlers under the v1 prefix,
    without access tokens, plus v1's own lookup shapes."""
    prefix = V1_PREFIX.rstrip("/")
    versions.add_status_route(router, prefix)
    pubkey.add_routes(router, prefix)
    validate.add_routes(router, prefix)
    threepid.add_routes(router, prefix, bind_route=config.general.enable_v1_associations)
    lookup.add_v1_routes(router, prefix)
    invites.add_routes(router, prefix)


def internal_app(config: KithConfig, services: Services) -> web.Application:
    app = new_app(config.http.max_body_bytes, body_timeout_s=config.http.body_timeout_s)
    app[SERVICES] = services
    internal.add_routes(app)
    return app


GaugeRefresh = Callable[[], Awaitable[None]]
REFRESH_GAUGES: web.AppKey[GaugeRefresh] = web.AppKey("refresh_gauges")


async def serve_metrics(request: web.Request) -> web.Response:
    try:
        await request.app[REFRESH_GAUGES]()
    except Exception:  # noqa: BLE001 - the other metrics are still worth answering
        log.warning("cannot read the gauges from the store", exc_info=True)
    if metrics_multiprocess.enabled():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = await asyncio.to_thread(generate_latest, registry)
    else:
        body = generate_latest()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def metrics_app(refresh_gauges: Callable[[], Awaitable[None]]) -> web.Application:
    """`GET /metrics` for Prometheus (Sydent's `[general] prometheus_port`).

    Several workers share this port by SO_REUSEPORT as they share the others; whichever
    answers reads every worker's samples (kith.metrics_multiprocess), so counters are
    summed over workers.  The gauges read from the store are refreshed first.
    """
    app = web.Application()
    app[REFRESH_GAUGES] = refresh_gauges
    app.router.add_get("/metrics", serve_metrics)
    return app


async def periodically(interval_s: float, what: str,
                       job: Callable[[], Awaitable[int]], first_after_s: float = 0) -> None:
    """Run `job` after `first_after_s` and every `interval_s`; a failure is logged and
    tried next time."""
    await asyncio.sleep(first_after_s)
    while True:
        try:
            done = await job()
        except Exception:
            log.warning("%s failed; trying again in %.0f s", what, interval_s, exc_info=True)
        else:
            if done:
                log.info("%s: %d", what, done)
        await asyncio.sleep(interval_s)


@dataclass
class KithServer:
    """One running kith: its store, services and listeners."""

    config: KithConfig
    counters: SharedCounters | None = None
    store: Store | None = None
    federation: FederationClient | None = None
    services: Services | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    client_tls: ClientTls | None = None
    replication: ReplicationNode | None = None
    stopped: bool = False

    async def start(self) -> None:
        self.client_tls = await ClientTls.from_config(self.config.http)
        self.store = await Store.open(
            self.config.db, self.counters.write_lock if self.counters else None)
        self.federation = FederationClient.from_config(self.config.general, self.config.http)
        self.services = await build_services(self.config, self.store, self.federation,
                                             self.counters)
        self.tasks.append(asyncio.create_task(
            self.services.lookup.peppers.follow(INDEX_FOLLOW_INTERVAL_S)))
        if self.services.ldap_sync is not None and (
                self.counters is None or self.counters.claim(SharedCounters.LDAP_SYNC)):
            self.tasks.append(asyncio.create_task(self.services.ldap_sync.run()))
        for what, job in (
                ("purging expired validation sessions", self.services.validation.purge_expired),
                ("purging expired invites and their keys", self.services.invites.purge_expired),
                ("purging empty rate-limit buckets", self.services.limits.purge)):
            self.tasks.append(asyncio.create_task(
                periodically(PURGE_INTERVAL_S, what, job), name="kith-purge"))
        adopted = self.services.lookup.adopted
        if adopted is not None:
            self.tasks.append(asyncio.create_task(periodically(
                UPSTREAM_PEPPER_INTERVAL_S, "following the upstream's lookup pepper",
                adopted.check, first_after_s=UPSTREAM_PEPPER_INTERVAL_S),
                name="kith-upstream-pepper"))
        rotation_s = self.config.general.lookup_pepper_rotation_s
        if rotation_s is not None and adopted is not None:
            log.warning("[general] lookup_pepper.rotation is ignored: with [proxy] "
                        "adopt_pepper the lookup pepper is the upstream's")
            rotation_s = None
        if self.counters is None or self.counters.claim(SharedCounters.PEPPER_ROTATION):
            store = self.store
            self.tasks.append(asyncio.create_task(periodically(
                PEPPER_CHECK_INTERVAL_S if rotation_s is None
                else min(rotation_s / 4, PEPPER_CHECK_INTERVAL_S),
                "the lookup pepper's upkeep (changes finished or made)",
                lambda: pepper_upkeep(store, rotation_s)), name="kith-pepper-upkeep"))
        if self.services.lookup.budget is not None:
            self.tasks.append(asyncio.create_task(
                self.services.lookup.budget.run(), name="kith-lookup-budget"))
        if self.services.onbind is not None:
            self.tasks.append(asyncio.create_task(
                self.services.onbind.run(self.services.bindings.deliver_pending_invites),
                name="kith-onbind"))
        http = self.config.http
        if http.internal_port is not None:
            await self._listen(internal_app(self.config, self.services),
                               http.internal_bind_address, http.internal_port)
        self.replication = await ReplicationNode.build(self.config, self.store, self.services)
        if self.replication is not None:
            await self._listen(self.replication.app, http.replication_bind_address,
                               http.replication_port, self.replication.server_tls)
            self.tasks += self.replication.start(pushing=self.counters is None or self.counters
                                                 .claim(SharedCounters.REPLICATION_PUSH))
        general = self.config.general
        if general.prometheus_port is not None:
            await self._listen(metrics_app(self._refresh_gauges),
                               general.prometheus_addr or "127.0.0.1", general.prometheus_port)
        # The client port opens last: once it answers, so do the private ports (a load
        # balancer's health check, or a homeserver told "kith is up", may rely on it).
        await self._listen(client_app(self.config, self.services),
                           http.client_bind_address, http.client_port,
                           self.client_tls.context if self.client_tls else None)
        log.info("kith started: %d bindings, client API on %s://[%s]:%d",
                 len(self.services.index), "https" if self.client_tls else "http",
                 http.client_bind_address, http.client_port)
        if not lookup_table.COMPILED:
            log.warning(lookup_table.UNCOMPILED)
        synced = len(self.services.index.source(LDAP))
        if self.services.ldap_sync is None and synced:
            log.warning("%d addresses synced from an LDAP directory are in the store but "
                        "not served: [ldap] is not configured", synced)

    async def _refresh_gauges(self) -> None:
        assert self.store is not None and self.services is not None
        await export_queue_gauges(self.store, now_ms())
        await self.services.index.refresh()
        export_binding_gauges({source: len(self.services.index.source(source))
                               for source in (LOCAL, LDAP)})

    async def reload(self) -> None:
        """SIGHUP: reopen the log file (logrotate), load the client API's TLS
        certificate and key again."""
        logs.reopen()
        if self.client_tls is not None:
            await self.client_tls.reload()

    async def _listen(self, app: web.Application, host: str, port: int,
                      ssl_context: ssl.SSLContext | None = None) -> None:
        http = self.config.http
        runner = EdgeAppRunner(app, access_log=None, handle_signals=False,
                               header_timeout_s=http.header_timeout_s,
                               keepalive_timeout=http.keepalive_timeout_s)
        await runner.setup()
        self.runners.append(runner)
        # Several workers share each port (SO_REUSEPORT); the kernel spreads connections.
        # "::" means every interface, IPv4 too, as it does for Sydent; asyncio would make it
        # IPv6 only, so ask for all interfaces (a socket per address family) instead.
        site = web.TCPSite(runner, None if host in ("", "::") else host, port,
                           ssl_context=ssl_context, backlog=LISTEN_BACKLOG,
                           reuse_port=self.counters is not None)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(f"cannot listen on [{host}]:{port}: {exc.strerror}") from exc

    async def stop(self) -> None:
        """Stop what `start` started; a second call does nothing."""
        if self.stopped:
            return
        self.stopped = True
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in self.runners:
            await runner.cleanup()
        if self.services is not None:
            await self.services.lookup.close()
        if self.federation is not None:
            await self.federation.close()
        if self.store is not None:
            await self.store.close()


async def serve(config: KithConfig, counters: SharedCounters | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reopens the log and reloads the TLS
    certificate."""
    server = KithServer(config, counters)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await server.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await server.stop()


def write_pidfile(path: str) -> None:
    if path:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")


async def prepare_store(config: KithConfig) -> None:
    """Migrate and create the pepper once, before workers start and race for it."""
    store = await Store.open(config.db)
    try:
        await store.state.get_or_create("lookup_pepper", new_pepper())
    finally:
        await store.close()


def end_with_parent(parent: int) -> None:
    """Have the kernel stop this worker when the supervising parent dies, even by
    SIGKILL: a worker left alone would go on serving the shared ports unsupervised."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_workers(config: KithConfig, workers: int,
                run: Callable[[Coroutine[Any, Any, None]], None]) -> int:
    """Fork `workers` processes that share the listening ports; stop them all together.

    The parent only supervises: SIGTERM/SIGINT are passed on, and if one worker dies the
    others are stopped too, so a service manager sees the failure and restarts kith.
    """
    run(prepare_store(config))
    counters = SharedCounters()
    children: list[int] = []
    parent = os.getpid()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                end_with_parent(parent)
                run(serve(config, counters))
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    log.info("kith: %d workers started: %s", workers, children)

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            logs.reopen()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    status = 0
    while children:
        pid, code = os.wait()
        if pid in children:
            children.remove(pid)
            if metrics_multiprocess.enabled():
                metrics_multiprocess.worker_exited(pid)
            if code != 0:
                status = 1
                forward(signal.SIGTERM, None)
    return status
