"""sydent.conf-compatible configuration → typed, validated, frozen objects.

kith reads the same file as Sydent, the same way (configparser, `%%` for a literal
`%`, Sydent's [DEFAULT] rule, env vars as defaults), so an existing sydent.conf works
unchanged.  A wrong value stops startup with a one-line `ConfigError` naming the key.
The documented keys and defaults live in `kith.config_template`.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from configparser import ConfigParser
from dataclasses import dataclass, field

from signedjson.key import (
    decode_signing_key_base64,
    encode_signing_key_base64,
    generate_signing_key,
)
from signedjson.types import SigningKey
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from unpaddedbase64 import encode_base64

from kith.config_template import (
    builtin_defaults,
    known_keys,
    render_default_config,
    with_signing_key,
    write_atomically,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def unreadable(path: str) -> str | None:
    """Why the file at `path` cannot be read, or None if it can (or no path is set)."""
    if not path:
        return None
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot read {path!r}: {e.strerror or e}"


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key and the problem."""


@dataclass(frozen=True)
class GeneralConfig:
    server_name: str
    # kith: other public names of this server (what homeservers call it).
    server_aliases: tuple[str, ...] = ()
    log_path: str = ""
    log_level: str = "INFO"
    pidfile_path: str = "sydent.pid"
    terms_path: str = ""
    address_lookup_limit: int = 10000
    templates_path: str = "res"
    brand_default: str = "matrix-org"
    enable_v1_access: bool = True
    enable_v1_associations: bool = True
    delete_tokens_on_bind: bool = True
    ip_blacklist: tuple[IPNetwork, ...] = ()
    ip_whitelist: tuple[IPNetwork, ...] = ()
    homeserver_allow_list: frozenset[str] = frozenset()
    prometheus_port: int | None = None
    prometheus_addr: str = ""
    # kith: accept `?access_token=` (deprecated by the spec, still sent by Synapse).
    allow_query_access_token: bool = True
    # kith: number of HTTP worker processes sharing the client port.
    workers: int = 1
    # kith: stop retrying an onbind callback this many seconds after the bind.
    onbind_give_up_after_s: float = 7 * 24 * 60 * 60


@dataclass(frozen=True)
class DbConfig:
    file: str = "sydent.db"
    # kith: a SQLAlchemy URL (postgresql://...) overrides `db.file`.
    url: str = ""


@dataclass(frozen=True)
class HttpConfig:
    client_bind_address: str = "::"
    client_port: int = 8090
    # kith: serve the client API over TLS with this PEM certificate (chain) and key.
    client_https_certfile: str = ""
    client_https_keyfile: str = ""
    internal_bind_address: str = "::1"
    internal_port: int | None = None
    obey_x_forwarded_for: bool = False
    federation_verifycerts: bool = True
    client_http_base: str = ""
    verify_response_template: str = ""
    # kith: largest request body accepted, in bytes (Sydent: 512 KiB).
    max_body_bytes: int = 512 * 1024
    # kith: timeout for one outbound request to a homeserver, in seconds.
    federation_timeout_s: float = 10.0
    # kith, for tests only: server name → base URL (e.g. http://127.0.0.1:1234),
    # bypassing discovery.  `federation.test_overrides = a:8448=http://127.0.0.1:1`.
    federation_test_overrides: tuple[tuple[str, str], ...] = ()
    # kith: extra CA bundle for homeserver TLS.
    federation_ca_file: str = ""
    # Replication listener (mutual TLS); no certfile → no listener and no pushes.
    replication_certfile: str = ""
    replication_cacert: str = ""
    replication_bind_address: str = "::"
    replication_port: int = 4434


