"""sydent.conf loading: Sydent's reading rules, kith's validation, key handling."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from signedjson.key import encode_signing_key_base64, generate_signing_key

from kith.config import (
    ConfigError,
    DbConfig,
    EmailConfig,
    HttpConfig,
    KithConfig,
    PeerConfig,
    SmsConfig,
    SourcesConfig,
    default_config_text,
    load_config,
    parse_signing_key,
)
from kith.config_template import SECTIONS, with_signing_key

KEY_B64 = encode_signing_key_base64(generate_signing_key("0"))
KEY_LINE = f"ed25519.signingkey = ed25519 0 {KEY_B64}"


def write(tmp_path: Path, text: str, *, key: bool = True) -> str:
    path = tmp_path / "sydent.conf"
    if key:
        text += f"\n[crypto]\n{KEY_LINE}\n"
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str, **env: str) -> KithConfig:
    return load_config(write(tmp_path, text), env=env)


# ------------------------------------------------------------------ first start


def test_first_start_writes_every_default_documented(tmp_path: Path) -> None:
    path = tmp_path / "sydent.conf"
    config = load_config(str(path), env={})
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = text.splitlines()
    for section, _, specs in SECTIONS:
        assert f"[{section}]" in lines
        for spec in specs:
            active, commented = f"{spec.key} =", f"# {spec.key} ="
            at = next(i for i, line in enumerate(lines)
                      if line.startswith(active) or line.startswith(commented))
            assert lines[at - 1].startswith("# "), spec.key  # documented just above
            if spec.default is not None:
                assert lines[at].startswith(active), spec.key
    # A fresh file means the built-in defaults, plus a new signing key.
    assert config.db == DbConfig()
    assert config.http == HttpConfig()
    assert config.sms == SmsConfig()
    assert config.email == EmailConfig(hostname=config.email.hostname)
    assert config.email.hostname
    assert config.general.server_name  # falls back to the hostname
    assert config.ignored_keys == () and config.peers == ()
    assert config.sources == SourcesConfig()  # no LDAP directory, no upstream
    assert parse_signing_key(config.crypto.signing_key).alg == "ed25519"
    assert f"ed25519.signingkey = {config.crypto.signing_key}" in lines


def test_reload_keeps_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "sydent.conf"
    first = load_config(str(path), env={})
    before = path.read_bytes()
    second = load_config(str(path), env={})
    assert second.crypto.signing_key == first.crypto.signing_key
    assert path.read_bytes() == before


def test_env_baked_in_at_first_start(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "kith.conf"
    path.parent.mkdir()
    env = {"SYDENT_CONF": str(path), "SYDENT_SERVER_NAME": "id.example",
           "SYDENT_PID_FILE": "/run/kith.pid", "SYDENT_DB_PATH": "/var/lib/kith/50%.db"}
    config = load_config(env=env)
    assert config.path == str(path)
    assert config.general.server_name == "id.example"
    assert config.general.pidfile_path == "/run/kith.pid"
    assert config.db.file == "/var/lib/kith/50%.db"
    text = path.read_text()
    assert "server.name = id.example" in text
    assert "db.file = /var/lib/kith/50%%.db" in text
    # Baked in: the env is no longer needed.
    again = load_config(str(path), env={})
    assert again.general.server_name == "id.example"
    assert again.db.file == "/var/lib/kith/50%.db"


def test_env_is_default_for_keys_missing_from_existing_file(tmp_path: Path) -> None:
    config = load(tmp_path, "[general]\nserver.name = file.example\n",
                  SYDENT_SERVER_NAME="env.example", SYDENT_DB_PATH="/data/env.db")
    assert config.general.server_name == "file.example"
    assert config.db.file == "/data/env.db"


def test_default_config_text_is_loadable(tmp_path: Path) -> None:
    path = tmp_path / "sydent.conf"
    path.write_text(default_config_text({"SYDENT_SERVER_NAME": "x.example"}))
    config = load_config(str(path), env={})
    assert config.general.server_name == "x.example"
    assert config.ignored_keys == ()


# ------------------------------------------------------------------ [DEFAULT]


def test_default_section_does_not_override_builtin_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "[DEFAULT]\nlog.level = DEBUG\nemail.smtphost = mail.example\n"
                            "nonsense = 1\n[general]\nserver.name = a.example\n")
    assert config.general.log_level == "INFO"
    assert config.email.smtp_host == "localhost"
    assert "DEFAULT.log.level" in config.ignored_keys
    assert "DEFAULT.email.smtphost" in config.ignored_keys
    assert "DEFAULT.nonsense" in config.ignored_keys


def test_default_section_supplies_keys_without_builtin_default(tmp_path: Path) -> None:
    config = load(tmp_path, "[DEFAULT]\nprometheus_port = 9101\nprometheus_addr = 127.0.0.1\n"
                            "email.ratelimit_sender.burst = 7\nsmsrule.44 = reject\n"
                            "originators.default = alpha:Kith\n[general]\n")
    assert config.general.prometheus_port == 9101
    assert config.general.prometheus_addr == "127.0.0.1"
    assert config.email.ratelimit_sender_burst == 7
    assert config.sms.rules == (("44", "reject"),)
    assert config.sms.originators == (("default", (("alpha", "Kith"),)),)
    assert config.ignored_keys == ()


def test_named_section_beats_default_section(tmp_path: Path) -> None:
    config = load(tmp_path, "[DEFAULT]\nprometheus_port = 9101\nlog.level = DEBUG\n"
                            "[general]\nprometheus_port = 9102\nlog.level = WARNING\n")
    assert config.general.prometheus_port == 9102
    assert config.general.log_level == "WARNING"


# ------------------------------------------------------------------ values


def test_values_are_parsed(tmp_path: Path) -> None:
    config = load(tmp_path, """
