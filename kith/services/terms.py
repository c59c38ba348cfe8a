"""Terms of service from `terms.path` (Sydent's YAML format), and who has accepted them."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from kith.config import ConfigError

log = logging.getLogger(__name__)


class TermsFileError(Exception):
    pass


@dataclass(frozen=True)
class Terms:
    """master_version None means the server has no terms: everyone has consented."""

    master_version: str | None = None
    # doc name → {"version": v, "<lang>": {"name", "url"}, ...}
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def urls_of(self, doc: str) -> set[str]:
        return {v["url"] for k, v in self.policies[doc].items() if k != "version"}

    def all_urls(self) -> set[str]:
        return {u for doc in self.policies for u in self.urls_of(doc)}

    def consent_version_for(self, accepted: set[str]) -> str | None:
        """master_version if every policy has one of its URLs accepted, else None."""
        if all(self.urls_of(doc) & accepted for doc in self.policies):
            return self.master_version
        return None


def parse_terms(text: str) -> Terms:
    data = yaml.safe_load(text)
    if data is None:
        return Terms()
    if not isinstance(data, dict):
        raise TermsFileError("the file is not a mapping")
    master = data.get("master_version")
    docs = data.get("docs") or {}
    if master is None or not isinstance(docs, dict):
        raise TermsFileError("needs `master_version` and a `docs` mapping")
    policies: dict[str, dict[str, Any]] = {}
    for name, doc in docs.items():
        if not isinstance(doc, dict) or "version" not in doc or not isinstance(
                doc.get("langs"), dict):
            raise TermsFileError(f"document {name!r} needs `version` and `langs`")
        policy: dict[str, Any] = {"version": str(doc["version"])}
        for lang, entry in doc["langs"].items():
            if not isinstance(entry, dict) or not {"name", "url"} <= entry.keys():
                raise TermsFileError(f"document {name!r} language {lang!r} needs name and url")
            policy[str(lang)] = {"name": str(entry["name"]), "url": str(entry["url"])}
        policies[str(name)] = policy
    return Terms(str(master), policies)


def load_terms_file(path: str) -> Terms:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_terms(f.read())
    except (OSError, yaml.YAMLError) as exc:
        raise TermsFileError(str(exc)) from exc


class TermsSource:
    """The current terms; the file is re-read when it changes (checked once a second)."""

    @classmethod
    def from_config(cls, path: str) -> TermsSource:
        """The terms of `[general] terms.path`; a one-line ConfigError if unusable."""
        try:
            return cls(path)
        except TermsFileError as exc:
            raise ConfigError(f"[general] terms.path: {exc}") from exc

    def __init__(self, path: str) -> None:
        self._path = path
        self._terms = load_terms_file(path) if path else Terms()
        self._mtime = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> float | None:
        try:
            return os.stat(self._path).st_mtime if self._path else None
        except OSError:
            return None

    def current(self) -> Terms:
        if self._path and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self._terms = load_terms_file(self._path)
                    log.info("terms reloaded from %s", self._path)
                except TermsFileError as exc:
                    log.error("terms file %s unreadable, keeping the old terms: %s",
                              self._path, exc)
        return self._terms
