"""Talking to homeservers: discovery, OpenID userinfo, outbound address policy."""

from kith.federation.client import FederationClient
from kith.federation.discovery import ResolvedServer, resolve_server_name
from kith.federation.errors import (
    FederationError,
    HomeserverUnreachable,
    InvalidServerName,
    OpenIdTokenRejected,
)
from kith.federation.policy import OutboundAddressPolicy

__all__ = [
    "FederationClient",
    "FederationError",
    "HomeserverUnreachable",
    "InvalidServerName",
    "OpenIdTokenRejected",
    "OutboundAddressPolicy",
    "ResolvedServer",
    "resolve_server_name",
]
