"""X-Matrix request authentication (server-server API v1.19, "Request Authentication").

Homeservers authorise some identity-server calls (`/3pid/unbind`) by signing
the request with their server key.  The signed object is built here from
`str` values and decoded JSON only: Sydent 2.6.1 put bytes into it and
crashed on every such request.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey

from kith.federation.keys import KeyFetchError, ServerKeyFetcher
from kith.threepid import is_valid_server_name

SCHEME = "x-matrix"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Unquoted values: RFC 9110 tokens, plus what older senders put there unquoted
# (colons in key ids and server names, base64's '/', '+' and '=').
_BARE_VALUE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/=\[\]@]+")
_KEY_ID = re.compile(r"ed25519:[!-~]+")


class InvalidXMatrixHeader(ValueError):
    """The Authorization header is not a well-formed X-Matrix header."""


class XMatrixVerificationError(Exception):
    """The request's X-Matrix signature does not prove it comes from its origin."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class XMatrixAuth:
    """The parameters of an X-Matrix Authorization header, unescaped."""

    origin: str
    destination: str | None
    key: str
    sig: str


def parse_x_matrix(header: str) -> XMatrixAuth:
    """Parse `X-Matrix origin=...,destination=...,key=...,sig=...` (RFC 9110 auth-params)."""
    scheme, _, rest = header.strip(" \t").partition(" ")
    if scheme.lower() != SCHEME:
        raise InvalidXMatrixHeader("authorization scheme is not X-Matrix")
    params = _parse_params(rest)
    missing = [name for name in ("origin", "key", "sig") if not params.get(name)]
    if missing:
        raise InvalidXMatrixHeader(f"X-Matrix header lacks {', '.join(missing)}")
    if not _KEY_ID.fullmatch(params["key"]):
        raise InvalidXMatrixHeader("X-Matrix key is not an ed25519 key id")
    return XMatrixAuth(params["origin"], params.get("destination"), params["key"], params["sig"])


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while True:
        pos = _skip_list_separators(text, pos)
        if pos == len(text):
            return params
        name_match = _TOKEN.match(text, pos)
        if name_match is None:
            raise InvalidXMatrixHeader(f"expected a parameter name at offset {pos}")
        name = name_match.group().lower()
        pos = _skip_ows(text, name_match.end())
        if text[pos : pos + 1] != "=":
            raise InvalidXMatrixHeader(f"parameter {name!r} has no value")
        pos = _skip_ows(text, pos + 1)
        value, pos = _parse_value(text, pos, name)
        if name in params:
            raise InvalidXMatrixHeader(f"parameter {name!r} is repeated")
        params[name] = value
        pos = _skip_ows(text, pos)
        if pos < len(text) and text[pos] != ",":
            raise InvalidXMatrixHeader(f"expected ',' after parameter {name!r}")


def _skip_ows(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _skip_list_separators(text: str, pos: int) -> int:
    """Skip whitespace and empty list elements (RFC 9110 §5.6.1.2)."""
    while pos < len(text) and text[pos] in " \t,":
        pos += 1
    return pos


def _parse_value(text: str, pos: int, name: str) -> tuple[str, int]:
    if text[pos : pos + 1] != '"':
        bare = _BARE_VALUE.match(text, pos)
        if bare is None:
            raise InvalidXMatrixHeader(f"parameter {name!r} has an invalid value")
        return bare.group(), bare.end()
    chars: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == '"':
            return "".join(chars), pos + 1
        if char == "\\":
            pos += 1
            if pos == len(text):
                break
            char = text[pos]
        if (char < " " and char != "\t") or char == "\x7f":
            raise InvalidXMatrixHeader(f"parameter {name!r} contains a control character")
        chars.append(char)
        pos += 1
    raise InvalidXMatrixHeader(f"unterminated quoted value for parameter {name!r}")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def signed_request_json(
    *, method: str, uri: str, origin: str, destination: str | None, content: Any,
    destination_is: str | None = None,
) -> dict[str, Any]:
    """The object an X-Matrix signature covers, before its `signatures`.

    `destination_is` is what a homeserver signs, instead of a `destination`, when it
    addresses an identity server (Synapse's unbind): the `id_server` name it used.
    """
    for field, value in (("method", method), ("uri", uri), ("origin", origin)):
        if not isinstance(value, str):
            raise TypeError(f"X-Matrix {field} must be str, not {type(value).__name__}")
    request: dict[str, Any] = {"method": method, "uri": uri, "origin": origin}
    if destination is not None:
        request["destination"] = destination
    if destination_is is not None:
        request["destination_is"] = destination_is
    if content is not None:
        request["content"] = content
    return request


async def verify_x_matrix_request(
    auth: XMatrixAuth,
    *,
    method: str,
    uri: str,
    content: Any,
    expected_destinations: Collection[str],
    fetcher: ServerKeyFetcher,
) -> str:
    """The origin server that signed this request; XMatrixVerificationError otherwise.

    `uri` is the path and query exactly as sent; `content` the decoded JSON
    body, or None for a request without one.
    """
    if auth.destination is not None and auth.destination not in expected_destinations:
        raise XMatrixVerificationError(f"request is addressed to {auth.destination!r}, not us")
    if not is_valid_server_name(auth.origin):
        raise XMatrixVerificationError(f"origin {auth.origin!r} is not a valid server name")
    try:
        verify_key = await fetcher.get_verify_key(auth.origin, auth.key)
    except KeyFetchError as exc:
        raise XMatrixVerificationError(f"no key to check the signature: {exc.reason}") from exc
    for destination, destination_is in _signed_destinations(auth, expected_destinations):
        request = signed_request_json(
            method=method, uri=uri, origin=auth.origin, destination=destination,
            content=content, destination_is=destination_is,
        )
        request["signatures"] = {auth.origin: {auth.key: auth.sig}}
        try:
            verify_signed_json(request, auth.origin, verify_key)
        except SignatureVerifyException:
            continue
        except (TypeError, ValueError, RecursionError):
            raise XMatrixVerificationError("request content cannot be canonicalised") from None
        return auth.origin
    raise XMatrixVerificationError(f"bad X-Matrix signature from {auth.origin}")


def _signed_destinations(
    auth: XMatrixAuth, expected_destinations: Collection[str],
) -> list[tuple[str | None, str | None]]:
    """The (destination, destination_is) pairs the signed JSON may carry.

    A homeserver addressing a server signs `destination`; addressing an identity server,
    Synapse signs `destination_is` instead and still names it in the header's
    `destination=`.  Without that header parameter, the signed JSON may name any of our
    public names in `destination_is` or, from older senders, no destination at all.
    """
    if auth.destination is not None:
        return [(auth.destination, None), (None, auth.destination)]
    return [*((None, name) for name in expected_destinations), (None, None)]


def sign_x_matrix_header(
    signing_key: SigningKey,
    origin: str,
    destination: str | None,
    method: str,
    uri: str,
    content: Any,
    destination_is: str | None = None,
) -> str:
    """An `Authorization` header value signing this request as `origin`.

    `destination` None makes an old-style header without it; with `destination_is`, the
    header a homeserver sends to an identity server.
    """
    request = signed_request_json(
        method=method, uri=uri, origin=origin, destination=destination, content=content,
        destination_is=destination_is,
    )
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = sign_json(request, origin, signing_key)["signatures"][origin][key_id]
    params = [("origin", origin)]
    if destination is not None:
        params.append(("destination", destination))
    params += [("key", key_id), ("sig", sig)]
    return "X-Matrix " + ",".join(f"{name}={_quote(value)}" for name, value in params)
