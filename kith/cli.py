"""The `kith` command: serve (default), generate-config, check-config, import-sydent,
onbind, peers, migrate-db, bind, unbind, rotate-pepper, forget, status.

Every command that opens the store first makes sure the database is one kith may use,
and takes over a Sydent database the configuration names (`_prepared`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from kith.config import ConfigError, KithConfig, load_config
from kith.errors import MatrixError
from kith.threepid import MEDIUMS

if TYPE_CHECKING:
    from kith.services.status import ServerStatus

log = logging.getLogger("kith")


def _setup_logging(config: KithConfig) -> None:
    from kith import logs

    general = config.general
    logs.setup(general.log_path, general.log_level, general.log_format,
               config.crypto.signing_key)


def _raise_open_file_limit() -> None:
    """Raise the soft limit of open files to the hard limit, and log what kith got.

    Every connection holds a file descriptor, and the soft limit a service manager gives
    by default (1024) is used up by a thousand slow clients; the hard limit is far
    higher (systemd's default: 524288; contrib/systemd/kith.service sets its own).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        log.info("open file limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open file limit %d; cannot raise it to %d: %s", soft, hard, exc)
        return
    log.info("open file limit raised from %d to %d", soft, hard)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _prepared(config: KithConfig) -> KithConfig:
    """`config` to open the store with, once the database it names is one kith can use:
    a Sydent database is taken over first (before any worker starts)."""
    from kith.services.sydent_takeover import prepare_database

    return prepare_database(config, _run)


def cmd_serve(args: argparse.Namespace, config: KithConfig) -> int:
    workers = args.workers or config.general.workers
    if workers > 1 and config.general.prometheus_port is not None:
        from kith import metrics_multiprocess

        metrics_dir, ours = metrics_multiprocess.prepare()  # before the metrics exist
        try:
            return _serve(args, config, workers)
        finally:
            if ours:
                metrics_multiprocess.remove(metrics_dir)
    return _serve(args, config, workers)


def _serve(args: argparse.Namespace, config: KithConfig, workers: int) -> int:
    from kith.server import ListenError, run_workers, serve, write_pidfile

    _setup_logging(config)
    for key in config.ignored_keys:
        log.warning("config key %s is not used by kith; ignoring it", key)
    config = _prepared(config)
    write_pidfile(config.general.pidfile_path)
    _raise_open_file_limit()
    if workers > 1:
        return run_workers(config, workers, _run)
    try:
        _run(serve(config))
    except ListenError as exc:
        print(f"kith: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_generate_config(args: argparse.Namespace, config: KithConfig) -> int:
    print(f"configuration in {config.path}")
    return 0


def cmd_check_config(args: argparse.Namespace, config: KithConfig) -> int:
    from kith.services.terms import TermsSource

    TermsSource.from_config(config.general.terms_path)
    if config.http.replication_certfile:
        from kith.replication.listener import tls_contexts

        tls_contexts(config.http)
    print(f"{config.path}: OK")
    for key in config.ignored_keys:
        print(f"ignored: {key}")
    return 0


def cmd_healthcheck(args: argparse.Namespace, config: KithConfig) -> int:
    """Exit 0 if the client API of the kith using this config answers its status check."""
    import ssl
    import urllib.request

    host = config.http.client_bind_address
    if host in ("", "::", "0.0.0.0"):  # noqa: S104 - a bind address, not a target
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    tls = bool(config.http.client_https_certfile)
    url = (f"{'https' if tls else 'http'}://{host}:{config.http.client_port}"
           "/_matrix/identity/v2")
    # The certificate names the public host, not the loopback address probed here.
    context = ssl._create_unverified_context() if tls else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            ok = resp.status == 200
    except OSError as exc:
        print(f"kith: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {'OK' if ok else 'unhealthy'}")
    return 0 if ok else 1


def cmd_import_sydent(args: argparse.Namespace, config: KithConfig) -> int:
    """Take over a Sydent installation; the Sydent files are only read."""
    import configparser
    from pathlib import Path

    from kith.config import parse_signing_key
    from kith.config_template import with_signing_key, write_atomically
    from kith.services.sydent_import import IMPORTED_SYDENT_DB, import_sydent_db
    from kith.store import Store, sqlite_path
    from kith.threepid import now_ms

    sydent_conf = Path(args.sydent_config).resolve()
    parser = configparser.RawConfigParser()
    if not parser.read(sydent_conf, encoding="utf-8"):
        raise ConfigError(f"cannot read the Sydent configuration {sydent_conf}")
    sydent_name = parser.get("general", "server.name", fallback="")
    db_file = args.sydent_db or parser.get("db", "db.file", fallback="sydent.db")
    sydent_db = sydent_conf.parent / db_file
    key_text = parser.get("crypto", "ed25519.signingkey", fallback="").strip()
    peer_urls = {section.removeprefix("peer."): url
                 for section in parser.sections() if section.startswith("peer.")
                 if (url := parser.get(section, "base_replication_url", fallback="").strip())}
    config = _prepared(config)
    store_file = sqlite_path(config.db)
    same_file = (not args.sydent_db and store_file is not None and sydent_db.exists()
                 and Path(store_file).exists() and sydent_db.samefile(store_file))

    if key_text:
        key = parse_signing_key(key_text)
        ours = parse_signing_key(config.crypto.signing_key)
        if Path(config.path).resolve() == sydent_conf or ours.encode() == key.encode():
            print("signing key: already Sydent's")
        else:
            text = Path(config.path).read_text(encoding="utf-8")
            write_atomically(config.path, with_signing_key(text, key_text))
            print(f"signing key: Sydent's {key.alg}:{key.version} saved into {config.path}")
    else:
        print("signing key: Sydent's configuration has none; keeping kith's")
    if sydent_name and sydent_name != config.general.server_name:
        print(f"warning: Sydent signed as {sydent_name!r} and kith signs as "
              f"{config.general.server_name!r}: set [general] server.name = {sydent_name}")

    async def run() -> None:
        nonlocal sydent_db
        store = await Store.open(config.db)
        try:
            if same_file:  # a sydent.conf kith took over names kith's database now
                imported = await store.state.get(IMPORTED_SYDENT_DB)
                if imported is None:
                    raise ValueError("it is kith's own database, not Sydent's")
                sydent_db = Path(imported)
                print(f"{sydent_conf} names kith's database now: importing again from "
                      f"{sydent_db}, the Sydent database kith took over")
            report = await import_sydent_db(store, str(sydent_db),
                                            sydent_name or config.general.server_name,
                                            now_ms(), peer_urls)
        finally:
            await store.close()
        for line in report.lines():
            print(line)

    try:
        _run(run())
    except (OSError, ValueError) as exc:
        print(f"kith: cannot import {sydent_db}: {exc}", file=sys.stderr)
        return 1
    print("done; restart kith if it is running")
    return 0


def _offline(action: Callable[[Any], Coroutine[Any, Any, Any]],
             config: KithConfig) -> Any:
    """Run `action(services)` against the store without listening."""
    from kith.federation.client import FederationClient
    from kith.server import build_services
    from kith.store import Store

    config = _prepared(config)
    result: list[Any] = []

    async def main() -> None:
        store = await Store.open(config.db)
        federation = FederationClient.from_config(config.general, config.http)
        try:
            services = await build_services(config, store, federation, serving=False)
            result.append(await action(services))
        finally:
            await federation.close()
            await store.close()

    _run(main())
    return result[0]


def _with_store(action: Callable[[Any, KithConfig], Coroutine[Any, Any, Any]],
                config: KithConfig) -> Any:
    """Run `action(store, config)` against the store alone (nothing else is started)."""
    from kith.store import Store

    config = _prepared(config)
    result: list[Any] = []

    async def main() -> None:
        store = await Store.open(config.db)
        try:
            result.append(await action(store, config))
        finally:
            await store.close()

    _run(main())
    return result[0]


def cmd_onbind(args: argparse.Namespace, config: KithConfig) -> int:
    async def report(services: Any) -> list[Any]:
        if args.retry:
            due, revived = await services.onbind.retry_all()
            print(f"{due} pending deliveries are due now; {revived} that had given up "
                  "get one more attempt (by the running server, within seconds)")
        return list(await services.onbind.queue())

    for d in _offline(report, config):
        when = (f"next attempt {_iso(d.next_attempt_ts)}" if d.finished_ts is None
                else f"finished {_iso(d.finished_ts)}")
        error = f"  last error: {d.last_error}" if d.last_error else ""
        print(f"#{d.id} {d.state} to {d.destination} for {d.mxid}: "
              f"{d.attempts} attempts, queued {_iso(d.created_ts)}, {when}{error}")
    return 0


def _iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ms / 1000))


