"""The Matrix-level rules: mediums and addresses, user IDs, server names, lookup hashes."""

from __future__ import annotations

import time

import msgspec
import pytest

from kith.errors import M_INVALID_ADDRESS, M_INVALID_PARAM, MatrixError
from kith.threepid import (
    Threepid,
    check_mxid,
    check_threepid,
    is_msisdn,
    is_plain_email,
    is_valid_mxid,
    is_valid_server_name,
    lookup_hash,
    msisdn_from_number,
    mxid_server_name,
    new_pepper,
    normalise_address,
    normalise_plain_email,
    now_ms,
    number_from_msisdn,
    parse_msisdn,
    parse_plain_query,
    parse_server_name,
    plain_query,
)

# ------------------------------------------------------------------------ server names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.org", ("example.org", None)),
        ("example.org:8448", ("example.org", 8448)),
        ("matrix-1.Example.ORG:1", ("matrix-1.Example.ORG", 1)),
        ("localhost", ("localhost", None)),
        ("1.2.3.4", ("1.2.3.4", None)),
        ("127.0.0.1:8448", ("127.0.0.1", 8448)),
        ("[::1]", ("::1", None)),
        ("[::1]:8448", ("::1", 8448)),
        ("[2001:db8::a:1]:65535", ("2001:db8::a:1", 65535)),
        ("[::ffff:1.2.3.4]:443", ("::ffff:1.2.3.4", 443)),
    ],
)
def test_parse_server_name(name: str, expected: tuple[str, int | None]) -> None:
    assert parse_server_name(name) == expected
    assert is_valid_server_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ":8448",
        "example.org:",
        "example.org:0",
        "example.org:65536",
        "example.org:123456",
        "example.org:+80",
        "example.org:8a",
        "example.org:８０",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[not-ip]:80",
        "[1.2.3.4]",
        "[fe80::1%eth0]:1",
        "::1",
        "::1:8448",
        "exa mple.org",
        "example..org",
        "example.org.",
        ".example.org",
        "a_b.org",
        "example.org/path",
        "user@example.org",
        "ex\u00e4mple.org",
        "a" * 256,
        "example.org:80:80",
    ],
)
def test_invalid_server_names(name: str) -> None:
    assert not is_valid_server_name(name)
    with pytest.raises(ValueError):
        parse_server_name(name)


# --------------------------------------------------------------------------- user IDs


@pytest.mark.parametrize("mxid", [
    "@alice:example.org", "@alice:example.org:8448", "@bob:[::1]:8448", "@a:localhost",
    "@Alice.Old_Style=\x21~:example.org",  # historical IDs: any printable ASCII but ':'
    "@" + "a" * 242 + ":example.org",  # 255 characters
])
def test_valid_user_ids(mxid: str) -> None:
    assert is_valid_mxid(mxid)
    check_mxid(mxid)


@pytest.mark.parametrize("mxid", [
    "", "@", "alice:example.org", "@alice", "@alice:", "@:example.org",
    "@al ice:example.org", "@alice\n:example.org", "@alice:example.org\n",
    "@ali\u00e9:example.org", "@alice:exa mple.org", "@alice:example.org:0",
    "@" + "a" * 243 + ":example.org",  # 256 characters
])
def test_invalid_user_ids(mxid: str) -> None:
    assert not is_valid_mxid(mxid)
    with pytest.raises(MatrixError) as raised:
        check_mxid(mxid, "sender")
    assert (raised.value.status, raised.value.errcode) == (400, M_INVALID_PARAM)
    assert raised.value.message == "Invalid sender"


def test_the_server_name_of_a_user_id_keeps_its_port() -> None:
    assert mxid_server_name("@alice:example.org:8448") == "example.org:8448"
    assert mxid_server_name("@alice:[::1]:8448") == "[::1]:8448"


