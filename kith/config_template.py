"""sydent.conf as text: every key kith knows, its built-in default and documentation,
and the two ways kith writes the file.

One table serves two purposes: the loader takes its built-in defaults from it, and
`render_default_config` turns it into the commented file written at first start, so
the documentation cannot drift from the defaults.  Later, kith only ever edits single
lines (`with_option`): the signing key it generates, and `[db] db.file` when it takes
over a Sydent database; every other line and comment of the operator's stays.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from configparser import ConfigParser
from dataclasses import dataclass


@dataclass(frozen=True)
class KeySpec:
    key: str
    # The built-in default, as written in the file (so a literal "%" is "%%").
    # None: no built-in default; then a [DEFAULT] entry applies, and the generated
    # file shows `example` commented out.
    default: str | None
    doc: str
    example: str = ""


_GENERAL_BOOL = "Only the word true (any case) means true in [general]."

SECTIONS: tuple[tuple[str, str, tuple[KeySpec, ...]], ...] = (
    ("general", "The server itself.", (
        KeySpec("server.name", "",
                "Name this server signs associations and invites with; homeservers and "
                "peers see it. First start: $SYDENT_SERVER_NAME. Empty: the machine's "
                "hostname (with a warning)."),
        KeySpec("server.aliases", "",
                "kith: other names clients and homeservers use for this server (the "
                "id_server they were given), comma-separated; a homeserver-signed unbind "
                "must be addressed to server.name or one of these."),
        KeySpec("log.path", "",
                "File to log to, rotated at midnight, 365 kept (several workers share it; "
                "SIGHUP reopens it, for logrotate). Empty: log to stderr."),
        KeySpec("log.level", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL."),
        KeySpec("log.format", "text",
                "kith: text, or json (one object a line, for log shippers). Email "
                "addresses and phone numbers are logged as keyed hashes either way."),
        KeySpec("pidfile.path", "sydent.pid",
                "The process id is written here at start. First start: $SYDENT_PID_FILE."),
        KeySpec("terms.path", "",
                "YAML file of the terms of service users must accept before using the "
                "v2 API. Empty: no terms."),
        KeySpec("address_lookup_limit", "10000",
                "Most addresses accepted in one /v2/lookup request."),
        KeySpec("templates.path", "res",
                "Folder of email, SMS and HTML templates, one subfolder per brand."),
        KeySpec("brand.default", "matrix-org",
                "Brand used when a request names none, or one that does not exist."),
        KeySpec("enable_v1_access", "true",
                "false: do not serve the deprecated /_matrix/identity/api/v1 endpoints "
                "at all. " + _GENERAL_BOOL),
        KeySpec("enable_v1_associations", "true",
                "Serve the v1 3pid/bind endpoint (off when enable_v1_access is false)."),
        KeySpec("delete_tokens_on_bind", "true",
                "Delete pending invite tokens once they were delivered to the homeserver "
                "on bind."),
        KeySpec("ip.blacklist", "",
                "Comma-separated IP ranges (CIDR) or addresses that requests to "
                "homeservers must not reach. Empty: loopback, private, link-local and "
                "other special-use ranges. Replication is not affected."),
        KeySpec("ip.whitelist", "",
                "Comma-separated IP ranges or addresses exempted from ip.blacklist."),
        KeySpec("homeserver_allow_list", "",
                "Comma-separated homeserver names allowed to register accounts "
                "(/v2/account/register). Empty: any. Needs enable_v1_access = false."),
        KeySpec("prometheus_port", None,
                "Serve Prometheus metrics on this port. Not set: no metrics.", "9101"),
        KeySpec("prometheus_addr", None,
                "Address the metrics listener binds to.", "127.0.0.1"),
        KeySpec("access_token.query_param", "true",
                "kith: accept an access token in the ?access_token= query parameter "
                "(deprecated by the spec, still sent by some homeservers). "
                + _GENERAL_BOOL),
        KeySpec("workers", "1",
                "kith: HTTP worker processes sharing the client API port."),
        KeySpec("onbind.give_up_after", "604800",
                "kith: seconds after a bind during which kith keeps retrying to tell the "
                "invitee's homeserver about pending 3PID invites (POST /3pid/onbind, "
                "backoff from 1 s doubling up to 10 min); then it gives up with a warning "
                "in the log. Default: 7 days."),
        KeySpec("lookup.budget.account", None,
                "kith: addresses one account may look up per minute (hashed and plain "
                "v2 lookups together); more is refused with 429 M_LIMIT_EXCEEDED and "
                "retry_after_ms. Shared by every worker and every instance on the same "
                "database. At least address_lookup_limit. Default: 20000 (or "
                "address_lookup_limit if larger).", "20000"),
        KeySpec("lookup.budget.ip", None,
                "kith: addresses one client address may look up per minute, v1 and v2 "
                "lookups together (IPv6 clients are counted by /64). Default: 100000 (or "
                "address_lookup_limit if larger).", "100000"),
        KeySpec("client_ip.ratelimit.burst", None,
                "kith: mails, texts and invites one client address (an IPv6 /64) may "
                "make kith send (email and msisdn requestToken, store-invite) before "
                "rate limiting. A homeserver's store-invite calls all come from its "
                "address: raise this for a busy one. The same numbers bound account "
                "registrations per client address, in a bucket of their own (each makes "
                "kith ask a homeserver). Default: 50.", "50"),
        KeySpec("client_ip.ratelimit.rate_hz", None,
                "kith: rate the per-address limit drains at, per second. Default: 0.1 "
                "(one every 10 s).", "0.1"),
        KeySpec("invite.lifetime", None,
                "kith: seconds a 3PID invite (its token and its ephemeral key) is kept "
                "after store-invite; then it is deleted, delivered or not, and the key "
                "is no longer valid. Sydent kept them forever. Default: 31536000 (365 "
                "days).", "31536000"),
        KeySpec("lookup_pepper.rotation", None,
                "kith: seconds between changes of the lookup pepper (86400: daily), so "
                "that hashes computed once stop matching; one instance changes it for all "
                "sharing the database (also `kith rotate-pepper`). Default: never.", "86400"),
    )),
    ("db", "Storage.", (
        KeySpec("db.file", "sydent.db",
                "SQLite database file. First start: $SYDENT_DB_PATH. If it is Sydent's "
                "database, kith leaves it unchanged, imports it into kith.db beside it, "
                "and sets this key to that file."),
        KeySpec("db.url", "",
                "kith: SQLAlchemy URL of the database, e.g. "
                "postgresql://kith:secret@localhost/kith. Set: db.file is not used."),
    )),
    ("http", "Listeners and outbound HTTP.", (
        KeySpec("clientapi.http.bind_address", "::", "Address of the client API (plain HTTP)."),
        KeySpec("clientapi.http.port", "8090", "Port of the client API."),
        KeySpec("clientapi.https.certfile", "",
                "kith: PEM certificate (with its chain) to serve the client API over "
                "HTTPS on clientapi.http.port; reloaded on SIGHUP. Empty: plain HTTP."),
        KeySpec("clientapi.https.keyfile", "",
                "kith: PEM private key of clientapi.https.certfile. Empty: the key is in "
                "the certfile."),
        KeySpec("internalapi.http.bind_address", "::1",
                "Address of the unauthenticated internal API "
                "(/_matrix/identity/internal/bind and unbind)."),
        KeySpec("internalapi.http.port", "",
                "Port of the internal API. Empty: no internal API."),
        KeySpec("replication.https.certfile", "",
                "PEM file with the key and certificate used for replication. Empty: no "
                "replication listener and no pushes to peers."),
        KeySpec("replication.https.cacert", "",
                "CA certificate for peers' certificates. Empty: the system CAs."),
        KeySpec("replication.https.bind_address", "::", "Address of the replication listener."),
        KeySpec("replication.https.port", "4434", "Port of the replication listener."),
        KeySpec("replication.max_retry_interval", None,
                "kith: longest wait, in seconds, between tries of a peer that does not "
                "accept pushes (the wait doubles from 1 s). Default: 60.", "60"),
        KeySpec("obey_x_forwarded_for", "False",
                "Take the client address from X-Forwarded-For (behind a reverse proxy). "
                "Booleans here: true/false, yes/no, on/off, 1/0."),
        KeySpec("federation.verifycerts", "True", "Verify homeservers' TLS certificates."),
        KeySpec("client_http_base", "",
                "Public base URL of this server, used in email links and "
                "key_validity_url. Empty: relative email links, and the invites' "
                "key_validity_url (which must be absolute) uses https://<server.name>."),
        KeySpec("verify_response_template", None,
                "Deprecated: HTML page answering a click on an email link; overrides "
                "the brand's verify_response_template.html.", "res/verify_response.html"),
        KeySpec("client.max_body_bytes", "524288",
                "kith: largest request body accepted, in bytes."),
        KeySpec("client.header_timeout", "10",
                "kith: seconds a client has to send a whole request head (request line "
                "and headers), from its first byte; slower connections are closed, so "
                "slow clients cannot hold every connection kith can open."),
        KeySpec("client.body_timeout", "30",
                "kith: seconds a client has to send a request body, from when kith starts "
                "reading it; a slower request is answered 408 and its connection closed."),
        KeySpec("client.keepalive_timeout", "130",
                "kith: seconds an idle connection is kept open for a next request. Longer "
                "than the 120 s Synapse keeps idle connections, so that Synapse closes "
                "them, never kith in the middle of a request Synapse is sending."),
        KeySpec("federation.timeout", "10",
                "kith: seconds allowed for one request to a homeserver."),
        KeySpec("federation.cafile", "",
                "kith: extra CA bundle (PEM) trusted for homeservers' certificates."),
        KeySpec("federation.test_overrides", "",
                "kith, for tests only: comma-separated servername=base_url pairs that "
                "bypass homeserver discovery, e.g. hs.test:8448=http://127.0.0.1:5555; "
                "the name * stands for every server name not listed."),
    )),
    ("email", "Sending email.", (
        KeySpec("email.from", "Sydent Validation <noreply@{hostname}>",
                "From header and envelope sender ({hostname} is not replaced)."),
        KeySpec("email.subject", "Your Validation Token", "Unused; kept for compatibility."),
        KeySpec("email.invite.subject", "%(sender_display_name)s has invited you to chat",
                "Subject of room invites, %-formatted with the invite's fields "
                "(read as written: no %% doubling here)."),
        KeySpec("email.invite.subject_space",
                "%(sender_display_name)s has invited you to a space",
                "Subject of space invites (room_type m.space), as email.invite.subject."),
        KeySpec("email.smtphost", "localhost", "SMTP server."),
        KeySpec("email.smtpport", "25", "SMTP port."),
        KeySpec("email.smtpusername", "", "SMTP login; empty: no login."),
        KeySpec("email.smtppassword", "", "SMTP password."),
        KeySpec("email.hostname", "",
                "Name used in HELO and Message-IDs. Empty: this machine's FQDN."),
        KeySpec("email.tlsmode", "0",
                "SSL or TLS: implicit TLS; STARTTLS: upgrade a plain connection; anything "
                "else: plain text. Case-sensitive. TLS modes verify the certificate."),
        KeySpec("email.tls_cafile", "",
                "kith: extra CA bundle (PEM) trusted, besides the system CAs, for the "
                "SMTP server's certificate in the TLS modes."),
        KeySpec("email.default_web_client_location", "https://app.element.io",
                "Web client linked from invites unless the homeserver names one."),
        KeySpec("email.third_party_invite_username_obfuscate_characters", "3",
                "Characters of the invitee's local part kept in the redacted display name."),
        KeySpec("email.third_party_invite_domain_obfuscate_characters", "3",
                "Characters of the invitee's domain kept in the redacted display name."),
        KeySpec("email.third_party_invite_homeserver_blocklist", None,
                "Homeservers not allowed to send invites, one per line (indent the "
                "following lines). Default: none.", "evil.example"),
        KeySpec("email.third_party_invite_room_blocklist", None,
                "Room ids invites may not come from, one per line. Default: none.",
                "!room:evil.example"),
        KeySpec("email.third_party_invite_keyword_blocklist", None,
                "Invites whose fields contain one of these words (case-insensitive) are "
                "refused, one per line. Default: none.", "spam"),
        KeySpec("email.ratelimit_sender.burst", None,
                "Invite and validation emails per sender before rate limiting: the "
                "account (v2) or client address (v1) asking for a validation mail, the "
                "inviting user of store-invite. Default: 5.", "5"),
        KeySpec("email.ratelimit_sender.rate_hz", None,
                "Rate the sender limit drains at, per second. Default: 1/300.", "0.00333"),
        KeySpec("email.ratelimit_recipient.burst", None,
                "kith: invite and validation emails to one address before rate "
                "limiting. Default: 5.", "5"),
        KeySpec("email.ratelimit_recipient.rate_hz", None,
                "kith: rate the per-address limit drains at, per second. Default: 1/300.",
                "0.00333"),
        KeySpec("email.template", None,
                "Deprecated: validation email template; overrides the brand's.",
                "res/verification_template.eml"),
        KeySpec("email.invite_template", None,
                "Deprecated: invite email template; overrides the brand's.",
                "res/invite_template.eml"),
    )),
    ("sms", "Sending SMS.", (
        KeySpec("provider", "openmarket", "kith: SMS gateway, openmarket or twilio."),
        KeySpec("bodyTemplate", "Your code is {token}",
                "Text of validation messages; {token} is the code."),
        KeySpec("username", "", "OpenMarket account (HTTP Basic auth)."),
        KeySpec("password", "", "OpenMarket password."),
        KeySpec("originators.44", None,
                "Sender for numbers with this calling code (here 44): a comma list of "
                "long:<number>, short:<code> or alpha:<name>; the number picks one.",
                "long:447700900000,short:12345"),
        KeySpec("originators.default", None,
                "Sender for other calling codes. Default: alpha:Matrix.", "alpha:Matrix"),
        KeySpec("smsrule.1", None,
                "allow or reject messages to this calling code (here 1). "
                "Default: allow.", "reject"),
        KeySpec("msisdn.ratelimit.burst", None, "Messages per number before rate "
                "limiting. Default: 5.", "5"),
        KeySpec("msisdn.ratelimit.rate_hz", None,
                "Rate the per-number limit drains at, per second. Default: 1/3600.",
                "0.000278"),
        KeySpec("country.ratelimit.burst", None,
                "Messages per calling code before rate limiting. Default: 50.", "50"),
        KeySpec("country.ratelimit.rate_hz", None,
                "Rate the per-country limit drains at, per second. Default: 1/60.",
                "0.0167"),
        KeySpec("twilio.account_sid", "", "kith: Twilio account SID."),
        KeySpec("twilio.auth_token", "", "kith: Twilio auth token."),
        KeySpec("twilio.from", "", "kith: Twilio sender number."),
        KeySpec("twilio.messaging_service_sid", "",
                "kith: Twilio messaging service; used instead of twilio.from when set."),
        KeySpec("base_url", "",
                "kith: API base URL of the SMS provider; empty: the provider's public "
                "API (https://smsc.openmarket.com or https://api.twilio.com)."),
    )),
    ("crypto", "Keys.", (
        KeySpec("ed25519.signingkey", "",
                "This server's signing key: ed25519 <version> <base64 seed>. Keep it "
                "secret and keep it: peers and homeservers know its public half. "
                "Empty: a new key is generated and saved here."),
    )),
    ("ldap", "kith: an LDAP directory (OpenLDAP, Active Directory) as a trusted source "
             "of 3PID to Matrix ID mappings; off until uri is set. See docs/ldap.md.", (
        KeySpec("uri", None, "ldap://host[:port] or ldaps://host[:port] of the directory.",
                "ldaps://ldap.example.org"),
        KeySpec("startls", None,
                "Upgrade an ldap:// connection with StartTLS, or fail. Default: false.",
                "true"),
        KeySpec("base", None, "Search base DN (required with uri).", "dc=example,dc=org"),
        KeySpec("preset", None,
                "openldap or active_directory: the defaults of email, msisdn, id_attr and "
                "changed_attr. Default: openldap.", "active_directory"),
        KeySpec("email", None,
                "Comma-separated attributes holding email addresses. Default: the "
                "preset's (mail).", "mail, mailPrimaryAddress"),
        KeySpec("msisdn", None,
                "Comma-separated attributes holding phone numbers. Default: the preset's "
                "(telephoneNumber, mobile).", "mobile"),
        KeySpec("msisdn_default_region", None,
                "ISO 3166 alpha-2 region of national phone numbers (07700 900123). "
                "Default: none; national numbers are skipped.", "GB"),
        KeySpec("id_attr", None,
                "Attribute naming the user: the Matrix ID is @<value>:<hs_name>. Default: "
                "the preset's (uid; sAMAccountName).", "uid"),
        KeySpec("hs_name", None,
                "Homeserver of those Matrix IDs. Default: none; id_attr holds full "
                "Matrix IDs.", "example.org"),
        KeySpec("bind_dn", None, "DN to bind as. Default: anonymous.",
                "cn=kith,dc=example,dc=org"),
        KeySpec("bind_pw", None, "Password of bind_dn (or bind_pw_file, or "
                "$KITH_LDAP_BIND_PW).", ""),
        KeySpec("bind_pw_file", None, "File holding the password of bind_dn.",
                "/etc/kith/ldap.pw"),
        KeySpec("filter", None, "LDAP filter ANDed onto every search. Default: none.",
                "(objectClass=person)"),
        KeySpec("ca_file", None, "PEM CA bundle for ldaps:// and StartTLS. Default: the "
                "system CAs.", "/etc/ssl/ldap-ca.pem"),
        KeySpec("verify_certs", None, "Check the server's certificate and name. "
                "Default: true.", "true"),
        KeySpec("lookup_timeout", None,
                "Seconds a live lookup waits for the directory before answering without "
                "it. Default: 3.", "3"),
        KeySpec("breaker_cooldown", None,
                "Seconds between probes of a directory that failed. Default: 10.", "10"),
        KeySpec("connect_timeout", None, "Seconds to connect. Default: 5.", "5"),
        KeySpec("search_timeout", None, "Seconds a search may take. Default: 10.", "10"),
        KeySpec("pool_size", None, "Pooled connections. Default: 4.", "4"),
        KeySpec("cache_ttl", None,
                "Seconds plain-text lookup answers are cached. Default: 60.", "60"),
        KeySpec("sync_interval", None,
                "Seconds between incremental syncs of the directory. Default: 60.", "60"),
        KeySpec("full_sync_interval", None,
                "Seconds between full syncs. Default: 3600.", "3600"),
        KeySpec("changed_attr", None,
                "Change-timestamp attribute of incremental syncs. Default: the preset's "
                "(modifyTimestamp; whenChanged).", "modifyTimestamp"),
        KeySpec("precedence", None,
                "Order in which sources answer a lookup (each address by the first that "
                "maps it); also in [proxy], the same. Default: ldap, local, upstream.",
                "local, ldap, upstream"),
    )),
    ("proxy", "kith: an upstream identity server asked for the addresses no local source "
              "maps; off until identity is set. See docs/ldap.md.", (
        KeySpec("identity", None, "Base URL of the upstream identity server.",
                "https://vector.im"),
        KeySpec("access_token", None, "The upstream's access token. Default: none.", ""),
        KeySpec("timeout", None, "Seconds one forwarded lookup may take. Default: 5.", "5"),
        KeySpec("cache_ttl", None, "Seconds answers are cached. Default: 300.", "300"),
        KeySpec("negative_cache_ttl", None,
                "Seconds an address the upstream does not know is cached. Default: 60.",
                "60"),
        KeySpec("mediums", None, "Comma-separated mediums that may be forwarded. "
                "Default: email, msisdn.", "email"),
        KeySpec("email_domains", None, "Comma-separated email domains that may be "
                "forwarded. Default: all.", "example.org"),
        KeySpec("breaker_failures", None,
                "Failures in a row after which the upstream is skipped. Default: 5.", "5"),
        KeySpec("breaker_cooldown", None,
                "Seconds between tries of a skipped upstream. Default: 30.", "30"),
        KeySpec("precedence", None, "As in [ldap]; both must agree.", "local, ldap, upstream"),
        KeySpec("adopt_pepper", None,
                "Announce the upstream's lookup pepper as kith's own and follow it, so that "
                "the sha256 lookups (all that Element and Synapse send) no local source "
                "answers are forwarded to the upstream as hashes: mediums and email_domains "
                "cannot apply to them. kith's own pepper rotation is then refused. "
                "Default: true.", "false"),
    )),
)

_HEADER = """\
sydent.conf: configuration of kith, a Matrix identity server (Sydent-compatible).