def cmd_peers(args: argparse.Namespace, config: KithConfig) -> int:
    """Each replication peer: where it is, what it acknowledged, how far behind it is."""
    from kith.replication.peers import ReplicationPeers
    from kith.replication.status import PeerStatus, peer_statuses
    from kith.threepid import now_ms

    async def statuses_of(store: Any, config: KithConfig) -> list[PeerStatus]:
        return await peer_statuses(store, await ReplicationPeers.load(config, store), now_ms())

    statuses: list[PeerStatus] = _with_store(statuses_of, config)
    if not statuses:
        print("no replication peers")
    for s in statuses:
        acked = "nothing yet" if s.acknowledged_id is None else f"id {s.acknowledged_id}"
        print(f"{s.name} {s.url}")
        print(f"  acknowledged: {acked}; behind: {s.behind} changes, "
              f"{s.lag_ms / 1000:.0f} s")
        print(f"  last success: {_iso(s.last_success_ts) if s.last_success_ts else 'never'}")
        if s.last_error_ts:
            print(f"  last error: {_iso(s.last_error_ts)} {s.last_error}")
        else:
            print("  last error: none")
    return 0


def cmd_migrate_db(args: argparse.Namespace, config: KithConfig) -> int:
    """Copy the SQLite store to PostgreSQL, verify it, and say how to switch."""
    from sqlalchemy.engine import make_url

    from kith.store import sqlite_path
    from kith.store.migrate_db import Verification, migrate, switch_lines

    source = sqlite_path(config.db)
    if source is None:
        print(f"kith: {config.path} already names a database that is not SQLite "
              "([db] db.url)", file=sys.stderr)
        return 1
    if not args.postgresql_url.startswith(("postgresql://", "postgres://")):
        print("kith: the target must be a postgresql:// URL", file=sys.stderr)
        return 2
    target = make_url(args.postgresql_url).render_as_string(hide_password=True)
    print(f"copying {source} (only read) into {target}")

    def progress(table: str, rows: int) -> None:
        print(f"  {table}: {rows} rows copied", flush=True)

    results: list[Verification] = []

    async def main() -> None:
        results.append(await migrate(source, args.postgresql_url,
                                     from_scratch=args.from_scratch, progress=progress))

    _run(main())
    result = results[0]
    for count in result.counts:
        mark = "" if count.source == count.target else "  <- differs"
        print(f"  {count.table}: {count.source} in SQLite, {count.target} in PostgreSQL{mark}")
    print(f"  associations checksum: {result.source_checksum[:16]} in SQLite, "
          f"{result.target_checksum[:16]} in PostgreSQL")
    if not result.ok:
        print("kith: the copy differs from the SQLite store: a kith still running on it "
              "wrote meanwhile. Stop it and run this command again (it copies only what "
              "changed)", file=sys.stderr)
        return 1
    print("verified: every table's count and the associations' checksum match")
    print("if a kith still runs on the SQLite file, stop it and run this command once "
          f"more; then serve from PostgreSQL with, in {config.path}:")
    for line in switch_lines(args.postgresql_url):
        print(f"  {line}")
    return 0


