"""schemathesis hooks for fuzzing kith (loaded with SCHEMATHESIS_HOOKS by tests/spec/test_fuzz.py).

- Values for the Matrix `mx-*` string formats, so positive cases carry well-formed IDs,
  server names included.
- Access tokens: the account's token for every operation except `/account/logout`, which
  gets a token of its own each time (registered through the OpenID flow), so logging out
  never ends the run's session.
- The check the spec's error rules ask of every error: a JSON object with a string
  `errcode` (M_...) and a string `error`, sent as `application/json`.
- Positive store-invite cases sent by the fuzzing account itself.
- schemathesis' "schema-violating request accepted" check, less what kith deliberately
  accepts from real peers (docs/decisions.md).

The kith and OpenID details come from the environment (KITH_FUZZ_*), set by the test.
"""

from __future__ import annotations

import os
from typing import Any

import jsonschema_rs
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection

_LOCAL = r"[a-z0-9._=/+-]{1,16}"
# Server names a fuzzed user ID or room may carry: kith sends every name to the
# homeserver stand-in (federation.test_overrides = *=...), never to the network.
_SERVER = r"(example\.org|localhost:8448|\[::1\]:8448|127\.0\.0\.1)"
_B64URL = r"[A-Za-z0-9_-]{8,43}"
_B64 = r"[A-Za-z0-9+/]{8,43}"

MATRIX_FORMATS = {
    "mx-user-id": rf"\A@{_LOCAL}:{_SERVER}\Z",
    "mx-room-id": rf"\A!{_B64URL}(:{_SERVER})?\Z",
    "mx-room-alias": rf"\A#{_LOCAL}:{_SERVER}\Z",
    "mx-event-id": rf"\A\${_B64URL}\Z",
    "mx-server-name": rf"\A{_SERVER}\Z",
    "mx-mxc-uri": rf"\Amxc://{_SERVER}/{_B64URL}\Z",
    "mx-unpadded-base64": rf"\A{_B64}\Z",
    "mx-urlsafe-unpadded-base64": rf"\A{_B64URL}\Z",
}

for _name, _regex in MATRIX_FORMATS.items():
    schemathesis.openapi.format(_name, st.from_regex(_regex, fullmatch=True))

# The link in a verification mail: the spec wants an answer a person can read, so a
# failed validation there is an HTML page (its other errors are still Matrix errors).
HUMAN_READABLE = frozenset({
    "GET /_matrix/identity/v2/validate/email/submitToken",
    "GET /_matrix/identity/v2/validate/msisdn/submitToken",
})


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict[str, Any]) -> None:
    """Values that get past kith's first checks, so positive cases go on to what lies
    behind them.

    `matrix_server_name` is a server name (the prose; the schema says "string"): kith then
    asks that homeserver rather than refusing the name unasked."""
    schemas = raw_schema["components"]["schemas"]
    schemas["OpenidToken"]["properties"]["matrix_server_name"]["format"] = "mx-server-name"


# Cases of any operation.
Case = schemathesis.Case[Any]

LOGOUT_PATH = "/_matrix/identity/v2/account/logout"
REGISTER_PATH = "/_matrix/identity/v2/account/register"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run this through tests/spec/test_fuzz.py")
    return value


def register_token() -> str:
    """A new kith access token for the fuzzing account (terms already accepted)."""
    response = requests.post(f"{_env('KITH_FUZZ_BASE_URL')}{REGISTER_PATH}", json={
        "access_token": _env("KITH_FUZZ_OPENID_TOKEN"), "token_type": "Bearer",
        "matrix_server_name": _env("KITH_FUZZ_SERVER_NAME"), "expires_in": 3600,
    }, timeout=10)
    response.raise_for_status()
    return str(response.json()["token"])


@schemathesis.auth(refresh_interval=None)
class KithAccessToken:
    def get(self, case: Case, ctx: schemathesis.AuthContext) -> str:
        if ctx.operation.path == LOGOUT_PATH:
            return register_token()
        return _env("KITH_FUZZ_ACCESS_TOKEN")

    def set(self, case: Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.check
def matrix_error_body(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                      case: Case) -> bool | None:
    """Every 4xx/5xx answer is a Matrix error: `{"errcode": "M_...", "error": "..."}`."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if case.operation.label in HUMAN_READABLE and content_type.startswith("text/html"):
        return None
    if content_type.split(";")[0].strip() != "application/json":
        raise AssertionError(
            f"HTTP {response.status_code} answered with Content-Type {content_type!r}")
    try:
        body: Any = response.json()
    except ValueError:
        raise AssertionError(
            f"HTTP {response.status_code} body is not JSON: {response.text[:200]!r}") from None
    errcode = body.get("errcode") if isinstance(body, dict) else None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(errcode, str) and errcode.startswith("M_") and isinstance(error, str)):
        raise AssertionError(
            f"HTTP {response.status_code} body is not a Matrix error: {response.text[:200]!r}")
    return None


STORE_INVITE = "POST /_matrix/identity/v2/store-invite"


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Case, **kwargs: Any) -> None:
    """A positive store-invite is sent by the account itself: kith refuses (403) an
    invite whose `sender` is anyone else, which would leave the invite's mail unsent
    by every generated case."""
    meta = case.meta
    if (case.operation.label == STORE_INVITE and isinstance(case.body, dict)
            and "sender" in case.body
            and not (meta is not None and meta.is_negative_at(ParameterLocation.BODY))):
        case.body["sender"] = _env("KITH_FUZZ_USER_ID")


# Body fields kith takes as any string or null, where the schema is stricter
# (docs/decisions.md): the invite's display fields, which Synapse fills with "" (or null)
# when the room has no alias, avatar, name, ... and which only fill the invite mail; and
# next_link, which Sydent takes as any string (kith redirects only to http(s) links).
LENIENT_FIELDS = {
    "POST /_matrix/identity/v2/store-invite": frozenset({
        "room_alias", "room_avatar_url", "room_join_rules", "room_name", "room_type",
        "sender_display_name", "sender_avatar_url"}),
    "POST /_matrix/identity/v2/validate/email/requestToken": frozenset({"next_link"}),
    "POST /_matrix/identity/v2/validate/msisdn/requestToken": frozenset({"next_link"}),
}


def as_kith_reads_it(operation: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body less the lenient fields that hold a string or null."""
    lenient = LENIENT_FIELDS.get(operation, frozenset())
    return {key: value for key, value in body.items()
            if not (key in lenient and (value is None or isinstance(value, str)))}


def violates_only_leniencies(case: Case) -> bool:
    """Whether the case's only fault is in its JSON body, and kith's reading of that
    body is valid."""
    meta = case.meta
    if meta is None or not isinstance(case.body, dict):
        return False
    if any(meta.is_negative_at(location) for location in meta.components
           if location != ParameterLocation.BODY):
        return False
    schema = case.operation.get_body_for_media_type("application/json")
    if schema is None:
        return False
    validator = jsonschema_rs.Draft202012Validator(schema.validation_schema,
                                                   validate_formats=True)
    return bool(validator.is_valid(as_kith_reads_it(case.operation.label, case.body)))


@schemathesis.check
def negative_data_rejection_as_kith_reads_it(
        ctx: schemathesis.CheckContext, response: schemathesis.Response,
        case: Case) -> bool | None:
    """A request that breaks the schema is refused, unless it breaks it only where kith
    is lenient on purpose."""
    try:
        return negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData:
        if violates_only_leniencies(case):
            return None
        raise
