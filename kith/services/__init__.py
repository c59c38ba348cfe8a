"""The domain: everything kith does, with no knowledge of HTTP."""

from __future__ import annotations

from dataclasses import dataclass

from kith.delivery.templates import Templates
from kith.services.accounts import AccountService
from kith.services.bindings import BindingService
from kith.services.keys import ServerKeys
from kith.services.lookup import AssociationIndex, LookupService
from kith.services.terms import TermsSource
from kith.services.validation import ValidationService


@dataclass
class Services:
    """What the API layer calls; built once per process by kith.server."""

    keys: ServerKeys
    terms: TermsSource
    accounts: AccountService
    index: AssociationIndex
    lookup: LookupService
    bindings: BindingService
    validation: ValidationService | None = None
    templates: Templates | None = None