[general]
server.name = id.example
log.level = debug
ip.blacklist = 10.0.0.0/8, 192.168.1.1 ,fd00::/8,
ip.whitelist = 10.1.0.0/16
homeserver_allow_list = hs1.example, hs2.example
enable_v1_access = FALSE
enable_v1_associations = true
delete_tokens_on_bind = yes
access_token.query_param = True
workers = 2
[http]
internalapi.http.port = 8091
obey_x_forwarded_for = yes
federation.verifycerts = off
federation.timeout = 2.5
client.header_timeout = 4
client.body_timeout = 20.5
client.keepalive_timeout = 60
[email]
email.from = Kith <kith@example.org> 100%% sure
email.invite.subject = 50% off: %(sender_display_name)s
email.third_party_invite_keyword_blocklist = spam
    scam

    more
email.ratelimit_sender.rate_hz = 0.5
[sms]
provider = twilio
bodytemplate = Code {token}
originators.44 = long:447700900000, short:123
smsrule.1 = allow
""")
    g = config.general
    assert g.log_level == "DEBUG"
    assert g.ip_blacklist == tuple(ipaddress.ip_network(n)
                                   for n in ("10.0.0.0/8", "192.168.1.1/32", "fd00::/8"))
    assert g.ip_whitelist == (ipaddress.ip_network("10.1.0.0/16"),)
    assert g.homeserver_allow_list == frozenset({"hs1.example", "hs2.example"})
    assert (g.enable_v1_access, g.enable_v1_associations) == (False, False)
    assert g.delete_tokens_on_bind is False  # [general]: only "true" is true
    assert g.allow_query_access_token is True
    assert g.workers == 2
    h = config.http
    assert h.internal_port == 8091
    assert (h.obey_x_forwarded_for, h.federation_verifycerts) == (True, False)
    assert h.federation_timeout_s == 2.5
    assert (h.header_timeout_s, h.body_timeout_s, h.keepalive_timeout_s) == (4, 20.5, 60)
    e = config.email
    assert e.sender == "Kith <kith@example.org> 100% sure"
    assert e.invite_subject == "50% off: %(sender_display_name)s"
    assert e.keyword_blocklist == ("spam", "scam", "more")
    assert e.ratelimit_sender_rate_hz == 0.5
    s = config.sms
    assert (s.provider, s.body_template) == ("twilio", "Code {token}")
    assert s.originators == (("44", (("long", "447700900000"), ("short", "123"))),)
    assert s.rules == (("1", "allow"),)


def test_test_overrides_split_on_last_equals(tmp_path: Path) -> None:
    config = load(tmp_path, "[http]\nfederation.test_overrides = "
                            "name:8448=http://127.0.0.1:1, other.test=https://127.0.0.1:2/\n")
    assert config.http.federation_test_overrides == (
        ("name:8448", "http://127.0.0.1:1"), ("other.test", "https://127.0.0.1:2"))


def test_terms_file_that_exists(tmp_path: Path) -> None:
    terms = tmp_path / "terms.yaml"
    terms.write_text("master_version: '1'\n")
    config = load(tmp_path, f"[general]\nterms.path = {terms}\n")
    assert config.general.terms_path == str(terms)


@pytest.mark.parametrize(("section", "key", "value", "problem"), [
    ("http", "clientapi.http.port", "abc", "'abc' is not a port number"),
    ("http", "clientapi.http.port", "0", "is not a port number"),
    ("http", "replication.https.port", "65536", "is not a port number"),
    ("email", "email.smtpport", "", "is not a port number"),
    ("general", "prometheus_port", "x", "is not a port number"),
    ("http", "obey_x_forwarded_for", "maybe", "'maybe' is not a boolean"),
    ("http", "federation.verifycerts", "", "is not a boolean"),
    ("general", "log.level", "LOUD", "'LOUD' is not one of DEBUG"),
    ("general", "ip.blacklist", "10.0.0.0/8, 300.1.1.1", "300.1.1.1"),
    ("general", "ip.whitelist", "example.org", "example.org"),
    ("general", "terms.path", "/nonexistent/terms.yaml", "cannot read"),
    ("general", "address_lookup_limit", "0", "less than 1"),
    ("general", "address_lookup_limit", "many", "is not a whole number"),
    ("general", "workers", "0", "less than 1"),
    ("general", "homeserver_allow_list", "hs.example", "enable_v1_access = false"),
    ("http", "client.max_body_bytes", "1k", "is not a whole number"),
    ("http", "federation.timeout", "-1", "is not a positive number"),
    ("http", "client.header_timeout", "0", "is not a positive number"),
    ("http", "client.body_timeout", "soon", "is not a positive number"),
    ("http", "client.keepalive_timeout", "-5", "is not a positive number"),
    ("http", "federation.test_overrides", "hs.example", "is not servername="),
    ("http", "federation.cafile", "/nonexistent.pem", "cannot read"),
    ("email", "email.tls_cafile", "/nonexistent.pem", "cannot read"),
    ("db", "db.url", "not a url", "is not a database URL"),
    ("email", "email.from", "100% sure", "write a literal % as %%"),
    ("email", "email.ratelimit_sender.rate_hz", "0", "is not a positive number"),
    ("email", "email.ratelimit_sender.burst", "0", "less than 1"),
    ("sms", "provider", "pigeon", "'pigeon' is not one of openmarket, twilio"),
    ("sms", "smsrule.44", "maybe", "'maybe' is not allow or reject"),
    ("sms", "originators.44", "fax:123", "'fax:123' is not long:"),
    ("sms", "originators.44", "alpha:", "is not long:"),
    ("crypto", "ed25519.signingkey", "ed25519 0 not-base64!", "not 32 bytes"),
    ("crypto", "ed25519.signingkey", "rsa 0 " + KEY_B64, "'rsa' is not a supported"),
    ("crypto", "ed25519.signingkey", "ed25519 " + KEY_B64, "expected 'ed25519 <version>"),
])
def test_bad_value_names_key(tmp_path: Path, section: str, key: str, value: str,
                             problem: str) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n", key=section != "crypto")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert message.startswith(f"[{section}] {key}: ")
    assert problem in message
    assert "\n" not in message


def test_unreadable_terms_file(tmp_path: Path) -> None:
    terms = tmp_path / "terms.yaml"
    terms.mkdir()  # a directory is never a readable file, even for root
    with pytest.raises(ConfigError, match=r"^\[general\] terms.path: cannot read"):
        load(tmp_path, f"[general]\nterms.path = {terms}\n")
    if os.geteuid() != 0:
        terms.rmdir()
        terms.write_text("x")
        terms.chmod(0)
        with pytest.raises(ConfigError, match=r"^\[general\] terms.path: cannot read"):
            load(tmp_path, f"[general]\nterms.path = {terms}\n")


def test_secrets_are_not_echoed_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[crypto]\ned25519.signingkey = ed25519 0 secretsecret\n", key=False)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "secretsecret" not in str(caught.value)
    path = write(tmp_path, "[db]\ndb.url = ://user:hunter2@\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(("text", "problem"), [
    ("server.name = x\n", "a key before the first [section]"),
    ("[general]\nserver.name = a\nSERVER.NAME = b\n", "[general] server.name: set twice"),
    ("[general]\n[general]\n", "section [general] appears twice"),
    ("[general]\njust words\n", "not a 'key = value' line"),
])
def test_syntax_errors_are_one_line(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_optional_ports(tmp_path: Path) -> None:
    config = load(tmp_path, "[http]\ninternalapi.http.port =\n[general]\nprometheus_port =\n")
    assert config.http.internal_port is None
    assert config.general.prometheus_port is None


# ------------------------------------------------------------------ sections


def test_unknown_keys_and_sections_are_listed(tmp_path: Path) -> None:
    config = load(tmp_path, """
