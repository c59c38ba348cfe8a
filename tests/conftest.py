"""Shared fixtures: a kith configured on loopback, running in-process or as a process,
and a homeserver stand-in that answers OpenID userinfo."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kith.config import KithConfig, load_config
from kith.server import KithServer
from tests import log_audit

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # The PostgreSQL fixtures (tests/pg.py), for the store tests and any other test
    # that runs kith on PostgreSQL.
    if not config.pluginmanager.has_plugin("tests.pg"):
        config.pluginmanager.import_plugin("tests.pg")
    # Every log of the run is searched for the addresses and secrets the tests used.
    if not config.pluginmanager.has_plugin("tests.log_audit"):
        config.pluginmanager.register(log_audit, "tests.log_audit")


async def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 10.0,
                   poll_s: float = 0.05) -> Any:
    """Poll `check` (a function or a coroutine function) every `poll_s` until it returns
    something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_FIRST_PORT, _PAST_LAST_PORT = 10000, _ephemeral_ports_start()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts later.

    Chosen below the kernel's ephemeral range: outgoing connections take their local
    ports there, so a port found free in that range may be taken before the server
    binds it.  Never the same port twice in one test run."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(_FIRST_PORT, _PAST_LAST_PORT)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def write_config(directory: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A sydent.conf for tests: loopback only, everything in `directory`."""
    base: dict[str, dict[str, Any]] = {
        "general": {"server.name": "kith.test", "pidfile.path": directory / "kith.pid",
                    "ip.whitelist": "127.0.0.1, ::1"},
        "db": {"db.file": directory / "kith.db"},
        "http": {"clientapi.http.bind_address": "127.0.0.1",
                 "clientapi.http.port": free_port(),
                 "internalapi.http.bind_address": "127.0.0.1",
                 "internalapi.http.port": free_port(),
                 "federation.timeout": 2},
        "email": {"email.smtphost": "127.0.0.1", "email.smtpport": 9},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = directory / "sydent.conf"
    with open(path, "w", encoding="utf-8") as f:
        for section, values in base.items():
            f.write(f"[{section}]\n")
            for key, value in values.items():
                f.write(f"{key} = {value}\n")
            f.write("\n")
    return path


@dataclass
class Homeserver:
    """A homeserver stand-in: answers /openid/userinfo for the tokens it has issued."""

    server_name: str
    url: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    delay_s: float = 0.0
    # Set at teardown: a delayed answer then ends at once, so stopping never waits for it.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    onbinds: list[dict[str, Any]] = field(default_factory=list)
    # The Host header of every userinfo request: the server name kith believed it called.
    userinfo_hosts: list[str] = field(default_factory=list)

    async def onbind(self, request: web.Request) -> web.Response:
        self.onbinds.append(await request.json())
        return web.json_response({})

    def issue(self, localpart: str) -> str:
        token = f"openid-{localpart}-{len(self.tokens)}"
        log_audit.remember("OpenID token", token)
        self.tokens[token] = f"@{localpart}:{self.server_name}"
        return token

    async def userinfo(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.userinfo_hosts.append(request.headers.get("Host", ""))
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.delay_s)
        sub = self.tokens.get(request.query.get("access_token", ""))
        if sub is None:
            return web.json_response(
                {"errcode": "M_UNKNOWN_TOKEN", "error": "Access Token unknown or expired"},
                status=401)
        return web.json_response({"sub": sub})


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port for the duration; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def homeserver() -> AsyncIterator[Homeserver]:
    hs = Homeserver(server_name="hs.test")
    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", hs.userinfo)
    app.router.add_post("/_matrix/federation/v1/3pid/onbind", hs.onbind)
    async with serving(app) as hs.url:
        yield hs
        hs.stopping.set()


class OpenMarket:
    """Loopback stand-in for OpenMarket's /sms/v4/mt: records what it is asked to send."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.status = 202

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.headers.get("Authorization", ""),
                              await request.json()))
        destination = self.requests[-1][1].get("mobileTerminate", {}).get("destination", {})
        log_audit.remember("phone number", str(destination.get("address", "")))
        return web.json_response({}, status=self.status,
                                 headers={"Location": "https://om.test/mt/ticket-1"})

    def last_code(self) -> str:
        content = self.requests[-1][1]["mobileTerminate"]["message"]["content"]
        match = re.search(r"\b([0-9]{6})\b", content)
        assert match, content
        return match.group(1)


@pytest.fixture
async def openmarket() -> AsyncIterator[OpenMarket]:
    stub = OpenMarket()
    app = web.Application()
    app.router.add_post("/sms/v4/mt", stub.handle)
    async with serving(app) as stub.url:
        yield stub


@dataclass
class RunningKith:
    config: KithConfig
    server: KithServer
    http: aiohttp.ClientSession
    homeserver: Homeserver

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.config.http.client_port}"

    @property
    def internal(self) -> str:
        return f"http://127.0.0.1:{self.config.http.internal_port}"

    async def register(self, localpart: str = "alice") -> str:
        """A kith access token for @localpart:hs.test, through the real OpenID flow."""
        openid = self.homeserver.issue(localpart)
        async with self.http.post(f"{self.base}/_matrix/identity/v2/account/register", json={
            "access_token": openid, "token_type": "Bearer",
            "matrix_server_name": self.homeserver.server_name, "expires_in": 3600,
        }) as resp:
            assert resp.status == 200, await resp.text()
            token = str((await resp.json())["token"])
            log_audit.remember("access token", token)
            return token

    async def lookup(self, token: str, algorithm: str, addresses: list[str]) -> dict[str, str]:
        """The mappings of POST /v2/lookup, with the server's pepper (answer must be 200)."""
        pepper = self.server.services.lookup.pepper  # type: ignore[union-attr]
        async with self.http.post(f"{self.base}/_matrix/identity/v2/lookup", json={
                "algorithm": algorithm, "pepper": pepper, "addresses": addresses},
                headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return dict(body["mappings"])

    async def bind(self, address: str, mxid: str, medium: str = "email") -> dict[str, Any]:
        log_audit.remember(f"{medium} address", address)
        async with self.http.post(f"{self.internal}/_matrix/identity/internal/bind", json={
            "medium": medium, "address": address, "mxid": mxid}) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())


KithFactory = Callable[..., Any]


@pytest.fixture
async def kith_factory(tmp_path: Path, homeserver: Homeserver) -> AsyncIterator[KithFactory]:
    """Start an in-process kith with extra config sections; stopped after the test."""
    started: list[RunningKith] = []

    async def start(sections: dict[str, dict[str, Any]] | None = None,
                    name: str = "kith") -> RunningKith:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        merged: dict[str, dict[str, Any]] = {
            "http": {"federation.test_overrides": f"{homeserver.server_name}={homeserver.url}"},
        }
        for section, values in (sections or {}).items():
            merged.setdefault(section, {}).update(values)
        config = load_config(str(write_config(directory, merged)), env={})
        server = KithServer(config)
        await server.start()
        running = RunningKith(config, server, aiohttp.ClientSession(), homeserver)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.http.close()
        await running.server.stop()


@pytest.fixture
async def kith(kith_factory: KithFactory) -> RunningKith:
    return await kith_factory()  # type: ignore[no-any-return]


@pytest.fixture
async def token(kith: RunningKith) -> str:
    return await kith.register("alice")


class KithProcess:
    """kith as a separate OS process (`python -m kith`), for kill -9 and CLI tests."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, timeout_s: float = 30.0, *,
              open_files_soft_limit: int | None = None) -> None:
        """Start kith and wait until it listens on `port`; `open_files_soft_limit` starts
        it with that soft RLIMIT_NOFILE (the hard limit stays), as a service manager
        would."""
        env = {**os.environ, "SYDENT_CONF": str(self.config_path)}
        log_audit.watch(self.config_path.parent / "kith.log")

        def limit_open_files() -> None:
            if open_files_soft_limit is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files_soft_limit, hard))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kith"], cwd=self.config_path.parent, env=env,
            stdout=subprocess.DEVNULL, stderr=open(self.config_path.parent / "kith.log", "ab"),
            preexec_fn=limit_open_files if open_files_soft_limit is not None else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kith exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("kith did not start listening")

    def signal(self, sig: int) -> None:
        """Send `sig` to the running process, without waiting for anything."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


KithProcessFactory = Callable[[Path], KithProcess]


@pytest.fixture
def kith_process() -> Iterator[KithProcessFactory]:
    processes: list[KithProcess] = []

    def make(config_path: Path) -> KithProcess:
        p = KithProcess(config_path)
        processes.append(p)
        return p

    yield make
    for p in processes:
        p.kill(9)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping every message it receives;
    `stop()` and `start()` take it down and bring it back on the same port.
    `smtputf8`: offer the SMTPUTF8 extension (addresses beyond ASCII), as aiosmtpd's
    Controller does by default."""

    def __init__(self, *, smtputf8: bool = True) -> None:
        self.port = free_port()
        self.smtputf8 = smtputf8
        self.messages: list[tuple[list[str], str]] = []  # (recipients, message text)
        self._controller: Any = None

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode()))
        log_audit.remember_mail(*self.messages[-1])
        return "250 OK"

    def start(self) -> None:
        from aiosmtpd.controller import Controller
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                      enable_SMTPUTF8=self.smtputf8)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


# The throwaway test CA (tests/federation/conftest.py), shared with the client API's TLS
# tests and the end-to-end tests.
from tests.federation.conftest import pki  # noqa: E402, F401