@dataclass(frozen=True)
class EmailConfig:
    sender: str = "Sydent Validation <noreply@{hostname}>"
    subject: str = "Your Validation Token"
    invite_subject: str = "%(sender_display_name)s has invited you to chat"
    invite_subject_space: str = "%(sender_display_name)s has invited you to a space"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    hostname: str = ""
    tls_mode: str = "0"
    # kith: extra CA bundle (PEM) trusted, besides the system CAs, for the SMTP server.
    tls_cafile: str = ""
    default_web_client_location: str = "https://app.element.io"
    username_obfuscate_characters: int = 3
    domain_obfuscate_characters: int = 3
    homeserver_blocklist: tuple[str, ...] = ()
    room_blocklist: tuple[str, ...] = ()
    keyword_blocklist: tuple[str, ...] = ()
    ratelimit_sender_burst: int = 5
    ratelimit_sender_rate_hz: float = 1 / 300
    template: str = ""
    invite_template: str = ""


@dataclass(frozen=True)
class SmsConfig:
    provider: str = "openmarket"
    body_template: str = "Your code is {token}"
    username: str = ""
    password: str = ""
    # country code (e.g. "44") or "default" → ("long"|"short"|"alpha", value)
    originators: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # country code → "allow" | "reject"
    rules: tuple[tuple[str, str], ...] = ()
    msisdn_ratelimit_burst: int = 5
    msisdn_ratelimit_rate_hz: float = 1 / 3600
    country_ratelimit_burst: int = 50
    country_ratelimit_rate_hz: float = 1 / 60
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_from: str = ""
    twilio_messaging_service_sid: str = ""
    # kith: the provider's API base URL (empty: the provider's public API).
    base_url: str = ""


@dataclass(frozen=True)
class CryptoConfig:
    # "ed25519 0 <unpadded base64 seed>" as stored in the file.
    signing_key: str = ""