[general]
server.name = a.example
sentry_dsn = https://sentry.example
[email]
email.nonsense = 1
[General]
server.name = b.example
[ldap]
uri = ldap://ldap.example
base = dc=example
filter = (mail=%(address)s)
[proxy]
identity = https://upstream.example
base_url = https://upstream.example
[peer.other.example]
base_replication_url = https://other.example:4434
[sms]
originators.44 = alpha:Kith
smsrule.44 = allow
""")
    assert config.general.server_name == "a.example"  # sections are case-sensitive
    assert config.ignored_keys == ("general.sentry_dsn", "email.email.nonsense", "General.*",
                                   "proxy.base_url")
    assert config.peers == (
        PeerConfig("other.example", base_replication_url="https://other.example:4434"),)
    # [ldap] and [proxy] are kith's own, read as written (no %-interpolation).
    assert config.sources.ldap is not None and config.sources.proxy is not None
    assert config.sources.ldap.filter == "(mail=%(address)s)"
    assert config.sources.proxy.identity == "https://upstream.example"


# ------------------------------------------------------------------ signing key


def test_parse_signing_key_round_trip() -> None:
    key = parse_signing_key(f"ed25519 0 {KEY_B64}")
    assert (key.alg, key.version) == ("ed25519", "0")
    assert encode_signing_key_base64(key) == KEY_B64
    assert encode_signing_key_base64(parse_signing_key(f"  ed25519   abc {KEY_B64}=\n")) == KEY_B64
    with pytest.raises(ConfigError, match=r"^\[crypto\] ed25519.signingkey: "):
        parse_signing_key("")


HEX_SEED = "1f" * 32
COMMENTED = f"""# my comments stay
[general]
; a semicolon comment
server.name = a.example

