"""The domain: everything kith does, with no knowledge of HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kith.delivery.templates import Templates
from kith.services.accounts import AccountService
from kith.services.bindings import BindingService
from kith.services.erasure import ErasureService
from kith.services.homeserver_auth import HomeserverAuthenticator
from kith.services.index import AssociationIndex
from kith.services.invites import InviteService
from kith.services.keys import ServerKeys
from kith.services.limits import SendLimits
from kith.services.lookup import LookupService
from kith.services.onbind import OnbindService
from kith.services.terms import TermsSource
from kith.services.validation import ValidationService

if TYPE_CHECKING:
    from kith.services.ldap_sync import LdapSync


@dataclass
class Services:
    """What the API layer calls; built once per process by kith.server."""

    keys: ServerKeys
    terms: TermsSource
    accounts: AccountService
    index: AssociationIndex
    lookup: LookupService
    bindings: BindingService
    homeserver_auth: HomeserverAuthenticator
    validation: ValidationService
    templates: Templates
    invites: InviteService
    limits: SendLimits
    ldap_sync: LdapSync | None = None
    onbind: OnbindService | None = None
    erasure: ErasureService | None = None
