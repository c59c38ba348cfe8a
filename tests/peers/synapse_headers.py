"""X-Matrix headers made by Synapse's own signing code (tests/peers/synapse_sign.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signedjson.key import encode_signing_key_base64
from signedjson.types import SigningKey

from tests.e2e.synapse import synapse_python

SIGNER = Path(__file__).with_name("synapse_sign.py")


@dataclass(frozen=True)
class UnbindToSign:
    """One request as Synapse's identity handler signs `/3pid/unbind`: addressed to an
    identity server (`destination_is` = the `id_server` the user named), no `destination`."""

    key: SigningKey
    origin: str
    content: Any
    id_server: str
    uri: str = "/_matrix/identity/v2/3pid/unbind"

    def as_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "key_version": self.key.version,
                "key_seed": encode_signing_key_base64(self.key), "method": "POST",
                "uri": self.uri, "content": self.content, "destination": None,
                "destination_is": self.id_server}


def synapse_auth_headers(requests: list[UnbindToSign]) -> list[str]:
    """The `Authorization` header Synapse sends with each request (one Synapse import)."""
    proc = subprocess.run(
        [str(synapse_python()), "-I", str(SIGNER)],
        input=json.dumps([r.as_json() for r in requests]), capture_output=True, text=True,
        timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Synapse's signer failed: {proc.stderr[-2000:]}")
    headers = json.loads(proc.stdout)
    assert isinstance(headers, list) and len(headers) == len(requests)
    return [str(h) for h in headers]
