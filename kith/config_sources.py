"""[ldap] and [proxy]: the identity sources besides kith's own bindings.

The keys of the 2017 Sydent LDAP fork (`uri`, `startls`, `base`, `email`, `msisdn`,
`id_attr`, `hs_name`, `bind_dn`, `bind_pw`, `filter`; `[proxy] identity`) keep their
meaning, so its operators can switch.  Both sections are kith's own, read as written: no
%-interpolation (a password or filter may hold a `%`), no [DEFAULT] keys, and a blank
value means the default.  Each is off until its first key (`uri`, `identity`) is set;
other keys without it are a half-done section, refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from configparser import ConfigParser
from dataclasses import dataclass

from kith.config_model import (
    DEFAULT_PRECEDENCE,
    LdapConfig,
    ProxyConfig,
    SourcesConfig,
)
from kith.config_sections import Section
from kith.threepid import MEDIUMS

AS_WRITTEN = frozenset({"ldap", "proxy"})
BIND_PW_ENV = "KITH_LDAP_BIND_PW"
_PRECEDENCE = "precedence"  # may be written in either section, without turning it on


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


def as_written_parser() -> ConfigParser:
    """A parser that keeps values as written: no interpolation, no [DEFAULT] section."""
    return ConfigParser(interpolation=None, strict=False, default_section="\0 none")


def section(parser: ConfigParser, name: str) -> Section:
    """[name] of an `as_written_parser`, read by kith's rules for its own sections."""
    return Section(parser, name, blank_is_default=True)


def sources(parser: ConfigParser, env: Mapping[str, str]) -> SourcesConfig:
    """[ldap] and [proxy] of an `as_written_parser`; `env` may hold the bind password."""
    ldap_section, proxy_section = section(parser, "ldap"), section(parser, "proxy")
    return SourcesConfig(ldap=ldap(ldap_section, env), proxy=proxy(proxy_section),
                         precedence=_precedence(ldap_section, proxy_section))


def _precedence(*sections: Section) -> tuple[str, ...]:
    precedence: tuple[str, ...] | None = None
    for s in sections:
        if s.get(_PRECEDENCE) is None:
            continue
        order = s.csv(_PRECEDENCE)
        if sorted(order) != sorted(DEFAULT_PRECEDENCE):
            raise s.error(_PRECEDENCE, "must name ldap, local and upstream, each once")
        if precedence not in (None, order):
            raise s.error(_PRECEDENCE, "differs from the other section's precedence")
        precedence = order
    return precedence or DEFAULT_PRECEDENCE


def _off_unless(s: Section, key: str) -> bool:
    """Whether the section is off: `key` is not set (and no other key is)."""
    if s.text(key):
        return False
    others = [other for other in s.given() if other != _PRECEDENCE]
    if others:
        raise s.error(key, f"is required: {', '.join(others)} set without it")
    return True


