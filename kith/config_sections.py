"""Typed, validated reads of each sydent.conf section (`kith.config.load_config` puts
them together).  Every error names the section and the key."""

from __future__ import annotations

import configparser
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Iterable
from configparser import ConfigParser
from urllib.parse import urlsplit

from signedjson.key import (
    decode_signing_key_base64,
    encode_signing_key_base64,
    generate_signing_key,
)
from signedjson.types import SigningKey
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from unpaddedbase64 import encode_base64

from kith.config_model import (
    ConfigError,
    CryptoConfig,
    DbConfig,
    EmailConfig,
    GeneralConfig,
    HttpConfig,
    IPNetwork,
    SmsConfig,
    unreadable,
)

log = logging.getLogger(__name__)

SIGNING_KEY = "ed25519.signingkey"
Pairs = tuple[tuple[str, str], ...]
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ORIGINATOR_TYPES = ("long", "short", "alpha")
_SMS_PROVIDERS = ("openmarket", "twilio")
_HEX_SEED = re.compile(r"[0-9a-fA-F]{64}")
_B64_SEED = re.compile(r"[A-Za-z0-9+/_-]{43}=?")
_KEY_VERSION = re.compile(r"\w+")


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
    return ConfigError(f"[crypto] {SIGNING_KEY}: {problem}")


def signing_key_text(key: SigningKey) -> str:
    return f"{key.alg} {key.version} {encode_signing_key_base64(key)}"


