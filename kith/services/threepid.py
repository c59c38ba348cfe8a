"""3PID rules in one place: mediums, address normalisation, Matrix user IDs, hashing."""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from base64 import urlsafe_b64encode

from kith.federation.discovery import is_valid_server_name

MEDIUMS = ("email", "msisdn")


def now_ms() -> int:
    """Milliseconds since the epoch: the unit of every timestamp Matrix and kith store."""
    return int(time.time() * 1000)

# Historical user IDs allow any printable ASCII but ':'; the localpart may be empty
# of nothing else.  Total length at most 255.
_LOCALPART = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_MSISDN = re.compile(r"^[1-9][0-9]{1,14}$")


def is_valid_mxid(mxid: str) -> bool:
    if len(mxid) > 255 or not mxid.startswith("@") or ":" not in mxid:
        return False
    localpart, server_name = mxid[1:].split(":", 1)
    return bool(_LOCALPART.match(localpart)) and is_valid_server_name(server_name)


def mxid_server_name(mxid: str) -> str:
    return mxid.split(":", 1)[1]


def normalise_address(medium: str, address: str) -> str | None:
    """The stored form of an address (MSC2265 casefolded email, E.164 digits), or None
    if it cannot be one."""
    if medium == "email":
        address = address.strip()
        if "@" not in address or len(address) > 500 or any(c.isspace() for c in address):
            return None
        return address.casefold()
    if medium == "msisdn":
        address = address.strip().lstrip("+")
        return address if _MSISDN.match(address) else None
    return None


def lookup_hash(medium: str, address: str, pepper: str) -> str:
    """URL-safe unpadded base64 of SHA-256 over "<address> <medium> <pepper>"."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_pepper(length: int = 16) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))
