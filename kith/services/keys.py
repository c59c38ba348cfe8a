"""The server's long-term signing key: signing associations, answering pubkey queries."""

from __future__ import annotations

import hmac
from typing import Any

from signedjson.key import encode_verify_key_base64, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey


class ServerKeys:
    def __init__(self, server_name: str, signing_key: SigningKey) -> None:
        self.server_name = server_name
        self.signing_key = signing_key
        self.key_id = f"{signing_key.alg}:{signing_key.version}"
        self.public_key = encode_verify_key_base64(get_verify_key(signing_key))

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        """`obj` plus our signature (the Matrix "Signing JSON" algorithm)."""
        signed: dict[str, Any] = sign_json(dict(obj), self.server_name, self.signing_key)
        return signed

    def public_key_for(self, key_id: str) -> str | None:
        return self.public_key if key_id == self.key_id else None

    def is_valid(self, public_key: str) -> bool:
        return hmac.compare_digest(public_key.encode(), self.public_key.encode())
