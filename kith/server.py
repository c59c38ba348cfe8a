"""Builds the services and the aiohttp apps (client API, internal API) and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field

from aiohttp import web

from kith.api import account, internal, lookup, pubkey, terms, versions
from kith.api.http import SERVICES, new_app
from kith.config import ConfigError, KithConfig, parse_signing_key
from kith.federation.client import FederationClient
from kith.services import Services
from kith.services.accounts import AccountService
from kith.services.bindings import BindingService
from kith.services.keys import ServerKeys
from kith.services.lookup import AssociationIndex, LookupService
from kith.services.terms import TermsFileError, TermsSource
from kith.services.threepid import new_pepper
from kith.store import Store

log = logging.getLogger(__name__)

INDEX_FOLLOW_INTERVAL_S = 1.0


def server_name_of(config: KithConfig) -> str:
    if config.general.server_name:
        return config.general.server_name
    name = socket.gethostname()
    log.warning("[general] server.name is not set; signing as the host name %r", name)
    return name


async def build_services(config: KithConfig, store: Store,
                         federation: FederationClient) -> Services:
    keys = ServerKeys(server_name_of(config), parse_signing_key(config.crypto.signing_key))
    try:
        terms_source = TermsSource(config.general.terms_path)
    except TermsFileError as exc:
        raise ConfigError(f"[general] terms.path: {exc}") from exc
    pepper = await store.state.get_or_create("lookup_pepper", new_pepper())
    index = AssociationIndex()
    await index.load(store)
    return Services(
        keys=keys,
        terms=terms_source,
        accounts=AccountService(store, terms_source, federation.openid_userinfo,
                                config.general.homeserver_allow_list),
        index=index,
        lookup=LookupService(index, pepper, config.general.address_lookup_limit),
        bindings=BindingService(store, index, keys, pepper),
    )


def client_app(config: KithConfig, services: Services) -> web.Application:
    app = new_app(config.http.max_body_bytes, config.general.allow_query_access_token)
    app[SERVICES] = services
    versions.add_routes(app.router)
    account.add_routes(app.router)
    terms.add_routes(app.router)
    pubkey.add_routes(app.router, "/_matrix/identity/v2")
    lookup.add_routes(app.router)
    return app


def internal_app(config: KithConfig, services: Services) -> web.Application:
    app = new_app(config.http.max_body_bytes)
    app[SERVICES] = services
    internal.add_routes(app.router)
    return app


@dataclass
class KithServer:
    """One running kith: its store, services and listeners."""

    config: KithConfig
    store: Store | None = None
    federation: FederationClient | None = None
    services: Services | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        self.store = await Store.open(self.config.db)
        self.federation = FederationClient.from_config(self.config.general, self.config.http)
        self.services = await build_services(self.config, self.store, self.federation)
        self.tasks.append(asyncio.create_task(
            self.services.index.follow(self.store, INDEX_FOLLOW_INTERVAL_S)))
        http = self.config.http
        await self._listen(client_app(self.config, self.services),
                           http.client_bind_address, http.client_port)
        if http.internal_port is not None:
            await self._listen(internal_app(self.config, self.services),
                               http.internal_bind_address, http.internal_port)
        log.info("kith started: %d bindings, client API on [%s]:%d",
                 len(self.services.index), http.client_bind_address, http.client_port)

    async def _listen(self, app: web.Application, host: str, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, host or None, port, reuse_port=self.config.general.workers > 1)
        await site.start()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in self.runners:
            await runner.cleanup()
        if self.federation is not None:
            await self.federation.close()
        if self.store is not None:
            await self.store.close()


async def serve(config: KithConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    server = KithServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
