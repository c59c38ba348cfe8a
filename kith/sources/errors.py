"""Errors of the identity sources, importable without the sources themselves."""

from __future__ import annotations


class LdapError(Exception):
    """The directory could not be reached or refused a search (message is one line)."""
