"""Why a call to a homeserver failed, in terms the service layer can map.

These are plain exceptions, not MatrixError: only services decide which
Matrix error a caller sees.  Messages never contain access tokens.
"""

from __future__ import annotations


class FederationError(Exception):
    """Base class: a call to a homeserver did not produce a usable answer."""


class InvalidServerName(FederationError, ValueError):
    """The server name does not follow the spec's grammar."""


class HomeserverUnreachable(FederationError):
    """Transport-level failure: DNS, refused address, TLS, timeout, 3xx, 5xx, bad body."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class OpenIdTokenRejected(FederationError):
    """The homeserver did not vouch for the OpenID token (401/403, or no `sub`)."""