def cmd_bind(args: argparse.Namespace, config: KithConfig) -> int:
    signed = _offline(lambda s: s.bindings.bind(args.medium, args.address, args.mxid), config)
    print(json.dumps(signed, indent=2, sort_keys=True))
    return 0


def cmd_unbind(args: argparse.Namespace, config: KithConfig) -> int:
    removed = _offline(lambda s: s.bindings.unbind(args.medium, args.address, args.mxid),
                       config)
    print("unbound" if removed else "no such binding")
    return 0 if removed else 1


def cmd_rotate_pepper(args: argparse.Namespace, config: KithConfig) -> int:
    """A new lookup pepper, followed by every running worker and instance."""
    from kith.services.pepper import RotationBusy, rotate

    proxy = config.sources.proxy
    if proxy is not None and proxy.adopt_pepper:
        print("kith: the lookup pepper is the upstream identity server's ([proxy] "
              "adopt_pepper); it changes when the upstream's does", file=sys.stderr)
        return 2
    try:
        _with_store(lambda store, _config: rotate(
            store, say=lambda line: print(line, file=sys.stderr, flush=True)), config)
    except RotationBusy as exc:
        print(f"kith: {exc}; try again later", file=sys.stderr)
        return 1
    print("lookup pepper changed; running servers announce it within seconds")
    return 0


