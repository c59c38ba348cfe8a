"""Terms: the policies from terms.path, acceptance, and 403 M_TERMS_NOT_SIGNED."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KithFactory, RunningKith

V2 = "/_matrix/identity/v2"

TERMS = """
master_version: "1.1"
docs:
  privacy_policy:
    version: "1.1"
    langs:
      en: {name: "Privacy Policy", url: "https://example.org/privacy-1.1-en.html"}
      fr: {name: "Politique", url: "https://example.org/privacy-1.1-fr.html"}
  terms_of_service:
    version: "2.0"
    langs:
      en: {name: "Terms of Service", url: "https://example.org/tos-2.0-en.html"}
"""


@pytest.fixture
async def with_terms(kith_factory: KithFactory, tmp_path: Path) -> RunningKith:
    path = tmp_path / "terms.yaml"
    path.write_text(TERMS)
    return await kith_factory({"general": {"terms.path": path}})  # type: ignore[no-any-return]


async def test_no_terms_configured(kith: RunningKith, token: str) -> None:
    async with kith.http.get(f"{kith.base}{V2}/terms") as resp:
        assert (resp.status, await resp.json()) == (200, {"policies": {}})
    async with kith.http.get(f"{kith.base}{V2}/hash_details",
                             headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200


async def test_terms_flow(with_terms: RunningKith) -> None:
    kith = with_terms
    async with kith.http.get(f"{kith.base}{V2}/terms") as resp:
        policies = (await resp.json())["policies"]
    assert policies["privacy_policy"] == {
        "version": "1.1",
        "en": {"name": "Privacy Policy", "url": "https://example.org/privacy-1.1-en.html"},
        "fr": {"name": "Politique", "url": "https://example.org/privacy-1.1-fr.html"},
    }
    token = await kith.register("alice")
    auth = {"Authorization": f"Bearer {token}"}
    async with kith.http.get(f"{kith.base}{V2}/hash_details", headers=auth) as resp:
        assert resp.status == 403
        assert (await resp.json())["errcode"] == "M_TERMS_NOT_SIGNED"
    # GET /account is gated too (Element shows its terms dialog on this 403); only
    # /terms and /account/logout stay open while terms are unsigned, as in Sydent.
    async with kith.http.get(f"{kith.base}{V2}/account", headers=auth) as resp:
        assert resp.status == 403
        assert (await resp.json())["errcode"] == "M_TERMS_NOT_SIGNED"
    # One policy (in French) is not enough...
    async with kith.http.post(f"{kith.base}{V2}/terms", headers=auth, json={
            "user_accepts": ["https://example.org/privacy-1.1-fr.html"]}) as resp:
        assert (resp.status, await resp.json()) == (200, {})
    async with kith.http.get(f"{kith.base}{V2}/hash_details", headers=auth) as resp:
        assert resp.status == 403
    # ...the second one completes consent; earlier acceptances are remembered.
    async with kith.http.post(f"{kith.base}{V2}/terms", headers=auth, json={
            "user_accepts": ["https://example.org/tos-2.0-en.html"]}) as resp:
        assert resp.status == 200
    async with kith.http.get(f"{kith.base}{V2}/hash_details", headers=auth) as resp:
        assert resp.status == 200
    async with kith.http.get(f"{kith.base}{V2}/account", headers=auth) as resp:
        assert (resp.status, await resp.json()) == (200, {"user_id": "@alice:hs.test"})
    # A second token of the same user is consented too.
    token2 = await kith.register("alice")
    async with kith.http.get(f"{kith.base}{V2}/hash_details",
                             headers={"Authorization": f"Bearer {token2}"}) as resp:
        assert resp.status == 200


async def test_logout_needs_no_consent(with_terms: RunningKith) -> None:
    kith = with_terms
    auth = {"Authorization": f"Bearer {await kith.register('bob')}"}
    async with kith.http.post(f"{kith.base}{V2}/account/logout", headers=auth) as resp:
        assert (resp.status, await resp.json()) == (200, {})
    async with kith.http.get(f"{kith.base}{V2}/account", headers=auth) as resp:
        assert (resp.status, (await resp.json())["errcode"]) == (401, "M_UNAUTHORIZED")


@pytest.mark.parametrize("body,errcode", [
    ({}, "M_MISSING_PARAMS"),
    ({"user_accepts": "https://example.org/tos-2.0-en.html"}, "M_INVALID_PARAM"),
    ({"user_accepts": [3]}, "M_INVALID_PARAM"),
    ({"user_accepts": ["https://unknown.example/terms"]}, "M_INVALID_PARAM"),
    ([], "M_BAD_JSON"),
])
async def test_accept_bad_bodies(with_terms: RunningKith, body: object, errcode: str) -> None:
    kith = with_terms
    token = await kith.register("alice")
    async with kith.http.post(f"{kith.base}{V2}/terms", json=body,
                              headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == errcode