[crypto]
# the key below is old
ed25519.signingkey = {HEX_SEED}

[email]
# trailing section
email.smtphost = mail.example
"""


def test_hex_seed_converted_and_written_back(tmp_path: Path) -> None:
    path = tmp_path / "sydent.conf"
    path.write_text(COMMENTED)
    path.chmod(0o640)
    config = load_config(str(path), env={})
    new_text = f"ed25519 0 {encode_signing_key_base64(parse_signing_key(HEX_SEED))}"
    assert config.crypto.signing_key == new_text
    assert path.read_text() == COMMENTED.replace(HEX_SEED, new_text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert load_config(str(path), env={}).crypto.signing_key == new_text


def test_missing_key_added_under_crypto_header(tmp_path: Path) -> None:
    text = "[crypto]\n# nothing yet\n[general]\nserver.name = a.example\n"
    path = write(tmp_path, text, key=False)
    config = load_config(path, env={})
    assert Path(path).read_text() == text.replace(
        "[crypto]\n", f"[crypto]\ned25519.signingkey = {config.crypto.signing_key}\n")
    assert load_config(path, env={}).crypto.signing_key == config.crypto.signing_key


def test_missing_key_appended_with_crypto_section(tmp_path: Path) -> None:
    text = "# hello\n[general]\nserver.name = a.example"  # no final newline
    path = write(tmp_path, text, key=False)
    config = load_config(path, env={})
    written = Path(path).read_text()
    assert written.startswith(text + "\n")
    assert written.endswith(f"[crypto]\ned25519.signingkey = {config.crypto.signing_key}\n")
    assert load_config(path, env={}).crypto.signing_key == config.crypto.signing_key


def test_empty_key_line_replaced(tmp_path: Path) -> None:
    text = "[crypto]\nED25519.SigningKey =\n# after\n[general]\n"
    path = write(tmp_path, text, key=False)
    config = load_config(path, env={})
    assert Path(path).read_text() == text.replace(
        "ED25519.SigningKey =", f"ed25519.signingkey = {config.crypto.signing_key}")


def test_with_signing_key_reads_lines_like_configparser() -> None:
    text = ("[general]\nnote = first\n  [crypto]\n"  # indented: a continuation, not a header
            "[crypto]\n# ed25519.signingkey = commented\nother = 1\n"
            "ed25519.signingkey = old\n  continued\n\nlast = 2\r\n")
    assert with_signing_key(text, "NEW") == (
        "[general]\nnote = first\n  [crypto]\n"
        "[crypto]\n# ed25519.signingkey = commented\nother = 1\n"
        "ed25519.signingkey = NEW\r\n\nlast = 2\r\n")


def test_email_tls_cafile(tmp_path: Path) -> None:
    assert load(tmp_path, "").email.tls_cafile == ""
    ca = tmp_path / "smtp-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load(tmp_path, f"[email]\nemail.tls_cafile = {ca}\n").email.tls_cafile == str(ca)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"[email]\nemail.tls_cafile = {missing}\n")
    message = str(caught.value)
    assert message.startswith(f"[email] email.tls_cafile: cannot read '{missing}'")
    assert "\n" not in message


# ------------------------------------------------------------------ peers

PEER_KEY = encode_signing_key_base64(generate_signing_key("0"))  # any 32 bytes


def test_peer_sections(tmp_path: Path) -> None:
    hex_key = base64.b64decode(PEER_KEY + "=").hex()
    config = load(tmp_path, f"""
