"""[ldap] and [proxy] reading: defaults, presets, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kith.config import (
    DEFAULT_PRECEDENCE,
    ConfigError,
    load_config,
    parse_ldap_section,
    parse_proxy_section,
)
from kith.config_template import SECTIONS
from tests.conftest import write_config


def test_ldap_is_off_without_uri() -> None:
    assert parse_ldap_section({}, env={}) is None
    assert parse_ldap_section({"uri": ""}, env={}) is None


def test_the_forks_keys_and_defaults() -> None:
    config = parse_ldap_section({
        "uri": "ldap://ldap.example.org", "startls": "true", "base": "dc=example,dc=org",
        "email": "mail, mailPrimaryAddress, otherMailbox", "msisdn": "mobile",
        "id_attr": "uid", "hs_name": "example.org", "bind_dn": "cn=kith",
        "bind_pw": "pw", "filter": "(objectClass=person)"}, env={})
    assert config is not None
    assert config.email == ("mail", "mailPrimaryAddress", "otherMailbox")
    assert config.msisdn == ("mobile",)
    assert config.startls and config.verify_certs
    assert config.sync_interval_s == 60 and config.changed_attr == "modifyTimestamp"


def test_active_directory_preset() -> None:
    config = parse_ldap_section({"uri": "ldaps://dc.example.org", "base": "dc=example",
                                 "preset": "active_directory"}, env={})
    assert config is not None
    assert config.id_attr == "sAMAccountName" and config.changed_attr == "whenChanged"
    assert config.email == ("mail",) and config.msisdn == ("telephoneNumber", "mobile")


def test_timeouts_breaker_and_default_region() -> None:
    base = {"uri": "ldap://x", "base": "dc=x"}
    config = parse_ldap_section(base, env={})
    assert config is not None
    assert (config.lookup_timeout_s, config.breaker_cooldown_s) == (3.0, 10.0)
    assert config.msisdn_default_region == ""
    config = parse_ldap_section({**base, "lookup_timeout": "1.5", "breaker_cooldown": "30",
                                 "msisdn_default_region": " gb "}, env={})
    assert config is not None
    assert (config.lookup_timeout_s, config.breaker_cooldown_s) == (1.5, 30.0)
    assert config.msisdn_default_region == "GB"


def test_bind_password_from_file_or_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    base = {"uri": "ldap://x", "base": "dc=x", "bind_dn": "cn=kith"}
    from_file = parse_ldap_section({**base, "bind_pw_file": str(secret)}, env={})
    from_env = parse_ldap_section(base, env={"KITH_LDAP_BIND_PW": "from-env"})
    assert from_file is not None and from_file.bind_pw == "from-file"
    assert from_env is not None and from_env.bind_pw == "from-env"


@pytest.mark.parametrize(("items", "message"), [
    ({"base": "dc=x", "email": "mail"}, "[ldap] uri: is required: base, email set without it"),
    ({"uri": "ldap://x"}, "[ldap] base: is required"),
    ({"uri": "http://x", "base": "dc=x"}, "[ldap] uri: 'http://x' is not an ldap"),
    ({"uri": "ldap://x", "base": "dc=x", "startls": "maybe"}, "[ldap] startls: 'maybe'"),
    ({"uri": "ldaps://x", "base": "dc=x", "startls": "yes"}, "[ldap] startls: cannot"),
    ({"uri": "ldap://x", "base": "dc=x", "bind_dn": "cn=a"}, "[ldap] bind_dn: needs bind_pw"),
    ({"uri": "ldap://x", "base": "dc=x", "filter": "uid=*"}, "[ldap] filter:"),
    ({"uri": "ldap://x", "base": "dc=x", "preset": "novell"}, "[ldap] preset:"),
    ({"uri": "ldap://x", "base": "dc=x", "ca_file": "/nonexistent"}, "[ldap] ca_file:"),
    ({"uri": "ldap://x", "base": "dc=x", "pool_size": "0"}, "[ldap] pool_size:"),
    ({"uri": "ldap://x", "base": "dc=x", "lookup_timeout": "0"}, "[ldap] lookup_timeout: '0'"),
    ({"uri": "ldap://x", "base": "dc=x", "lookup_timeout": "soon"},
     "[ldap] lookup_timeout: 'soon' is not a positive number of seconds"),
    ({"uri": "ldap://x", "base": "dc=x", "breaker_cooldown": "-1"},
     "[ldap] breaker_cooldown: '-1' is not a positive number of seconds"),
    ({"uri": "ldap://x", "base": "dc=x", "msisdn_default_region": "UK"},
     "[ldap] msisdn_default_region: 'UK' is not an ISO 3166 alpha-2 region code"),
    ({"uri": "ldap://x", "base": "dc=x", "msisdn_default_region": "+44"},
     "[ldap] msisdn_default_region: '+44' is not"),
    ({"uri": "ldap://x", "base": "dc=x", "msisdn_default_region": "GBR"},
     "[ldap] msisdn_default_region: 'GBR' is not"),
    ({"msisdn_default_region": "GB"}, "[ldap] uri: is required: msisdn_default_region set"),
])
def test_bad_ldap_section_is_one_line(items: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_ldap_section(items, env={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_proxy_section() -> None:
    assert parse_proxy_section({}) is None
    config = parse_proxy_section({"identity": "https://vector.im/", "mediums": "email",
                                  "email_domains": "@Example.org, example.net"})
    assert config is not None
    assert config.identity == "https://vector.im"
    assert config.mediums == ("email",) and config.email_domains == ("example.org",
                                                                    "example.net")
    for items, message in [
        ({"access_token": "t"}, "[proxy] identity: is required"),
        ({"identity": "ftp://x"}, "[proxy] identity:"),
        ({"identity": "https://x", "mediums": "fax"}, "[proxy] mediums:"),
        ({"identity": "https://x", "timeout": "-1"}, "[proxy] timeout:"),
    ]:
        with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[")
                           .replace("]", r"\]")):
            parse_proxy_section(items)


def test_sources_config_from_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ldap": {"uri": "ldap://127.0.0.1:1", "base": "dc=x"},
                                   "proxy": {"identity": "http://127.0.0.1:2"}})
    sources = load_config(str(path), env={}).sources
    assert sources.ldap is not None and sources.proxy is not None
    assert sources.precedence == DEFAULT_PRECEDENCE
    path = write_config(tmp_path, {"ldap": {"precedence": "local, upstream, ldap"}})
    assert load_config(str(path), env={}).sources.precedence == (
        "local", "upstream", "ldap")
    path = write_config(tmp_path, {"proxy": {"precedence": "local, ldap"}})
    with pytest.raises(ConfigError, match=r"^\[proxy\] precedence:"):
        load_config(str(path), env={})


def test_partial_section_stops_startup(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ldap": {"base": "dc=x"}})
    with pytest.raises(ConfigError, match=r"^\[ldap\] uri: is required"):
        load_config(str(path), env={})


def test_read_as_written_without_default_keys(tmp_path: Path) -> None:
    path = tmp_path / "sydent.conf"
    path.write_text("[DEFAULT]\ntimeout = 9\n"
                    "[ldap]\nuri = ldap://x\nbase = dc=x\nbind_dn = cn=kith\n"
                    "bind_pw = 100%%sure%\n"
                    "[proxy]\nidentity = https://upstream.example\n")
    config = load_config(str(path), env={})
    assert config.sources.ldap is not None and config.sources.proxy is not None
    assert config.sources.ldap.bind_pw == "100%%sure%"
    assert config.sources.proxy.timeout_s == 5.0
    assert "DEFAULT.timeout" in config.ignored_keys


def test_bind_password_from_the_environment_load_config_is_given(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ldap": {"uri": "ldap://x", "base": "dc=x",
                                            "bind_dn": "cn=kith"}})
    config = load_config(str(path), env={"KITH_LDAP_BIND_PW": "from-env"})
    assert config.sources.ldap is not None and config.sources.ldap.bind_pw == "from-env"
    with pytest.raises(ConfigError, match=r"^\[ldap\] bind_dn: needs bind_pw"):
        load_config(str(path), env={})


def test_a_blank_value_means_the_default() -> None:
    config = parse_ldap_section({
        "uri": "ldap://x", "base": "dc=x", "startls": "", "verify_certs": "",
        "pool_size": "", "lookup_timeout": "", "preset": "", "id_attr": "",
        "email": "", "msisdn": "mobile"}, env={})
    assert config is not None
    assert not config.startls and config.verify_certs
    assert (config.pool_size, config.lookup_timeout_s) == (4, 3.0)
    assert config.preset == "openldap" and config.id_attr == "uid"
    assert config.email == () and config.msisdn == ("mobile",)  # a list is set, empty
    proxy = parse_proxy_section({"identity": "https://x", "timeout": "", "mediums": ""})
    assert proxy is not None and proxy.timeout_s == 5.0 and proxy.mediums == ()


@pytest.mark.parametrize(("name", "items", "message"), [
    ("ldap", {"uri": "ldap://[::1", "base": "dc=x"}, "[ldap] uri: 'ldap://[::1' is not an"),
    ("ldap", {"uri": "ldap://", "base": "dc=x"}, "[ldap] uri: 'ldap://' is not an"),
    ("proxy", {"identity": "https://[::1"}, "[proxy] identity: 'https://[::1' is not an"),
    ("proxy", {"identity": "https://x", "breaker_failures": "0"},
     "[proxy] breaker_failures: '0' is less than 1"),
])
def test_bad_url_or_number_is_one_line(name: str, items: dict[str, str],
                                       message: str) -> None:
    parse = parse_proxy_section if name == "proxy" else parse_ldap_section
    with pytest.raises(ConfigError) as info:
        parse(items)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_docs_list_every_key_the_generated_file_documents() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "ldap.md").read_text()
    for section, _, specs in SECTIONS:
        if section not in ("ldap", "proxy"):
            continue
        table = docs.split(f"## `[{section}]`")[1].split("\n\n")[1]
        documented = {key for row in table.splitlines()[2:]
                      for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
        assert documented == {spec.key for spec in specs}, section