@dataclass(frozen=True)
class KithConfig:
    path: str
    general: GeneralConfig
    db: DbConfig = field(default_factory=DbConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    email: EmailConfig = field(default_factory=EmailConfig)
    sms: SmsConfig = field(default_factory=SmsConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    # Keys present in the file that kith does not understand, "section.key"
    # ("section.*" for a whole unknown section).
    ignored_keys: tuple[str, ...] = ()
    # [peer.<name>] sections as written: ((name, ((key, value), ...)), ...).
    peers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # Other sections kith does not model here ([ldap], [proxy], unknown ones), as
    # written (no interpolation, no [DEFAULT] keys): ((section, ((key, value), ...)), ...).
    extra_sections: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


# --------------------------------------------------------------------------- loading

log = logging.getLogger(__name__)

# Env vars giving defaults, as Sydent: baked into the file at first start.
_ENV_DEFAULTS = (
    ("SYDENT_SERVER_NAME", "general", "server.name"),
    ("SYDENT_PID_FILE", "general", "pidfile.path"),
    ("SYDENT_DB_PATH", "db", "db.file"),
)
_KEY = "ed25519.signingkey"
_SMS_PATTERNS = ("originators.", "smsrule.")
_LATER_SECTIONS = frozenset({"ldap", "proxy"})  # parsed by their own modules
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ORIGINATOR_TYPES = ("long", "short", "alpha")
_SMS_PROVIDERS = ("openmarket", "twilio")
_HEX_SEED = re.compile(r"[0-9a-fA-F]{64}")
_B64_SEED = re.compile(r"[A-Za-z0-9+/_-]{43}=?")
_KEY_VERSION = re.compile(r"\w+")
_Pairs = tuple[tuple[str, str], ...]


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> KithConfig:
    """Read the config file (`path`, else $SYDENT_CONF, else ./sydent.conf).

    A missing file is created with every default, documented.  A missing signing key
    is generated, and an old hex one converted, and saved back into the file.
    """
    env = os.environ if env is None else env
    path = path or env.get("SYDENT_CONF") or "sydent.conf"
    defaults = _builtin_defaults(env)
    if not os.path.exists(path):
        _save(path, _render(defaults))
        log.info("wrote a new config file with every default to %s", path)
    text = _read(path)
    parser = ConfigParser()
    parser.read_dict(defaults)  # named sections first: Sydent's [DEFAULT] rule
    _parse(path, text, parser)
    layout = _parse(path, text, ConfigParser(interpolation=None, strict=False,
                                             default_section="\0 none"))
    ignored, peers, extra = _layout(layout, defaults)
    crypto, save_key = _crypto(_Section(parser, "crypto"))
    config = KithConfig(
        path=path,
        general=_general(_Section(parser, "general")),
        db=_db(_Section(parser, "db")),
        http=_http(_Section(parser, "http")),
        email=_email(_Section(parser, "email")),
        sms=_sms(_Section(parser, "sms")),
        crypto=crypto,
        ignored_keys=ignored,
        peers=peers,
        extra_sections=extra,
    )
    if save_key:
        _save(path, with_signing_key(text, crypto.signing_key))
        log.warning("saved a new or converted signing key to [crypto] %s in %s", _KEY, path)
    return config


def default_config_text(env: Mapping[str, str] | None = None) -> str:
    """The documented file `load_config` writes at first start (with a new key)."""
    return _render(_builtin_defaults(os.environ if env is None else env))


def parse_signing_key(value: str) -> SigningKey:
    """`ed25519 <version> <unpadded base64 seed>`, or an old bare hex seed (version 0)."""
    value = value.strip()
    if _HEX_SEED.fullmatch(value):
        alg, version, seed = "ed25519", "0", encode_base64(bytes.fromhex(value))
    else:
        parts = value.split()
        if len(parts) != 3:
            raise _key_error("expected 'ed25519 <version> <base64 seed>'")
        alg, version, seed = parts
        if alg != "ed25519":
            raise _key_error(f"{alg!r} is not a supported algorithm (only ed25519)")
        if not _KEY_VERSION.fullmatch(version):
            raise _key_error(f"{version!r} is not a key version")
        if not _B64_SEED.fullmatch(seed):
            raise _key_error("the seed is not 32 bytes of unpadded base64")
    try:
        return decode_signing_key_base64(alg, version, seed)
    except (ValueError, TypeError):
        raise _key_error("the seed is not a valid ed25519 seed") from None


def _key_error(problem: str) -> ConfigError:
    return ConfigError(f"[crypto] {_KEY}: {problem}")


def _signing_key_text(key: SigningKey) -> str:
    return f"{key.alg} {key.version} {encode_signing_key_base64(key)}"


def _builtin_defaults(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    defaults = builtin_defaults()
    for var, section, key in _ENV_DEFAULTS:
        if var in env:
            if "\n" in env[var] or "\r" in env[var]:
                raise ConfigError(f"${var}: must be a single line")
            defaults[section][key] = env[var].replace("%", "%%")
    return defaults


def _render(defaults: dict[str, dict[str, str]]) -> str:
    new_key = _signing_key_text(generate_signing_key("0"))
    return render_default_config({**defaults, "crypto": {_KEY: new_key}})


def _save(path: str, text: str) -> None:
    try:
        write_atomically(path, text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror or e}") from None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _parse(path: str, text: str, parser: ConfigParser) -> ConfigParser:
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(f"{path}:{e.lineno}: a key before the first [section]") from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"{path}:{e.lineno}: section [{e.section}] appears twice") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"[{e.section}] {e.option}: set twice (line {e.lineno})") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise ConfigError(f"{path}:{lineno}: not a 'key = value' line: {line[:60]}") from None
    return parser


def _layout(layout: ConfigParser, defaults: dict[str, dict[str, str]]) -> tuple[
    tuple[str, ...], tuple[tuple[str, _Pairs], ...], tuple[tuple[str, _Pairs], ...]
]:
    """Sort the sections as written: (ignored keys, peers, extra sections)."""
    known = known_keys()

    def is_known(section: str, key: str) -> bool:
        return key in known[section] or (section == "sms" and key.startswith(_SMS_PATTERNS))

    def default_applies(key: str) -> bool:  # see load_config: only where no built-in default
        return any(is_known(s, key) and key not in defaults[s] and not layout.has_option(s, key)
                   for s in known)

    ignored: list[str] = []
    peers: list[tuple[str, _Pairs]] = []
    extra: list[tuple[str, _Pairs]] = []
    for section in layout.sections():
        items = tuple(layout.items(section))
        if section == configparser.DEFAULTSECT:
            ignored += [f"{section}.{key}" for key, _ in items if not default_applies(key)]
        elif section in known:
            ignored += [f"{section}.{key}" for key, _ in items if not is_known(section, key)]
        elif section.startswith("peer."):
            peers.append((section.removeprefix("peer."), items))
        else:
            extra.append((section, items))
            if section not in _LATER_SECTIONS:
                ignored.append(f"{section}.*")
    return tuple(ignored), tuple(peers), tuple(extra)


class _Section:
    """Typed reads of one section; every error names the section and key."""

    def __init__(self, parser: ConfigParser, name: str) -> None:
        self.parser = parser
        self.name = name

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"[{self.name}] {key}: {problem}")

    def get(self, key: str, *, raw: bool = False) -> str | None:
        if not self.parser.has_option(self.name, key):
            return None
        try:
            return self.parser.get(self.name, key, raw=raw)
        except configparser.InterpolationMissingOptionError as e:
            problem = f"%({e.reference})s refers to no key (write a literal % as %%)"
            raise self.error(key, problem) from None
        except configparser.InterpolationError:
            raise self.error(key, "write a literal % as %%") from None

    def text(self, key: str, default: str = "", *, raw: bool = False) -> str:
        value = self.get(key, raw=raw)
        return default if value is None else value

    def csv(self, key: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.text(key).split(",") if item.strip())

    def lines(self, key: str) -> tuple[str, ...]:
        return tuple(line.strip() for line in self.text(key).splitlines() if line.strip())

    def integer(self, key: str, minimum: int, default: int | None = None) -> int:
        value = self.get(key)
        if value is None and default is not None:
            return default
        try:
            number = int(value or "")
        except ValueError:
            raise self.error(key, f"{value!r} is not a whole number") from None
        if number < minimum:
            raise self.error(key, f"{value!r} is less than {minimum}")
        return number

    def number(self, key: str, default: float | None = None) -> float:
        """A positive number of seconds or hertz."""
        value = self.get(key)
        if value is None and default is not None:
            return default
        try:
            number = float(value or "")
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise self.error(key, f"{value!r} is not a positive number")
        return number

    def port(self, key: str) -> int:
        value = self.text(key)
        if not (value.isdecimal() and 1 <= int(value) <= 65535):
            raise self.error(key, f"{value!r} is not a port number (1-65535)")
        return int(value)

    def optional_port(self, key: str) -> int | None:
        """Not set or empty: None (that listener is off)."""
        return self.port(key) if self.get(key) else None

    def flag(self, key: str, default: bool) -> bool:
        """Sydent's booleans: [general] is true only for `true`; elsewhere yes/no too."""
        value = self.get(key)
        if value is None:
            return default
        if self.name == "general":
            return value.lower() == "true"
        if value.lower() not in ConfigParser.BOOLEAN_STATES:
            raise self.error(key, f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
        return ConfigParser.BOOLEAN_STATES[value.lower()]

    def readable_file(self, key: str) -> str:
        path = self.text(key)
        problem = unreadable(path)
        if problem:
            raise self.error(key, problem)
        return path

    def networks(self, key: str) -> tuple[IPNetwork, ...]:
        try:
            return tuple(ipaddress.ip_network(item, strict=False) for item in self.csv(key))
        except ValueError as e:
            raise self.error(key, f"{e} (expected IP addresses or CIDR ranges)") from None


def _general(s: _Section) -> GeneralConfig:
    level = s.text("log.level")
    if level.upper() not in _LOG_LEVELS:
        raise s.error("log.level", f"{level!r} is not one of {', '.join(_LOG_LEVELS)}")
    server_name = s.text("server.name")
    if not server_name:
        server_name = socket.gethostname()
        log.warning("[general] server.name is not set; signing as %r, the hostname", server_name)
    v1 = s.flag("enable_v1_access", True)
    allow_list = frozenset(s.csv("homeserver_allow_list"))
    if allow_list and v1:
        raise s.error("homeserver_allow_list", "needs enable_v1_access = false")
    return GeneralConfig(
        server_name=server_name,
        server_aliases=tuple(s.csv("server.aliases")),
        log_path=s.text("log.path"),
        log_level=level.upper(),
        pidfile_path=s.text("pidfile.path"),
        terms_path=s.readable_file("terms.path"),
        address_lookup_limit=s.integer("address_lookup_limit", 1),
        templates_path=s.text("templates.path"),
        brand_default=s.text("brand.default"),
        enable_v1_access=v1,
        enable_v1_associations=v1 and s.flag("enable_v1_associations", True),
        delete_tokens_on_bind=s.flag("delete_tokens_on_bind", True),
        ip_blacklist=s.networks("ip.blacklist"),
        ip_whitelist=s.networks("ip.whitelist"),
        homeserver_allow_list=allow_list,
        prometheus_port=s.optional_port("prometheus_port"),
        prometheus_addr=s.text("prometheus_addr", GeneralConfig.prometheus_addr),
        allow_query_access_token=s.flag("access_token.query_param", True),
        workers=s.integer("workers", 1),
        onbind_give_up_after_s=s.number("onbind.give_up_after",
                                        GeneralConfig.onbind_give_up_after_s),
    )


def _db(s: _Section) -> DbConfig:
    url = s.text("db.url")
    if url:
        try:
            make_url(url)
        except ArgumentError:
            raise s.error("db.url", "is not a database URL (postgresql://user:pw@host/db)") \
                from None
    return DbConfig(file=s.text("db.file"), url=url)


def _http(s: _Section) -> HttpConfig:
    return HttpConfig(
        client_bind_address=s.text("clientapi.http.bind_address"),
        client_port=s.port("clientapi.http.port"),
        client_https_certfile=s.readable_file("clientapi.https.certfile"),
        client_https_keyfile=_client_https_keyfile(s),
        internal_bind_address=s.text("internalapi.http.bind_address"),
        internal_port=s.optional_port("internalapi.http.port"),
        obey_x_forwarded_for=s.flag("obey_x_forwarded_for", False),
        federation_verifycerts=s.flag("federation.verifycerts", True),
        client_http_base=s.text("client_http_base"),
        verify_response_template=s.text("verify_response_template"),
        max_body_bytes=s.integer("client.max_body_bytes", 1),
        federation_timeout_s=s.number("federation.timeout"),
        federation_test_overrides=_test_overrides(s, "federation.test_overrides"),
        federation_ca_file=s.readable_file("federation.cafile"),
        replication_certfile=s.readable_file("replication.https.certfile"),
        replication_cacert=s.readable_file("replication.https.cacert"),
        replication_bind_address=s.text("replication.https.bind_address"),
        replication_port=s.port("replication.https.port"),
    )


def _client_https_keyfile(s: _Section) -> str:
    keyfile = s.readable_file("clientapi.https.keyfile")
    if keyfile and not s.text("clientapi.https.certfile"):
        raise s.error("clientapi.https.keyfile", "needs clientapi.https.certfile")
    return keyfile


def _test_overrides(s: _Section, key: str) -> _Pairs:
    pairs = []
    for item in s.csv(key):
        name, _, url = (part.strip() for part in item.rpartition("="))
        if not name or not url.startswith(("http://", "https://")):
            raise s.error(key, f"{item!r} is not servername=http(s)://host:port")
        pairs.append((name, url.rstrip("/")))
    return tuple(pairs)


def _email(s: _Section) -> EmailConfig:
    return EmailConfig(
        sender=s.text("email.from"),
        subject=s.text("email.subject"),
        invite_subject=s.text("email.invite.subject", raw=True),
        invite_subject_space=s.text("email.invite.subject_space", raw=True),
        smtp_host=s.text("email.smtphost"),
        smtp_port=s.port("email.smtpport"),
        smtp_username=s.text("email.smtpusername"),
        smtp_password=s.text("email.smtppassword"),
        hostname=s.text("email.hostname") or socket.getfqdn(),
        tls_mode=s.text("email.tlsmode"),
        tls_cafile=s.readable_file("email.tls_cafile"),
        default_web_client_location=s.text("email.default_web_client_location"),
        username_obfuscate_characters=s.integer(
            "email.third_party_invite_username_obfuscate_characters", 0),
        domain_obfuscate_characters=s.integer(
            "email.third_party_invite_domain_obfuscate_characters", 0),
        homeserver_blocklist=s.lines("email.third_party_invite_homeserver_blocklist"),
        room_blocklist=s.lines("email.third_party_invite_room_blocklist"),
        keyword_blocklist=s.lines("email.third_party_invite_keyword_blocklist"),
        ratelimit_sender_burst=s.integer(
            "email.ratelimit_sender.burst", 1, EmailConfig.ratelimit_sender_burst),
        ratelimit_sender_rate_hz=s.number(
            "email.ratelimit_sender.rate_hz", EmailConfig.ratelimit_sender_rate_hz),
        template=s.text("email.template"),
        invite_template=s.text("email.invite_template"),
    )


def _sms(s: _Section) -> SmsConfig:
    provider = s.text("provider")
    if provider not in _SMS_PROVIDERS:
        raise s.error("provider", f"{provider!r} is not one of {', '.join(_SMS_PROVIDERS)}")
    originators: list[tuple[str, _Pairs]] = []
    rules: list[tuple[str, str]] = []
    for key in s.parser.options("sms"):  # with [DEFAULT]'s
        if key.startswith("originators."):
            originators.append((key.removeprefix("originators."), _originators(s, key)))
        elif key.startswith("smsrule."):
            rule = s.text(key)
            if rule not in ("allow", "reject"):
                raise s.error(key, f"{rule!r} is not allow or reject")
            rules.append((key.removeprefix("smsrule."), rule))
    return SmsConfig(
        provider=provider,
        body_template=s.text("bodytemplate"),
        username=s.text("username"),
        password=s.text("password"),
        originators=tuple(originators),
        rules=tuple(rules),
        msisdn_ratelimit_burst=s.integer(
            "msisdn.ratelimit.burst", 1, SmsConfig.msisdn_ratelimit_burst),
        msisdn_ratelimit_rate_hz=s.number(
            "msisdn.ratelimit.rate_hz", SmsConfig.msisdn_ratelimit_rate_hz),
        country_ratelimit_burst=s.integer(
            "country.ratelimit.burst", 1, SmsConfig.country_ratelimit_burst),
        country_ratelimit_rate_hz=s.number(
            "country.ratelimit.rate_hz", SmsConfig.country_ratelimit_rate_hz),
        twilio_account_sid=s.text("twilio.account_sid"),
        twilio_auth_token=s.text("twilio.auth_token"),
        twilio_from=s.text("twilio.from"),
        twilio_messaging_service_sid=s.text("twilio.messaging_service_sid"),
        base_url=s.text("base_url"),
    )


def _originators(s: _Section, key: str) -> _Pairs:
    originators = []
    for item in s.csv(key):
        kind, _, value = (part.strip() for part in item.partition(":"))
        if kind not in _ORIGINATOR_TYPES or not value:
            raise s.error(key, f"{item!r} is not long:<number>, short:<code> or alpha:<name>")
        originators.append((kind, value))
    if not originators:
        raise s.error(key, "no originator given")
    return tuple(originators)


def _crypto(s: _Section) -> tuple[CryptoConfig, bool]:
    """The signing key, and whether it must be saved (generated or converted)."""
    value = s.text(_KEY).strip()
    if not value:
        log.warning("[crypto] %s is not set: generating a new signing key", _KEY)
        return CryptoConfig(_signing_key_text(generate_signing_key("0"))), True
    key = parse_signing_key(value)
    if _HEX_SEED.fullmatch(value):
        log.warning("[crypto] %s: converting the old hex key to the current format", _KEY)
    return CryptoConfig(_signing_key_text(key)), bool(_HEX_SEED.fullmatch(value))
