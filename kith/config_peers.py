"""[peer.<name>]: the replication peers, in the configuration file.

Sydent kept its peers in database rows and read only `base_replication_url` from
`[peer.<name>]`; kith reads the whole peer from the section: the URL it pushes to and
the public key its pushes are checked with.  Peers that `import-sydent` took from
Sydent's database keep working; a section for one of them overrides what the database
says (`kith.replication.peers` puts both together).
"""

from __future__ import annotations

import base64
import binascii
import re
from configparser import ConfigParser

from kith.config_model import ConfigError, PeerConfig
from kith.config_sections import Section
from kith.threepid import is_valid_server_name

PEER_PREFIX = "peer."
PEER_KEYS = frozenset({"base_replication_url", "public_key"})
ED25519 = "ed25519"
_KEY_ID = re.compile(r"ed25519:(\w+)")


def peer_key_b64(key: str) -> str | None:
    """A peer's ed25519 public key as unpadded standard base64, from base64 (standard or
    URL-safe, padded or not) or hex, which Sydent accepts too (tried first, as Sydent
    does).  None if it is neither, or not 32 bytes."""
    key = key.strip()
    raw: bytes | None = None
    try:
        int(key, 16)
        raw = binascii.unhexlify(key)
    except ValueError:  # binascii.Error (odd length) is one too
        try:
            padded = key + "=" * (-len(key) % 4)
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except ValueError:
            return None
    if raw is None or len(raw) != 32:
        return None
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def parse_public_key(value: str) -> tuple[str, str]:
    """`ed25519:<version> <key>` (or the key alone, version 0) → (version, unpadded
    base64 key); ValueError saying what is wrong."""
    parts = value.split()
    version = "0"
    if len(parts) == 2:
        key_id = _KEY_ID.fullmatch(parts[0])
        if key_id is None:
            raise ValueError(f"{parts[0]!r} is not a key id like ed25519:0")
        version = key_id.group(1)
    elif len(parts) != 1:
        raise ValueError("expected 'ed25519:<version> <unpadded base64 key>'")
    key = peer_key_b64(parts[-1])
    if key is None:
        raise ValueError("the key is not 32 bytes of base64 (or hex)")
    return version, key


def peers(parser: ConfigParser, server_name: str) -> tuple[PeerConfig, ...]:
    """Every [peer.<name>] section of an as-written parser, checked."""
    found = []
    for name in parser.sections():
        if name.startswith(PEER_PREFIX):
            found.append(_peer(Section(parser, name, blank_is_default=True),
                               name.removeprefix(PEER_PREFIX), server_name))
    return tuple(found)


def _peer(s: Section, name: str, server_name: str) -> PeerConfig:
    if not is_valid_server_name(name):
        raise ConfigError(f"[{s.name}]: {name!r} is not a server name (the peer's "
                          "server.name and the common name of its certificate)")
    if name == server_name:
        raise ConfigError(f"[{s.name}]: this is this server's own name (server.name)")
    url = s.url("base_replication_url", ("https",), "an https:// URL")
    version, key = "0", ""
    if s.text("public_key"):
        try:
            version, key = parse_public_key(s.text("public_key"))
        except ValueError as exc:
            raise s.error("public_key", str(exc)) from None
    return PeerConfig(name=name, base_replication_url=url, public_key=key,
                      key_version=version)
