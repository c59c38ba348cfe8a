"""The Matrix-level rules every layer shares: mediums and 3PID addresses, Matrix user IDs
and server names, lookup hashes.

Each rule is written once, here, in the lowest room: the API decodes into these types,
the services apply the rules, the sources read directory values and the delivery checks
recipients by them.  Nothing here knows a layer; the only kith import is kith.errors,
for the checks that answer a caller with a 400.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import re
import secrets
import string
import time
from base64 import urlsafe_b64encode

import msgspec
import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

from kith.errors import M_INVALID_ADDRESS, M_INVALID_PARAM, MatrixError

EMAIL = "email"
MSISDN = "msisdn"
MEDIUMS = (EMAIL, MSISDN)


class Threepid(msgspec.Struct, frozen=True):
    """A third-party identifier: a medium and an address (normalised once it is stored
    or looked up).

    A frozen msgspec Struct rather than a dataclass: it decodes from the JSON object
    `{"medium", "address"}` of a request, and hashes and compares in C, as fast as a
    tuple, which the lookup paths probe dicts with (a dataclass measured four times
    slower there).
    """

    medium: str
    address: str


def now_ms() -> int:
    """Milliseconds since the epoch: the unit of every timestamp Matrix and kith store."""
    return int(time.time() * 1000)


# ---------------------------------------------------------------- server names, user IDs

_DNS_NAME = re.compile(r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_server_name(server_name: str) -> tuple[str, int | None]:
    """Split `host[:port]` into (host, port); IPv6 hosts come back unbracketed.

    Raises ValueError when the name does not follow the spec's grammar.
    """
    host, sep, port_text = server_name, "", ""
    if server_name.startswith("["):
        close = server_name.find("]")
        if close < 0:
            raise ValueError(f"unterminated IPv6 literal in {server_name!r}")
        host, rest = server_name[1:close], server_name[close + 1 :]
        if rest:
            sep, port_text = rest[:1], rest[1:]
            if sep != ":":
                raise ValueError(f"junk after IPv6 literal in {server_name!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 literal in {server_name!r}") from None
        if "%" in host:
            raise ValueError(f"scoped IPv6 literal in {server_name!r}")
    else:
        host, sep, port_text = server_name.rpartition(":")
        if not sep:
            host = server_name
        if not host or len(host) > 255 or not _DNS_NAME.fullmatch(host):
            raise ValueError(f"invalid hostname in {server_name!r}")
    if not sep:
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port in {server_name!r}")
    return host, int(port_text)


def is_valid_server_name(server_name: str) -> bool:
    try:
        parse_server_name(server_name)
    except ValueError:
        return False
    return True


# Historical user IDs allow any printable ASCII but ':' in the localpart, which must not
# be empty.  Total length at most 255.
_LOCALPART = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def is_valid_mxid(mxid: str) -> bool:
    if len(mxid) > 255 or not mxid.startswith("@") or ":" not in mxid:
        return False
    localpart, server_name = mxid[1:].split(":", 1)
    return bool(_LOCALPART.fullmatch(localpart)) and is_valid_server_name(server_name)


def mxid_server_name(mxid: str) -> str:
    return mxid.split(":", 1)[1]


def check_mxid(mxid: str, name: str = "Matrix user ID") -> None:
    """400 M_INVALID_PARAM "Invalid <name>" unless `mxid` is a valid user ID."""
    if not is_valid_mxid(mxid):
        raise MatrixError(400, M_INVALID_PARAM, f"Invalid {name}")


# ------------------------------------------------------------------------- addresses

_MSISDN = re.compile(r"[1-9][0-9]{1,14}")
# Characters that would let a recipient change a mail header or the SMTP envelope.
_NOT_IN_PLAIN_EMAIL = frozenset("\r\n\0<>,;\"")


def normalise_address(medium: str, address: str) -> str | None:
    """The stored form of an address (MSC2265 casefolded email, E.164 digits), or None
    if it cannot be one (or `medium` is none of MEDIUMS)."""
    if medium == EMAIL:
        address = address.strip()
        if "@" not in address or len(address) > 500 or any(c.isspace() for c in address):
            return None
        return address.casefold()
    if medium == MSISDN:
        address = address.strip().lstrip("+")
        return address if is_msisdn(address) else None
    return None


def check_threepid(medium: str, address: str) -> str:
    """The normalised address, or 400 M_INVALID_PARAM naming what is wrong."""
    if medium not in MEDIUMS:
        raise MatrixError(400, M_INVALID_PARAM, f"Unsupported medium: {medium!r}")
    normalised = normalise_address(medium, address)
    if normalised is None:
        raise MatrixError(400, M_INVALID_PARAM, f"Invalid {medium} address")
    return normalised


def is_plain_email(address: str) -> bool:
    """Whether `address` is a bare `local@domain`, safe as it is in a `To:` header and
    an SMTP envelope (no display name, no second address, no header break)."""
    return ("@" in address and _NOT_IN_PLAIN_EMAIL.isdisjoint(address)
            and email.utils.parseaddr(address)[1] == address)


def normalise_plain_email(address: str) -> str | None:
    """The stored form of an email address kith may send mail to, or None."""
    normalised = normalise_address(EMAIL, address)
    return normalised if normalised is not None and is_plain_email(normalised) else None


def is_msisdn(value: str) -> bool:
    """Whether `value` is an msisdn as stored: E.164 digits, without '+'."""
    return _MSISDN.fullmatch(value) is not None


def msisdn_from_number(number: phonenumbers.PhoneNumber) -> str | None:
    """The stored form of a parsed phone number, or None if it has none."""
    return normalise_address(MSISDN, phonenumbers.format_number(number,
                                                                PhoneNumberFormat.E164))


def number_from_msisdn(msisdn: str) -> phonenumbers.PhoneNumber | None:
    """The parsed phone number of a stored msisdn (for its country, its national form),
    or None if it does not parse."""
    try:
        return phonenumbers.parse("+" + msisdn, None)
    except NumberParseException:
        return None


def parse_msisdn(country: str, phone_number: str) -> tuple[str, str]:
    """A phone number as a client gives it (ISO 3166 country, number as written) →
    (msisdn, international format), or 400 M_INVALID_ADDRESS.

    A number of a possible length for its country is accepted even outside the ranges
    phonenumbers knows to be in use (the spec's own example is in one; newly opened
    ranges reach its metadata late): Sydent accepts any number it can parse."""
    try:
        number = phonenumbers.parse(phone_number, country.upper() or None)
    except NumberParseException as exc:
        raise MatrixError(400, M_INVALID_ADDRESS, "Unable to parse phone number") from exc
    possible = (phonenumbers.is_possible_number_with_reason(number)
                == phonenumbers.ValidationResult.IS_POSSIBLE)  # not local-only, nor too long
    msisdn = msisdn_from_number(number) if possible else None
    if msisdn is None:
        raise MatrixError(400, M_INVALID_ADDRESS, "Not a valid phone number")
    return msisdn, phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)


# ---------------------------------------------------------------------------- lookups


def lookup_hash(medium: str, address: str, pepper: str) -> str:
    """URL-safe unpadded base64 of SHA-256 over "<address> <medium> <pepper>"."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_pepper(length: int = 16) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def plain_query(medium: str, address: str) -> str:
    """The address as an unhashed (`none`) lookup sends it: "<address> <medium>"."""
    return f"{address} {medium}"


def parse_plain_query(query: str) -> Threepid | None:
    """"<address> <medium>" → the 3PID with its address normalised, or None."""
    address, _, medium = query.rpartition(" ")
    normalised = normalise_address(medium, address)
    return None if normalised is None else Threepid(medium, normalised)
