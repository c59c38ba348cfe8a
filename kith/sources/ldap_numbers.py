"""Phone numbers as directories write them, and the E.164 digits kith stores.

A directory value is read by one rule (docs/ldap.md, "Phone numbers"):
1. `+...` is an international number as written (`+44 (0)20 7946 0000`).
2. A value whose first digit is 0 (`07700 900123`, `(0)7700-900123`, `0044 ...`) is
   national, since no country code starts with 0: it is read in the default region
   (`[ldap] msisdn_default_region`), and skipped without one.
3. Other digits (`447700900123`, Matrix's own form) are international if that makes a
   possible number, else national in the default region (`(415) 555-0100` with US).

A live search can only match values as stored (OpenLDAP ignores spaces and hyphens in
telephone numbers, nothing else), so it asks for each form of a number rule 1-3 reads.
"""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

from kith.threepid import MSISDN, msisdn_from_number, normalise_address, number_from_msisdn

_NOT_DIGITS = re.compile(r"\D")


def normalise_msisdn(value: str, default_region: str = "") -> str | None:
    """E.164 digits of a directory phone number, or None if it is not one."""
    value = value.strip()
    if value.startswith("+"):
        if value[1:].isdigit():  # already E.164: skip the parser
            return normalise_address(MSISDN, value)
        return _e164(value, None)
    first_digit = next((c for c in value if c.isdigit()), None)
    if first_digit is None:
        return None
    if first_digit != "0":
        international = _e164("+" + value, None)
        if international is not None:
            return international
    return _e164(value, default_region) if default_region else None


def directory_forms(msisdn: str, default_region: str = "") -> list[str]:
    """The values a directory may hold for the E.164 digits `msisdn`, each one that
    `normalise_msisdn` reads back as `msisdn` (spaces and hyphens left out)."""
    forms = [msisdn, "+" + msisdn]
    number = number_from_msisdn(msisdn)
    if number is None or number.country_code is None:
        return forms
    national = _NOT_DIGITS.sub("", phonenumbers.format_number(number,
                                                               PhoneNumberFormat.NATIONAL))
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(
        phonenumbers.region_code_for_country_code(number.country_code))
    trunk = metadata.national_prefix if metadata is not None else None
    without_trunk = national[len(trunk):] if trunk and national.startswith(trunk) else None
    if without_trunk is not None:
        forms.append(f"+{number.country_code}({trunk}){without_trunk}")
    if default_region and phonenumbers.country_code_for_region(
            default_region) == number.country_code:
        forms.append(national)
        if without_trunk is not None:
            forms.append(f"({trunk}){without_trunk}")
    return list(dict.fromkeys(forms))


def _e164(value: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(value, region)
    except NumberParseException:
        return None
    # A number possible only locally (no area code) has no E.164 form.
    if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
        return None
    return msisdn_from_number(number)
