"""[ldap] and [proxy]: typed, validated, frozen; read from KithConfig.extra_sections.

The keys of the 2017 Sydent LDAP fork (`uri`, `startls`, `base`, `email`, `msisdn`,
`id_attr`, `hs_name`, `bind_dn`, `bind_pw`, `filter`; `[proxy] identity`) keep their
meaning, so its operators can switch.  Every error is one line naming section and key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import phonenumbers

from kith.config import ConfigError, KithConfig, unreadable

MEDIUMS = ("email", "msisdn")  # as kith.services.threepid (not imported: no cycle)

# The sources of an answer, in the default order of precedence.
LDAP, LOCAL, UPSTREAM = "ldap", "local", "upstream"
DEFAULT_PRECEDENCE = (LDAP, LOCAL, UPSTREAM)

BIND_PW_ENV = "KITH_LDAP_BIND_PW"


@dataclass(frozen=True)
class LdapPreset:
    email: tuple[str, ...]
    msisdn: tuple[str, ...]
    id_attr: str
    changed_attr: str


PRESETS = {
    "openldap": LdapPreset(("mail",), ("telephoneNumber", "mobile"), "uid", "modifyTimestamp"),
    "active_directory": LdapPreset(("mail",), ("telephoneNumber", "mobile"), "sAMAccountName",
                                   "whenChanged"),
}


@dataclass(frozen=True)
class LdapConfig:
    uri: str
    base: str
    email: tuple[str, ...]
    msisdn: tuple[str, ...]
    id_attr: str
    hs_name: str = ""
    startls: bool = False
    bind_dn: str = ""
    bind_pw: str = ""
    filter: str = ""
    ca_file: str = ""
    verify_certs: bool = True
    connect_timeout_s: float = 5.0
    search_timeout_s: float = 10.0
    # A live lookup waits this long for the directory, then answers without it.
    lookup_timeout_s: float = 3.0
    # After a failure the directory is probed once per cool-down until it answers.
    breaker_cooldown_s: float = 10.0
    pool_size: int = 4
    cache_ttl_s: float = 60.0
    sync_interval_s: float = 60.0
    full_sync_interval_s: float = 3600.0
    changed_attr: str = "modifyTimestamp"
    preset: str = "openldap"
    # ISO 3166 alpha-2 region of national numbers ("07700 900123"); "": none are read.
    msisdn_default_region: str = ""

    @property
    def attributes(self) -> tuple[str, ...]:
        """Every attribute a search must return."""
        return (self.id_attr, *self.email, *self.msisdn)

    def attrs_for(self, medium: str) -> tuple[str, ...]:
        return self.email if medium == "email" else self.msisdn


@dataclass(frozen=True)
class ProxyConfig:
    identity: str
    access_token: str = ""
    timeout_s: float = 5.0
    cache_ttl_s: float = 300.0
    negative_cache_ttl_s: float = 60.0
    mediums: tuple[str, ...] = MEDIUMS
    # Empty: every email domain may be forwarded.
    email_domains: tuple[str, ...] = ()
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0


@dataclass(frozen=True)
class SourcesConfig:
    ldap: LdapConfig | None = None
    proxy: ProxyConfig | None = None
    precedence: tuple[str, ...] = DEFAULT_PRECEDENCE


class _Keys:
    def __init__(self, section: str, items: Mapping[str, str]) -> None:
        self.section = section
        self.items = {k.lower(): v.strip() for k, v in items.items()}

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"[{self.section}] {key}: {problem}")

    def text(self, key: str, default: str = "") -> str:
        return self.items.get(key, default)

    def csv(self, key: str) -> tuple[str, ...] | None:
        if key not in self.items:
            return None
        return tuple(x.strip() for x in self.items[key].split(",") if x.strip())

    def flag(self, key: str, default: bool) -> bool:
        value = self.items.get(key)
        if value is None or value == "":
            return default
        states = {"1": True, "yes": True, "true": True, "on": True,
                  "0": False, "no": False, "false": False, "off": False}
        if value.lower() not in states:
            raise self.error(key, f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
        return states[value.lower()]

    def seconds(self, key: str, default: float) -> float:
        value = self.items.get(key)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise self.error(key, f"{value!r} is not a positive number of seconds")
        return number

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.items.get(key)
        if value is None or value == "":
            return default
        if not value.isdecimal() or int(value) < minimum:
            raise self.error(key, f"{value!r} is not a whole number of at least {minimum}")
        return int(value)

    def readable_file(self, key: str) -> str:
        path = self.text(key)
        problem = unreadable(path)
        if problem:
            raise self.error(key, problem)
        return path


def sources_config(config: KithConfig, env: Mapping[str, str] | None = None) -> SourcesConfig:
    """Parse [ldap] and [proxy]; raises ConfigError (one line) on a bad or partial one."""
    env = os.environ if env is None else env
    sections = {name: dict(items) for name, items in config.extra_sections}
    ldap = ldap_config(_Keys("ldap", sections["ldap"]), env) if "ldap" in sections else None
    proxy = proxy_config(_Keys("proxy", sections["proxy"])) if "proxy" in sections else None
    precedence: tuple[str, ...] = DEFAULT_PRECEDENCE
    for name in ("ldap", "proxy"):
        keys = _Keys(name, sections.get(name, {}))
        order = keys.csv("precedence")
        if order is None:
            continue
        if sorted(order) != sorted(DEFAULT_PRECEDENCE):
            raise keys.error("precedence", "must name ldap, local and upstream, each once")
        if precedence != DEFAULT_PRECEDENCE and precedence != order:
            raise keys.error("precedence", "differs from the other section's precedence")
        precedence = order
    return SourcesConfig(ldap=ldap, proxy=proxy, precedence=precedence)


def ldap_config(keys: _Keys, env: Mapping[str, str]) -> LdapConfig | None:
    uri = keys.text("uri")
    if not uri:
        # LDAP is off unless `uri` is set; other keys without it are a half-done section.
        others = sorted(k for k, v in keys.items.items() if v and k != "precedence")
        if others:
            raise keys.error("uri", f"is required: {', '.join(others)} set without it")
        return None
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in ("ldap", "ldaps") or not urlsplit(uri).hostname:
        raise keys.error("uri", f"{uri!r} is not an ldap:// or ldaps:// URI")
    base = keys.text("base")
    if not base:
        raise keys.error("base", "is required when uri is set (the search base DN)")
    preset_name = keys.text("preset", "openldap").lower()
    if preset_name not in PRESETS:
        raise keys.error("preset", f"{preset_name!r} is not one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    email = keys.csv("email")
    msisdn = keys.csv("msisdn")
    email = preset.email if email is None else email
    msisdn = preset.msisdn if msisdn is None else msisdn
    if not email and not msisdn:
        raise keys.error("email", "no attribute maps to a medium (set email or msisdn)")
    startls = keys.flag("startls", False)
    if startls and scheme == "ldaps":
        raise keys.error("startls", "cannot be used with an ldaps:// uri (already TLS)")
    bind_dn = keys.text("bind_dn")
    bind_pw = _bind_password(keys, env)
    if bind_pw and not bind_dn:
        raise keys.error("bind_pw", "needs bind_dn")
    if bind_dn and not bind_pw:
        raise keys.error("bind_dn", f"needs bind_pw, bind_pw_file or ${BIND_PW_ENV}")
    filter_ = keys.text("filter")
    if filter_ and not (filter_.startswith("(") and filter_.endswith(")")):
        raise keys.error("filter", f"{filter_!r} is not an LDAP filter in parentheses")
    return LdapConfig(
        uri=uri, base=base, email=email, msisdn=msisdn,
        id_attr=keys.text("id_attr") or preset.id_attr,
        hs_name=keys.text("hs_name"),
        startls=startls, bind_dn=bind_dn, bind_pw=bind_pw, filter=filter_,
        ca_file=keys.readable_file("ca_file"),
        verify_certs=keys.flag("verify_certs", True),
        connect_timeout_s=keys.seconds("connect_timeout", 5.0),
        search_timeout_s=keys.seconds("search_timeout", 10.0),
        lookup_timeout_s=keys.seconds("lookup_timeout", 3.0),
        breaker_cooldown_s=keys.seconds("breaker_cooldown", 10.0),
        pool_size=keys.integer("pool_size", 4),
        cache_ttl_s=keys.seconds("cache_ttl", 60.0),
        sync_interval_s=keys.seconds("sync_interval", 60.0),
        full_sync_interval_s=keys.seconds("full_sync_interval", 3600.0),
        changed_attr=keys.text("changed_attr") or preset.changed_attr,
        preset=preset_name,
        msisdn_default_region=_region(keys, "msisdn_default_region"),
    )


def _region(keys: _Keys, key: str) -> str:
    region = keys.text(key).upper()
    if region and region not in phonenumbers.SUPPORTED_REGIONS:
        raise keys.error(key, f"{keys.text(key)!r} is not an ISO 3166 alpha-2 region code "
                              "with a telephone numbering plan (e.g. GB, US, DE)")
    return region


def _bind_password(keys: _Keys, env: Mapping[str, str]) -> str:
    if keys.text("bind_pw") and keys.text("bind_pw_file"):
        raise keys.error("bind_pw_file", "set bind_pw or bind_pw_file, not both")
    path = keys.readable_file("bind_pw_file")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return keys.text("bind_pw") or env.get(BIND_PW_ENV, "")


def proxy_config(keys: _Keys) -> ProxyConfig | None:
    identity = keys.text("identity").rstrip("/")
    if not identity:
        others = sorted(k for k, v in keys.items.items() if v and k != "precedence")
        if others:
            raise keys.error("identity", f"is required: {', '.join(others)} set without it")
        return None  # proxying is off unless `identity` is set
    parts = urlsplit(identity)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise keys.error("identity", f"{identity!r} is not an http(s):// base URL")
    mediums = keys.csv("mediums")
    if mediums is None:
        mediums = MEDIUMS
    for medium in mediums:
        if medium not in MEDIUMS:
            raise keys.error("mediums", f"{medium!r} is not one of {', '.join(MEDIUMS)}")
    domains = tuple(d.lower().lstrip("@") for d in keys.csv("email_domains") or ())
    return ProxyConfig(
        identity=identity,
        access_token=keys.text("access_token"),
        timeout_s=keys.seconds("timeout", 5.0),
        cache_ttl_s=keys.seconds("cache_ttl", 300.0),
        negative_cache_ttl_s=keys.seconds("negative_cache_ttl", 60.0),
        mediums=mediums,
        email_domains=domains,
        breaker_failures=keys.integer("breaker_failures", 5),
        breaker_cooldown_s=keys.seconds("breaker_cooldown", 30.0),
    )


def parse_ldap_section(items: Mapping[str, str],
                       env: Mapping[str, str] | None = None) -> LdapConfig | None:
    """[ldap] from its raw key/values (for tools and tests)."""
    return ldap_config(_Keys("ldap", items), os.environ if env is None else env)


def parse_proxy_section(items: Mapping[str, str]) -> ProxyConfig | None:
    return proxy_config(_Keys("proxy", items))