Written at first start with every setting at its default. Edit freely: kith
rewrites this file only to save a newly generated or converted signing key, and
keeps everything else, comments included.

INI syntax. Section names are case-sensitive, key names are not. Write a literal
% as %% (except in email.invite.subject, email.invite.subject_space, [ldap] and
[proxy]). A value continues on following lines that are indented. Lines starting
with # or ; are comments. A key set in [DEFAULT] applies to every section but
[ldap] and [proxy], and only where there is no built-in default (rate limits,
blocklists, prometheus_*, originators.*, smsrule.*).
"""


_PEERS = """\
[peer.<name>]: a replication peer, one section each (see README, "A replication
mesh"). <name> is the peer's server.name, which is also the common name of its
certificate. Peers taken over from Sydent's database need no section.

base_replication_url: where its replication listener is (https://). Default: the
  URL Sydent's database had for it, else https://<name>:4434/.
public_key: its ed25519 public key, as `ed25519:0 <unpadded base64>` (what its
  /_matrix/identity/v2/pubkey/ed25519:0 answers). Default: the key Sydent's database
  had for it.
"""


def builtin_defaults() -> dict[str, dict[str, str]]:
    """section → lower-cased key → built-in default (file syntax)."""
    return {
        section: {spec.key.lower(): spec.default for spec in specs if spec.default is not None}
        for section, _, specs in SECTIONS
    }


def known_keys() -> dict[str, frozenset[str]]:
    """section → every lower-cased key documented for it."""
    return {section: frozenset(s.key.lower() for s in specs) for section, _, specs in SECTIONS}


def _comment(text: str) -> list[str]:
    return ["# " + line if line else "#" for line in text.splitlines()]


def render_default_config(values: Mapping[str, Mapping[str, str]]) -> str:
    """The commented config file; `values` (section → lower-cased key → value in file
    syntax) override the built-in defaults, e.g. with values taken from the environment.
    """
    lines = _comment(_HEADER)
    for section, about, specs in SECTIONS:
        lines += ["", f"[{section}]", *_comment("\n".join(textwrap.wrap(about, 78)))]
        for spec in specs:
            lines.append("")
            doc = spec.doc
            if spec.default is not None:
                doc += f" Default: {spec.default or '(empty)'}."
            lines += ["# " + line for line in textwrap.wrap(doc, 78)]
            if spec.default is None:
                lines.append(f"# {spec.key} = {spec.example}".rstrip())
                continue
            value = values.get(section, {}).get(spec.key.lower(), spec.default)
            lines.append(f"{spec.key} = {value}".rstrip())
    lines += ["", *_comment(_PEERS), "#[peer.is2.example.org]", "#base_replication_url = https://is2.example.org:4434/",
              "#public_key = ed25519:0 <its key>"]
    return "\n".join(lines) + "\n"


_LINE = re.compile(r"[^\n]*\n|[^\n]+$")


def with_signing_key(text: str, key_text: str) -> str:
    """`text` with `[crypto] ed25519.signingkey = key_text`; every other line kept."""
    return with_option(text, "crypto", "ed25519.signingkey", key_text)


def with_option(text: str, section: str, key: str, value: str,
                comment: Sequence[str] = ()) -> str:
    """`text` with `[section] key = value`, preceded by `comment` lines (without their
    `# `); every other line kept.

    Replaces the key's line (and any continuation lines), else adds it under the
    section's header, else appends the section.  Lines are classified the way
    configparser reads them: comments and blank lines skipped, deeper-indented lines
    continue the previous value.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = _LINE.findall(text)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += newline
    current: str | None = None
    header_at: int | None = None
    key_at: int | None = None
    key_end = 0
    in_value = in_key = False
    indent_level = 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        indent = len(line) - len(line.lstrip())
        if in_value and indent > indent_level:
            key_end = i + 1 if in_key else key_end
            continue
        indent_level = indent
        header = ConfigParser.SECTCRE.match(stripped)
        option = None if header else ConfigParser.OPTCRE.match(stripped)
        if header:
            current = header.group("header")
            header_at = i if current == section else header_at
        in_value = option is not None
        in_key = bool(option and current == section
                      and option.group("option").rstrip().lower() == key.lower())
        if in_key:
            key_at, key_end = i, i + 1
    entry = [("# " + line if line else "#") + newline for line in comment]
    entry.append(f"{key} = {value}{newline}")
    if key_at is not None:
        indent_text = lines[key_at][: len(lines[key_at]) - len(lines[key_at].lstrip())]
        lines[key_at:key_end] = [indent_text + line for line in entry]
    elif header_at is not None:
        lines[header_at + 1:header_at + 1] = entry
    else:
        lines += [newline, f"[{section}]{newline}", *entry]
    return "".join(lines)


def write_atomically(path: str, text: str) -> None:
    """Replace (or create) `path` in one step, so no reader sees half a file.

    A new file gets mode 0600 (it holds the private signing key); an existing one
    keeps its mode and, where permitted, its owner.  Symlinks are followed.
    """
    target = os.path.realpath(path)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".kith-config-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            os.fchmod(f.fileno(), 0o600 if old is None else stat.S_IMODE(old.st_mode))
            if old is not None:
                try:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                except OSError:
                    pass  # not ours to give away; the file keeps our ownership
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    directory = os.open(os.path.dirname(target), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