def cmd_forget(args: argparse.Namespace, config: KithConfig) -> int:
    """Erase a user (or one address): see kith.services.erasure."""
    from kith.services import Services
    from kith.store.erasure import ErasureReport

    if (args.mxid is None) == (args.address is None):
        print("kith forget: name either a Matrix ID or --address MEDIUM ADDRESS",
              file=sys.stderr)
        return 2

    async def forget(services: Services) -> ErasureReport:
        assert services.erasure is not None
        if args.mxid is not None:
            return await services.erasure.forget_user(args.mxid, dry_run=args.dry_run)
        medium, address = args.address
        return await services.erasure.forget_address(medium, address, dry_run=args.dry_run)

    report: ErasureReport = _offline(forget, config)
    who = args.mxid or " ".join(args.address)
    verb = "would remove" if args.dry_run else "removed"
    if report.empty:
        print(f"{who}: nothing is held; nothing {verb.split()[-1]}")
        return 0
    print(f"{who}: {verb}:")
    for f in report.associations:
        origin = f" (replicated from {f.origin_server}: forget it there too)" \
            if f.origin_server else ""
        directory = " (synced from the directory: remove it there too)" \
            if f.source != "local" else ""
        print(f"  binding {f.medium} {f.address} -> {f.mxid}{origin}{directory}")
    for count, what in ((report.sessions, "validation sessions"),
                        (report.invites_to, "pending invites to these addresses"),
                        (report.invites_from, "pending invites the user sent"),
                        (report.onbind_deliveries, "onbind deliveries"),
                        (int(report.account), "account"),
                        (report.tokens, "access tokens"),
                        (report.terms_acceptances, "terms acceptances")):
        if count:
            print(f"  {count} {what}")
    return 0


def cmd_status(args: argparse.Namespace, config: KithConfig) -> int:
    """What kith holds and how its queues, peers and directory sync are doing."""
    import msgspec

    from kith.services.status import server_status
    from kith.threepid import now_ms

    status: ServerStatus = _with_store(
        lambda store, config: server_status(config, store, now_ms()), config)
    if args.json:
        print(json.dumps(msgspec.to_builtins(status), indent=2, sort_keys=True))
        return 0
    for line in _status_lines(status):
        print(line)
    return 0