class Section:
    """Typed reads of one section; every error names the section and key.

    `blank_is_default`: an empty `key =` means the key's default for the typed reads
    (flag, integer, number, seconds), as in kith's own sections; Sydent's sections
    refuse it, as Sydent does.
    """

    def __init__(self, parser: ConfigParser, name: str, *,
                 blank_is_default: bool = False) -> None:
        self.parser = parser
        self.name = name
        self.blank_is_default = blank_is_default

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

    def given(self) -> list[str]:
        """The keys set to a non-empty value, sorted."""
        if not self.parser.has_section(self.name):
            return []
        return sorted(key for key in self.parser.options(self.name) if self.get(key, raw=True))

    def text(self, key: str, default: str = "", *, raw: bool = False) -> str:
        value = self.get(key, raw=raw)
        return default if value is None else value

    def csv(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A comma-separated list; `default` only when the key is not set at all."""
        value = self.get(key)
        if value is None:
            return default
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def lines(self, key: str) -> tuple[str, ...]:
        return tuple(line.strip() for line in self.text(key).splitlines() if line.strip())

    def one_of(self, key: str, value: str, choices: Iterable[str]) -> str:
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def choice(self, key: str, choices: Iterable[str], default: str = "") -> str:
        return self.one_of(key, self.text(key, default), choices)

    def _typed(self, key: str) -> str | None:
        value = self.get(key)
        return None if value == "" and self.blank_is_default else value

    def integer(self, key: str, minimum: int, default: int | None = None) -> int:
        value = self._typed(key)
        if value is None and default is not None:
            return default
        try:
            number = int(value or "")
        except ValueError:
            raise self.error(key, f"{value!r} is not a whole number") from None
        if number < minimum:
            raise self.error(key, f"{value!r} is less than {minimum}")
        return number

    def number(self, key: str, default: float | None = None, *, unit: str = "") -> float:
        """A positive number (of `unit`s: seconds, ...)."""
        value = self._typed(key)
        if value is None and default is not None:
            return default
        try:
            number = float(value or "")
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            of_unit = f" of {unit}" if unit else ""
            raise self.error(key, f"{value!r} is not a positive number{of_unit}")
        return number

    def seconds(self, key: str, default: float | None = None) -> float:
        return self.number(key, default, unit="seconds")

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
        value = self._typed(key)
        if value is None:
            return default
        if self.name == "general":
            return value.lower() == "true"
        if value.lower() not in ConfigParser.BOOLEAN_STATES:
            raise self.error(key, f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
        return ConfigParser.BOOLEAN_STATES[value.lower()]

    def url(self, key: str, schemes: Iterable[str], what: str) -> str:
        """A URL with one of `schemes` and a host, or "" when not set; else `what` it
        is not (e.g. "an ldap:// or ldaps:// URI")."""
        value = self.text(key)
        try:
            parts = urlsplit(value)
            good = parts.scheme.lower() in schemes and bool(parts.hostname)
        except ValueError:  # e.g. an unclosed [IPv6 address
            good = False
        if value and not good:
            raise self.error(key, f"{value!r} is not {what}")
        return value

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


def general(s: Section) -> GeneralConfig:
    level = s.one_of("log.level", s.text("log.level").upper(), _LOG_LEVELS)
    server_name = s.text("server.name")
    if not server_name:
        server_name = socket.gethostname()
        log.warning("[general] server.name is not set; signing as %r, the hostname", server_name)
    v1 = s.flag("enable_v1_access", True)
    lookup_limit = s.integer("address_lookup_limit", 1)
    allow_list = frozenset(s.csv("homeserver_allow_list"))
    if allow_list and v1:
        raise s.error("homeserver_allow_list", "needs enable_v1_access = false")
    return GeneralConfig(
        server_name=server_name,
        server_aliases=tuple(s.csv("server.aliases")),
        log_path=s.text("log.path"),
        log_level=level,
        log_format=s.choice("log.format", ("text", "json"), "text"),
        pidfile_path=s.text("pidfile.path"),
        terms_path=s.readable_file("terms.path"),
        address_lookup_limit=lookup_limit,
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
        onbind_give_up_after_s=s.seconds("onbind.give_up_after",
                                         GeneralConfig.onbind_give_up_after_s),
        lookup_budget_account=_lookup_budget(s, "lookup.budget.account", lookup_limit,
                                             GeneralConfig.lookup_budget_account),
        lookup_budget_ip=_lookup_budget(s, "lookup.budget.ip", lookup_limit,
                                        GeneralConfig.lookup_budget_ip),
        client_ip_ratelimit_burst=s.integer(
            "client_ip.ratelimit.burst", 1, GeneralConfig.client_ip_ratelimit_burst),
        client_ip_ratelimit_rate_hz=s.number(
            "client_ip.ratelimit.rate_hz", GeneralConfig.client_ip_ratelimit_rate_hz),
        invite_lifetime_s=s.seconds("invite.lifetime", GeneralConfig.invite_lifetime_s),
        lookup_pepper_rotation_s=s.seconds("lookup_pepper.rotation")
        if s.get("lookup_pepper.rotation") else None,
    )


def _lookup_budget(s: Section, key: str, lookup_limit: int, default: int) -> int:
    """Addresses per minute: at least one lookup's worth (address_lookup_limit), or a
    lookup of the largest size allowed could never be answered."""
    if s.get(key) in (None, ""):
        return max(default, lookup_limit)
    budget = s.integer(key, 1)
    if budget < lookup_limit:
        raise s.error(key, f"{budget} is less than address_lookup_limit ({lookup_limit}): "
                      "a lookup of that many addresses could never be answered")
    return budget


def db(s: Section) -> DbConfig:
    url = s.text("db.url")
    if url:
        try:
            make_url(url)
        except ArgumentError:
            raise s.error("db.url", "is not a database URL (postgresql://user:pw@host/db)") \
                from None
    return DbConfig(file=s.text("db.file"), url=url)


def http(s: Section) -> HttpConfig:
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
        header_timeout_s=s.seconds("client.header_timeout"),
        body_timeout_s=s.seconds("client.body_timeout"),
        keepalive_timeout_s=s.seconds("client.keepalive_timeout"),
        federation_timeout_s=s.seconds("federation.timeout"),
        federation_test_overrides=_test_overrides(s, "federation.test_overrides"),
        federation_ca_file=s.readable_file("federation.cafile"),
        replication_certfile=s.readable_file("replication.https.certfile"),
        replication_cacert=s.readable_file("replication.https.cacert"),
        replication_bind_address=s.text("replication.https.bind_address"),
        replication_port=s.port("replication.https.port"),
        replication_max_retry_interval_s=s.seconds(
            "replication.max_retry_interval", HttpConfig.replication_max_retry_interval_s),
    )


def _client_https_keyfile(s: Section) -> str:
    keyfile = s.readable_file("clientapi.https.keyfile")
    if keyfile and not s.text("clientapi.https.certfile"):
        raise s.error("clientapi.https.keyfile", "needs clientapi.https.certfile")
    return keyfile


def _test_overrides(s: Section, key: str) -> Pairs:
    pairs = []
    for item in s.csv(key):
        name, _, url = (part.strip() for part in item.rpartition("="))
        if not name or not url.startswith(("http://", "https://")):
            raise s.error(key, f"{item!r} is not servername=http(s)://host:port")
        pairs.append((name, url.rstrip("/")))
    return tuple(pairs)


def email(s: Section) -> EmailConfig:
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
        ratelimit_recipient_burst=s.integer(
            "email.ratelimit_recipient.burst", 1, EmailConfig.ratelimit_recipient_burst),
        ratelimit_recipient_rate_hz=s.number(
            "email.ratelimit_recipient.rate_hz", EmailConfig.ratelimit_recipient_rate_hz),
        template=s.text("email.template"),
        invite_template=s.text("email.invite_template"),
    )


def sms(s: Section) -> SmsConfig:
    provider = s.choice("provider", _SMS_PROVIDERS)
    originators: list[tuple[str, Pairs]] = []
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


def _originators(s: Section, key: str) -> Pairs:
    originators = []
    for item in s.csv(key):
        kind, _, value = (part.strip() for part in item.partition(":"))
        if kind not in _ORIGINATOR_TYPES or not value:
            raise s.error(key, f"{item!r} is not long:<number>, short:<code> or alpha:<name>")
        originators.append((kind, value))
    if not originators:
        raise s.error(key, "no originator given")
    return tuple(originators)


def crypto(s: Section) -> tuple[CryptoConfig, bool]:
    """The signing key, and whether it must be saved (generated or converted)."""
    value = s.text(SIGNING_KEY).strip()
    if not value:
        log.warning("[crypto] %s is not set: generating a new signing key", SIGNING_KEY)
        return CryptoConfig(signing_key_text(generate_signing_key("0"))), True
    key = parse_signing_key(value)
    if _HEX_SEED.fullmatch(value):
        log.warning("[crypto] %s: converting the old hex key to the current format", SIGNING_KEY)
    return CryptoConfig(signing_key_text(key)), bool(_HEX_SEED.fullmatch(value))