# -------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(("medium", "address", "normalised"), [
    ("email", "alice@example.org", "alice@example.org"),
    ("email", "  Alice@Example.ORG\n", "alice@example.org"),
    ("email", "STRASSE@EXAMPLE.ORG", "strasse@example.org"),
    ("email", "straße@example.org", "strasse@example.org"),  # casefolded, not lowercased
    ("email", "Alice <alice@example.org>", None),
    ("email", "alice.example.org", None),
    ("email", "al ice@example.org", None),
    ("email", "alice@exa\tmple.org", None),
    ("email", "a" * 490 + "@example.org", None),  # over 500 characters
    ("msisdn", "447700900123", "447700900123"),
    ("msisdn", " +447700900123 ", "447700900123"),
    ("msisdn", "+44 7700 900123", None),
    ("msisdn", "07700900123", None),
    ("msisdn", "1", None),
    ("msisdn", "1234567890123456", None),  # 16 digits
    ("msisdn", "４４７７００９００１２３", None),  # not ASCII digits
    ("phone", "447700900123", None),
    ("", "alice@example.org", None),
])
def test_normalise_address(medium: str, address: str, normalised: str | None) -> None:
    assert normalise_address(medium, address) == normalised


def test_check_threepid_names_what_is_wrong() -> None:
    assert check_threepid("email", " Alice@Example.org") == "alice@example.org"
    with pytest.raises(MatrixError) as raised:
        check_threepid("phone", "447700900123")
    assert (raised.value.status, raised.value.errcode) == (400, M_INVALID_PARAM)
    assert raised.value.message == "Unsupported medium: 'phone'"
    with pytest.raises(MatrixError) as raised:
        check_threepid("msisdn", "+44 7700 900123")
    assert raised.value.message == "Invalid msisdn address"


@pytest.mark.parametrize("address", ["alice@example.org", "a.b+c@sub.example.org"])
def test_plain_email_addresses(address: str) -> None:
    assert is_plain_email(address)
    assert normalise_plain_email(address.upper()) == address


@pytest.mark.parametrize("address", [
    "alice@example.org\r\nBcc: eve@example.org", "Alice <alice@example.org>",
    "<alice@example.org>", "not-an-address", "a@b.org, c@d.org", "a@b.org;c@d.org",
    '"alice"@example.org', "alice@example.org\0", "",
])
def test_email_addresses_that_are_not_plain(address: str) -> None:
    assert not is_plain_email(address)
    assert normalise_plain_email(address) is None


def test_a_plain_email_address_is_normalised_first() -> None:
    assert normalise_plain_email(" Alice@Example.ORG\n") == "alice@example.org"
    assert normalise_plain_email("al ice@example.org") is None


@pytest.mark.parametrize(("value", "expected"), [
    ("447700900123", True), ("14155550100", True), ("123456789012345", True),
    ("+447700900123", False), ("0447700900123", False), ("4", False),
    ("1234567890123456", False), ("44 7700", False), ("", False), ("447700900123\n", False),
])
def test_is_msisdn(value: str, expected: bool) -> None:
    assert is_msisdn(value) is expected


@pytest.mark.parametrize(("country", "number", "msisdn", "international"), [
    ("GB", "020 7946 0000", "442079460000", "+44 20 7946 0000"),
    ("gb", "020 7946 0000", "442079460000", "+44 20 7946 0000"),
    ("US", "(415) 555-0100", "14155550100", "+1 415-555-0100"),
    ("", "+33 1 23 45 67 89", "33123456789", "+33 1 23 45 67 89"),
    ("US", "+44 20 7946 0000", "442079460000", "+44 20 7946 0000"),
    # The spec's example: in the range kept for drama, of a possible length.
    ("GB", "07700900001", "447700900001", "+44 7700 900001"),
])
def test_parse_msisdn(country: str, number: str, msisdn: str, international: str) -> None:
    assert parse_msisdn(country, number) == (msisdn, international)