def ldap(s: Section, env: Mapping[str, str]) -> LdapConfig | None:
    if _off_unless(s, "uri"):
        return None
    uri = s.url("uri", ("ldap", "ldaps"), "an ldap:// or ldaps:// URI")
    base = s.text("base")
    if not base:
        raise s.error("base", "is required when uri is set (the search base DN)")
    preset_name = s.one_of("preset", (s.text("preset") or LdapConfig.preset).lower(), PRESETS)
    preset = PRESETS[preset_name]
    email = s.csv("email", preset.email)
    msisdn = s.csv("msisdn", preset.msisdn)
    if not email and not msisdn:
        raise s.error("email", "no attribute maps to a medium (set email or msisdn)")
    startls = s.flag("startls", LdapConfig.startls)
    if startls and uri.lower().startswith("ldaps:"):
        raise s.error("startls", "cannot be used with an ldaps:// uri (already TLS)")
    bind_dn = s.text("bind_dn")
    bind_pw = _bind_password(s, env)
    if bind_pw and not bind_dn:
        raise s.error("bind_pw", "needs bind_dn")
    if bind_dn and not bind_pw:
        raise s.error("bind_dn", f"needs bind_pw, bind_pw_file or ${BIND_PW_ENV}")
    filter_ = s.text("filter")
    if filter_ and not (filter_.startswith("(") and filter_.endswith(")")):
        raise s.error("filter", f"{filter_!r} is not an LDAP filter in parentheses")
    return LdapConfig(
        uri=uri, base=base, email=email, msisdn=msisdn,
        id_attr=s.text("id_attr") or preset.id_attr,
        hs_name=s.text("hs_name"),
        startls=startls, bind_dn=bind_dn, bind_pw=bind_pw, filter=filter_,
        ca_file=s.readable_file("ca_file"),
        verify_certs=s.flag("verify_certs", LdapConfig.verify_certs),
        connect_timeout_s=s.seconds("connect_timeout", LdapConfig.connect_timeout_s),
        search_timeout_s=s.seconds("search_timeout", LdapConfig.search_timeout_s),
        lookup_timeout_s=s.seconds("lookup_timeout", LdapConfig.lookup_timeout_s),
        breaker_cooldown_s=s.seconds("breaker_cooldown", LdapConfig.breaker_cooldown_s),
        pool_size=s.integer("pool_size", 1, LdapConfig.pool_size),
        cache_ttl_s=s.seconds("cache_ttl", LdapConfig.cache_ttl_s),
        sync_interval_s=s.seconds("sync_interval", LdapConfig.sync_interval_s),
        full_sync_interval_s=s.seconds("full_sync_interval", LdapConfig.full_sync_interval_s),
        changed_attr=s.text("changed_attr") or preset.changed_attr,
        preset=preset_name,
        msisdn_default_region=_region(s, "msisdn_default_region"),
    )


def _region(s: Section, key: str) -> str:
    import phonenumbers  # only when LDAP is on: kith's other commands start faster

    region = s.text(key).upper()
    if region and region not in phonenumbers.SUPPORTED_REGIONS:
        raise s.error(key, f"{s.text(key)!r} is not an ISO 3166 alpha-2 region code "
                           "with a telephone numbering plan (e.g. GB, US, DE)")
    return region


def _bind_password(s: Section, env: Mapping[str, str]) -> str:
    if s.text("bind_pw") and s.text("bind_pw_file"):
        raise s.error("bind_pw_file", "set bind_pw or bind_pw_file, not both")
    path = s.readable_file("bind_pw_file")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return s.text("bind_pw") or env.get(BIND_PW_ENV, "")


def proxy(s: Section) -> ProxyConfig | None:
    if _off_unless(s, "identity"):
        return None
    identity = s.url("identity", ("http", "https"), "an http(s):// base URL").rstrip("/")
    mediums = s.csv("mediums", MEDIUMS)
    for medium in mediums:
        s.one_of("mediums", medium, MEDIUMS)
    return ProxyConfig(
        identity=identity,
        access_token=s.text("access_token"),
        timeout_s=s.seconds("timeout", ProxyConfig.timeout_s),
        cache_ttl_s=s.seconds("cache_ttl", ProxyConfig.cache_ttl_s),
        negative_cache_ttl_s=s.seconds("negative_cache_ttl", ProxyConfig.negative_cache_ttl_s),
        mediums=mediums,
        email_domains=tuple(domain.lower().lstrip("@") for domain in s.csv("email_domains")),
        breaker_failures=s.integer("breaker_failures", 1, ProxyConfig.breaker_failures),
        breaker_cooldown_s=s.seconds("breaker_cooldown", ProxyConfig.breaker_cooldown_s),
        adopt_pepper=s.flag("adopt_pepper", ProxyConfig.adopt_pepper),
    )


def _from_items(name: str, items: Mapping[str, str]) -> Section:
    parser = as_written_parser()
    parser.read_dict({name: {key: value.strip() for key, value in items.items()}})
    return section(parser, name)


def parse_ldap_section(items: Mapping[str, str],
                       env: Mapping[str, str] | None = None) -> LdapConfig | None:
    """[ldap] from its key/values, as written in a file (for tools and tests)."""
    return ldap(_from_items("ldap", items), os.environ if env is None else env)


def parse_proxy_section(items: Mapping[str, str]) -> ProxyConfig | None:
    """[proxy] from its key/values, as written in a file (for tools and tests)."""
    return proxy(_from_items("proxy", items))

