"""The typed, frozen configuration kith runs on (read by `kith.config`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from kith.threepid import MEDIUMS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The sources of an answer (`precedence` in [ldap] and [proxy], the `source` of a stored
# association), in the default order of precedence.
LDAP, LOCAL, UPSTREAM = "ldap", "local", "upstream"
DEFAULT_PRECEDENCE = (LDAP, LOCAL, UPSTREAM)


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
    log_format: str = "text"  # kith: or "json"
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
    # kith: addresses one account, and one client address, may look up per minute.
    lookup_budget_account: int = 20000
    lookup_budget_ip: int = 100000
    # kith: mails, texts and invites one client address may have kith send.
    client_ip_ratelimit_burst: int = 50
    client_ip_ratelimit_rate_hz: float = 1 / 10
    # kith: seconds a stored 3PID invite (and its ephemeral key) is kept.
    invite_lifetime_s: float = 365 * 24 * 60 * 60
    # kith: seconds between changes of the lookup pepper (None: never by itself).
    lookup_pepper_rotation_s: float | None = None


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
    # kith: a client must send a whole request head (request line and headers) within
    # this many seconds of its first byte, or the connection is closed.
    header_timeout_s: float = 10.0
    # kith: a request body must arrive within this many seconds (else 408).
    body_timeout_s: float = 30.0
    # kith: an idle connection between two requests is closed after this many seconds.
    keepalive_timeout_s: float = 130.0
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
    # kith: longest wait between tries of a peer that does not answer, in seconds.
    replication_max_retry_interval_s: float = 60.0


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
    # kith: mails (validation and invites) to one address.
    ratelimit_recipient_burst: int = 5
    ratelimit_recipient_rate_hz: float = 1 / 300
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
class LdapConfig:
    """[ldap]: a directory (OpenLDAP, Active Directory) as a trusted identity source."""
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
    """[proxy]: the upstream identity server asked for addresses no local source maps."""
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
    # kith announces the upstream's lookup pepper, so that sha256 lookups are forwarded.
    adopt_pepper: bool = True


@dataclass(frozen=True)
class SourcesConfig:
    """The identity sources besides kith's own bindings; None: that source is off."""
    ldap: LdapConfig | None = None
    proxy: ProxyConfig | None = None
    precedence: tuple[str, ...] = DEFAULT_PRECEDENCE


@dataclass(frozen=True)
class PeerConfig:
    """[peer.<name>]: a replication peer.  `name` is its server name, the name it signs
    with and its certificate's common name."""
    name: str
    # "": the URL the database has for it (a peer taken over from Sydent), else
    # https://<name>:4434/.
    base_replication_url: str = ""
    # Its ed25519 public key, unpadded base64 ("": the key the database has for it),
    # and the key's version (its signatures are under `ed25519:<version>`).
    public_key: str = ""
    key_version: str = "0"


@dataclass(frozen=True)
class KithConfig:
    path: str
    general: GeneralConfig
    db: DbConfig = field(default_factory=DbConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    email: EmailConfig = field(default_factory=EmailConfig)
    sms: SmsConfig = field(default_factory=SmsConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    # Keys present in the file that kith does not understand, "section.key"
    # ("section.*" for a whole unknown section).
    ignored_keys: tuple[str, ...] = ()
    # The [peer.<name>] sections.
    peers: tuple[PeerConfig, ...] = ()