def _status_lines(s: ServerStatus) -> list[str]:
    bindings = ", ".join(f"{n} {source}" for source, n in s.bindings.items()) or "none"
    lines = [f"bindings:  {sum(s.bindings.values())} ({bindings})",
             f"sessions:  {s.sessions_waiting} waiting for their token, "
             f"{s.sessions_validated} validated",
             f"invites:   {s.invites_pending} waiting for their address to be bound"]
    oldest = s.onbind_oldest_pending_age_s
    lines.append(f"onbind:    {s.onbind.get('pending', 0)} pending"
                 + (f" (oldest {_age(oldest)})" if oldest is not None else "")
                 + f", {s.onbind.get('gave_up', 0)} gave up, {s.onbind.get('done', 0)} done")
    if not s.peers:
        lines.append("peers:     none")
    for p in s.peers:
        state = "error" if p.last_error_ts and (p.last_success_ts or 0) < p.last_error_ts \
            else "ok" if p.last_success_ts else "never reached"
        lines.append(f"peer {p.name}: {state}, {p.behind} changes behind"
                     + (f" ({_age(p.lag_ms / 1000)})" if p.behind else ""))
    sync = s.ldap_sync
    if not s.ldap_configured and sync is None:
        lines.append("ldap:      not configured")
    elif sync is None or sync.last_success_ts is None and sync.last_error_ts is None:
        lines.append("ldap:      not synced yet")
    else:
        last = f"last sync {_iso(sync.last_success_ts)}" if sync.last_success_ts \
            else "never synced"
        full = f", last full sync {_iso(sync.last_full_ts)} ({sync.entries} entries)" \
            if sync.last_full_ts else ""
        error = f"; last error {_iso(sync.last_error_ts)}: {sync.last_error}" \
            if sync.last_error_ts and (sync.last_success_ts or 0) < sync.last_error_ts else ""
        lines.append(f"ldap:      {last}{full}{error}")
    if s.pepper_change_unfinished:
        lines.append("pepper:    a change is under way, or was interrupted (a running kith "
                     "finishes it within a minute); meanwhile every process holds a lookup "
                     "index for each pepper")
    else:
        due = s.pepper_change_due_ts
        lines.append("pepper:    no change under way" + (
            f", the next periodic change due {_iso(due)}" if due is not None else ""))
    from kith.services.lookup_table import UNCOMPILED
    lines.append("lookups:   " + ("answered by the compiled probe" if s.compiled_probe
                                  else UNCOMPILED))
    return lines


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kith",
        description="kith, a Matrix identity server (Identity Service API v2; reads "
                    "Sydent's sydent.conf).",
    )
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $SYDENT_CONF or ./sydent.conf; "
                             "written with defaults if missing)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="serve with N worker processes sharing the ports "
                             "(overrides [general] workers)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the identity server (the default command)")
    sub.add_parser("generate-config",
                   help="write the configuration file with every default and a new "
                        "signing key if it does not exist, then exit")
    importer = sub.add_parser(
        "import-sydent",
        help="take over a Sydent installation (signing key, bindings, accounts, open "
             "sessions, pepper) from its sydent.conf and sydent.db, which are only read")
    importer.add_argument("sydent_config", metavar="SYDENT_CONF",
                          help="the Sydent installation's sydent.conf")
    importer.add_argument("--sydent-db", metavar="PATH",
                          help="its database (default: [db] db.file of SYDENT_CONF, "
                               "relative to that file's folder)")
    sub.add_parser("healthcheck",
                   help="exit 0 if the running server's client API answers (for "
                        "container health checks)")
    sub.add_parser("check-config",
                   help="read and validate the configuration, list keys kith ignores")
    onbind = sub.add_parser(
        "onbind",
        help="list the onbind notifications queued for homeservers (pending, done, "
             "gave_up) with their attempts and last error")
    onbind.add_argument("--retry", action="store_true",
                        help="first make the pending ones due now and give those that "
                             "gave up one more attempt")
    sub.add_parser("peers",
                   help="list the replication peers: the last id each acknowledged, how "
                        "far behind it is, its last success and last error")
    migrate_db = sub.add_parser(
        "migrate-db",
        help="copy the SQLite store (only read; kith may be running on it) into a "
             "PostgreSQL database, verify the copy, and print the [db] line to switch; "
             "run again after an interruption or to copy what changed meanwhile")
    migrate_db.add_argument("postgresql_url", metavar="POSTGRESQL_URL",
                            help="postgresql://user:password@host/database")
    migrate_db.add_argument("--from-scratch", action="store_true",
                            help="first empty kith's tables in the target, even if they "
                                 "hold another store")
    sub.add_parser("rotate-pepper",
                   help="change the lookup pepper and every lookup hash; running servers "
                        "follow without a wrong answer")
    status = sub.add_parser(
        "status",
        help="bindings per source, validation sessions, invites, the onbind queue, "
             "replication peers and the LDAP sync, read from the store")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    forget = sub.add_parser(
        "forget",
        help="erase a user: its bindings (tombstoned and pushed to replication peers), "
             "the validation sessions and pending invites of its addresses, its account, "
             "access tokens and terms acceptances, in one transaction; or the same for "
             "one address")
    forget.add_argument("mxid", nargs="?", metavar="MXID", help="the Matrix user ID")
    forget.add_argument("--address", nargs=2, metavar=("MEDIUM", "ADDRESS"),
                        help="forget one address instead (its binding, whoever it names)")
    forget.add_argument("--dry-run", action="store_true",
                        help="list what would be removed, and remove nothing")
    for name, verb in (("bind", "bind"), ("unbind", "remove the binding of")):
        p = sub.add_parser(name, help=f"{verb} a 3PID to a Matrix ID directly in the "
                                      "store, without validation (as the internal API)")
        p.add_argument("medium", choices=MEDIUMS)
        p.add_argument("address")
        p.add_argument("mxid")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, KithConfig], int]] = {
    "serve": cmd_serve,
    "generate-config": cmd_generate_config,
    "check-config": cmd_check_config,
    "healthcheck": cmd_healthcheck,
    "import-sydent": cmd_import_sydent,
    "onbind": cmd_onbind,
    "peers": cmd_peers,
    "migrate-db": cmd_migrate_db,
    "bind": cmd_bind,
    "unbind": cmd_unbind,
    "rotate-pepper": cmd_rotate_pepper,
    "forget": cmd_forget,
    "status": cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return COMMANDS[args.command or "serve"](args, config)
    except ConfigError as exc:
        print(f"kith: configuration error: {exc}", file=sys.stderr)
        return 2
    except MatrixError as exc:
        print(f"kith: {exc.errcode}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A database kith cannot use.  (kith.store is imported only by the commands that
        # open it: the others, healthcheck above all, start faster without it.)
        store = sys.modules.get("kith.store")
        if store is not None and isinstance(exc, store.StoreError):
            print(f"kith: {exc}", file=sys.stderr)
            return 1
        raise
