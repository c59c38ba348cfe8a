"""Directory phone numbers: the one reading rule, and the forms a live search asks for."""

from __future__ import annotations

import pytest

from kith.sources.ldap_numbers import directory_forms, normalise_msisdn


@pytest.mark.parametrize(("value", "region", "msisdn"), [
    # 1. "+...": international, as written; no region needed.
    ("+44 7700 900123", "", "447700900123"),
    ("+44 (0)20 7946 0000", "", "442079460000"),
    ("+1 (415) 555-0100", "GB", "14155550100"),
    # 3. digits without "+": Matrix's own form is international first.
    ("447700900123", "", "447700900123"),
    ("447700900123", "GB", "447700900123"),
    ("33123456789", "GB", "33123456789"),
    ("14155550100", "US", "14155550100"),
    ("2079460000", "GB", "2079460000"),  # ambiguous: international first (+20)
    # 2. a first digit 0: national, in the default region only.
    ("07700 900123", "GB", "447700900123"),
    ("(0)7700-900123", "GB", "447700900123"),
    ("07700-900123", "GB", "447700900123"),
    ("0044 7700 900123", "GB", "447700900123"),
    ("020 7946 0999", "GB", "442079460999"),
    ("07700 900123", "", None),
    ("020 7946 0999", "", None),
    # 3. not a possible international number: national in the default region.
    ("(415) 555-0100", "US", "14155550100"),
    ("8 916 123 45 67", "RU", "79161234567"),
    ("(415) 555-0100", "", None),
    # Not numbers, or only dialable locally (no area code).
    ("1234", "GB", None),
    ("555 0100", "US", None),
    ("", "GB", None),
    ("ext. ", "GB", None),
    ("*", "GB", None),
    ("x)(|(mail=*", "GB", None),
])
def test_one_rule_reads_directory_values(value: str, region: str, msisdn: str | None) -> None:
    assert normalise_msisdn(value, region) == msisdn


@pytest.mark.parametrize(("msisdn", "region"), [
    ("447700900123", ""), ("447700900123", "GB"), ("447700900123", "US"),
    ("14155550100", "US"), ("33123456789", "FR"), ("79161234567", "RU"),
])
def test_every_searched_form_reads_back_as_the_number(msisdn: str, region: str) -> None:
    forms = directory_forms(msisdn, region)
    assert forms[:2] == [msisdn, "+" + msisdn]
    assert all(normalise_msisdn(form, region) == msisdn for form in forms), forms


def test_national_forms_only_for_the_default_regions_numbers() -> None:
    assert set(directory_forms("447700900123", "GB")) == {
        "447700900123", "+447700900123", "+44(0)7700900123", "07700900123", "(0)7700900123"}
    assert "07700900123" not in directory_forms("447700900123", "")
    assert "07700900123" not in directory_forms("447700900123", "FR")
    assert "4155550100" in directory_forms("14155550100", "US")
    assert directory_forms("123", "GB") == ["123", "+123"]
