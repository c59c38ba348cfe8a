"""sydent.conf-compatible configuration → typed, validated, frozen objects.

kith reads the same file as Sydent, the same way (configparser, `%%` for a literal
`%`, Sydent's [DEFAULT] rule, env vars as defaults), so an existing sydent.conf works
unchanged.  A wrong value stops startup with a one-line `ConfigError` naming the key.
The documented keys and defaults live in `kith.config_template`, the reads of each
section in `kith.config_sections` (Sydent's) and `kith.config_sources` ([ldap] and
[proxy], kith's own), the resulting types in `kith.config_model` (all importable from
here).
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Mapping
from configparser import ConfigParser

from signedjson.key import generate_signing_key

from kith import config_peers, config_sources
from kith import config_sections as sections
from kith.config_model import (
    DEFAULT_PRECEDENCE,
    LDAP,
    LOCAL,
    UPSTREAM,
    ConfigError,
    CryptoConfig,
    DbConfig,
    EmailConfig,
    GeneralConfig,
    HttpConfig,
    IPNetwork,
    KithConfig,
    LdapConfig,
    PeerConfig,
    ProxyConfig,
    SmsConfig,
    SourcesConfig,
    unreadable,
)
from kith.config_sections import SIGNING_KEY, parse_signing_key
from kith.config_sources import BIND_PW_ENV, parse_ldap_section, parse_proxy_section
from kith.config_template import (
    builtin_defaults,
    known_keys,
    render_default_config,
    with_signing_key,
    write_atomically,
)

__all__ = [
    "BIND_PW_ENV", "DEFAULT_PRECEDENCE", "LDAP", "LOCAL", "UPSTREAM",
    "ConfigError", "CryptoConfig", "DbConfig", "EmailConfig", "GeneralConfig", "HttpConfig",
    "IPNetwork", "KithConfig", "LdapConfig", "PeerConfig", "ProxyConfig", "SmsConfig",
    "SourcesConfig",
    "default_config_text", "load_config", "parse_ldap_section", "parse_proxy_section",
    "parse_signing_key", "unreadable",
]

log = logging.getLogger(__name__)

# Env vars giving defaults, as Sydent: baked into the file at first start.
_ENV_DEFAULTS = (
    ("SYDENT_SERVER_NAME", "general", "server.name"),
    ("SYDENT_PID_FILE", "general", "pidfile.path"),
    ("SYDENT_DB_PATH", "db", "db.file"),
)
_SMS_PATTERNS = ("originators.", "smsrule.")


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> KithConfig:
    """Read the config file (`path`, else $SYDENT_CONF, else ./sydent.conf).

    A missing file is created with every default, documented.  A missing signing key
    is generated, and an old hex one converted, and saved back into the file.  `env`
    (default: the process's) gives the first start's defaults and [ldap]'s
    $KITH_LDAP_BIND_PW.
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
    as_written = _parse(path, text, config_sources.as_written_parser())
    ignored = _ignored(as_written, defaults)
    crypto, save_key = sections.crypto(sections.Section(parser, "crypto"))
    general = sections.general(sections.Section(parser, "general"))
    config = KithConfig(
        path=path,
        general=general,
        db=sections.db(sections.Section(parser, "db")),
        http=sections.http(sections.Section(parser, "http")),
        email=sections.email(sections.Section(parser, "email")),
        sms=sections.sms(sections.Section(parser, "sms")),
        crypto=crypto,
        sources=config_sources.sources(as_written, env),
        ignored_keys=ignored,
        peers=config_peers.peers(as_written, general.server_name),
    )
    if save_key:
        _save(path, with_signing_key(text, crypto.signing_key))
        log.warning("saved a new or converted signing key to [crypto] %s in %s", SIGNING_KEY, path)
    return config


def default_config_text(env: Mapping[str, str] | None = None) -> str:
    """The documented file `load_config` writes at first start (with a new key)."""
    return _render(_builtin_defaults(os.environ if env is None else env))


def _builtin_defaults(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    defaults = builtin_defaults()
    for var, section, key in _ENV_DEFAULTS:
        if var in env:
            if "\n" in env[var] or "\r" in env[var]:
                raise ConfigError(f"${var}: must be a single line")
            defaults[section][key] = env[var].replace("%", "%%")
    return defaults


def _render(defaults: dict[str, dict[str, str]]) -> str:
    new_key = sections.signing_key_text(generate_signing_key("0"))
    return render_default_config({**defaults, "crypto": {SIGNING_KEY: new_key}})


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


def _ignored(layout: ConfigParser, defaults: dict[str, dict[str, str]]) -> tuple[str, ...]:
    """The keys of the file as written that kith does not use."""
    known = known_keys()

    def is_known(section: str, key: str) -> bool:
        return key in known[section] or (section == "sms" and key.startswith(_SMS_PATTERNS))

    def default_applies(key: str) -> bool:  # see load_config: only where no built-in default
        return any(is_known(s, key) and key not in defaults[s] and not layout.has_option(s, key)
                   for s in known if s not in config_sources.AS_WRITTEN)

    ignored: list[str] = []
    for section in layout.sections():
        items = tuple(layout.items(section))
        if section == configparser.DEFAULTSECT:
            ignored += [f"{section}.{key}" for key, _ in items if not default_applies(key)]
        elif section in known:
            ignored += [f"{section}.{key}" for key, _ in items if not is_known(section, key)]
        elif section.startswith(config_peers.PEER_PREFIX):
            ignored += [f"{section}.{key}" for key, _ in items
                        if key not in config_peers.PEER_KEYS]
        else:
            ignored.append(f"{section}.*")
    return tuple(ignored)