@pytest.mark.parametrize(("country", "number", "message"), [
    ("GB", "not a number", "Unable to parse phone number"),
    ("", "020 7946 0000", "Unable to parse phone number"),  # national, but no country
    ("GB", "0123", "Not a valid phone number"),
    ("GB", "07700 900123 4567", "Not a valid phone number"),
    ("US", "555-0100", "Not a valid phone number"),
])
def test_parse_msisdn_refuses(country: str, number: str, message: str) -> None:
    with pytest.raises(MatrixError) as raised:
        parse_msisdn(country, number)
    assert (raised.value.status, raised.value.errcode) == (400, M_INVALID_ADDRESS)
    assert raised.value.message == message


def test_an_msisdn_and_its_phone_number() -> None:
    number = number_from_msisdn("442079460000")
    assert number is not None and number.country_code == 44
    assert msisdn_from_number(number) == "442079460000"
    assert number_from_msisdn("") is None
    assert number_from_msisdn("not digits") is None


# ---------------------------------------------------------------------- the 3PID type


def test_a_threepid_decodes_from_a_json_object() -> None:
    decoded = msgspec.json.decode(b'{"medium": "email", "address": "a@example.org"}',
                                  type=Threepid)
    assert decoded == Threepid("email", "a@example.org")
    with pytest.raises(msgspec.ValidationError, match="missing required field `address`"):
        msgspec.json.decode(b'{"medium": "email"}', type=Threepid)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'["email", "a@example.org"]', type=Threepid)


def test_a_threepid_is_a_frozen_dict_key() -> None:
    owners = {Threepid("email", "a@example.org"): "@a:example.org"}
    assert owners[Threepid("email", "a@example.org")] == "@a:example.org"
    assert Threepid("msisdn", "a@example.org") not in owners
    with pytest.raises(AttributeError):
        Threepid("email", "a@example.org").address = "b@example.org"  # type: ignore[misc]


# ---------------------------------------------------------------------------- lookups


def test_hashes_match_the_spec_examples() -> None:
    assert lookup_hash("email", "alice@example.com", "matrixrocks") == \
        "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
    assert lookup_hash("email", "bob@example.com", "matrixrocks") == \
        "LJwSazmv46n0hlMlsb_iYxI0_HXEqy_yj6Jm636cdT8"
    assert lookup_hash("msisdn", "18005552067", "matrixrocks") == \
        "nlo35_T5fzSGZzJApqu8lgIudJvmOQtDaHtr-I4rU7I"


def test_a_new_pepper_is_random_and_alphanumeric() -> None:
    peppers = {new_pepper() for _ in range(20)}
    assert len(peppers) == 20
    assert all(len(p) == 16 and p.isascii() and p.isalnum() for p in peppers)
    assert len(new_pepper(32)) == 32


@pytest.mark.parametrize(("query", "threepid"), [
    ("alice@example.org email", Threepid("email", "alice@example.org")),
    ("Alice@Example.ORG email", Threepid("email", "alice@example.org")),
    ("447700900123 msisdn", Threepid("msisdn", "447700900123")),
    ("+447700900123 msisdn", Threepid("msisdn", "447700900123")),
    ("alice@example.org", None),
    ("alice@example.org Email", None),
    ("alice@example.org phone", None),
    ("al ice@example.org email", None),
    ("+44 7700900123 msisdn", None),
    (" email", None),
    ("", None),
])
def test_parse_plain_query(query: str, threepid: Threepid | None) -> None:
    assert parse_plain_query(query) == threepid


def test_a_plain_query_reads_back() -> None:
    assert plain_query("email", "alice@example.org") == "alice@example.org email"
    for medium, address in (("email", "alice@example.org"), ("msisdn", "447700900123")):
        assert parse_plain_query(plain_query(medium, address)) == Threepid(medium, address)


def test_now_ms() -> None:
    before = int(time.time() * 1000)
    now = now_ms()
    assert before <= now <= int(time.time() * 1000)