[general]
server.name = a.example
[peer.b.example]
base_replication_url = https://b.example:4434/
public_key = ed25519:0 {PEER_KEY}
colour = blue
[peer.c.example]
public_key = ed25519:7 {hex_key}
[peer.sydent.example]
base_replication_url = https://10.0.0.3:1001
""")
    assert config.peers == (
        PeerConfig("b.example", "https://b.example:4434/", PEER_KEY, "0"),
        PeerConfig("c.example", "", PEER_KEY, "7"),  # hex, as Sydent accepts, becomes base64
        PeerConfig("sydent.example", "https://10.0.0.3:1001"),  # key: from the database
    )
    assert config.ignored_keys == ("peer.b.example.colour",)
    bare = load(tmp_path, f"[peer.b.example]\npublic_key = {PEER_KEY}=\n").peers
    assert bare == (PeerConfig("b.example", public_key=PEER_KEY),)


@pytest.mark.parametrize(("section", "error"), [
    ("[peer.b.example]\npublic_key = ed25519:0 c2hvcnQ",
     "[peer.b.example] public_key: the key is not 32 bytes of base64 (or hex)"),
    ("[peer.b.example]\npublic_key = ed25519 0 " + PEER_KEY,
     "[peer.b.example] public_key: expected 'ed25519:<version> <unpadded base64 key>'"),
    ("[peer.b.example]\npublic_key = curve:0 " + PEER_KEY,
     "[peer.b.example] public_key: 'curve:0' is not a key id like ed25519:0"),
    ("[peer.b.example]\nbase_replication_url = http://b.example:4434",
     "[peer.b.example] base_replication_url: 'http://b.example:4434' is not an https:// URL"),
    ("[peer.not a name]\npublic_key = " + PEER_KEY,
     "[peer.not a name]: 'not a name' is not a server name"),
    ("[general]\nserver.name = a.example\n[peer.a.example]\npublic_key = " + PEER_KEY,
     "[peer.a.example]: this is this server's own name (server.name)"),
])
def test_bad_peer_section_names_the_key(tmp_path: Path, section: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, section)
    assert str(caught.value).startswith(error)
