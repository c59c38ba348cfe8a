"""Errors of the identity sources, importable without the sources themselves."""

from __future__ import annotations


class LdapError(Exception):
    """The directory could not be reached or refused a search (message is one line)."""


class LdapUnavailable(LdapError):
    """The directory failed and has not answered a probe since: it was not asked."""
