"""Run by Synapse's interpreter: sign identity-server requests with Synapse's own code.

Reads a JSON list of requests on stdin and writes the list of their `Authorization`
header values on stdout.  Each request names the signing server, its ed25519 key (version
and unpadded base64 seed), and what Synapse's identity handler passes to
`MatrixFederationHttpClient.build_auth_headers`.  Only that method runs: it needs nothing
of the client but the server name and the signing key.
"""

import json
import sys
from typing import Any

from signedjson.key import decode_signing_key_base64
from synapse.http.matrixfederationclient import MatrixFederationHttpClient


def headers_for(request: dict[str, Any]) -> str:
    client = MatrixFederationHttpClient.__new__(MatrixFederationHttpClient)
    client.server_name = request["origin"]
    client.signing_key = decode_signing_key_base64(
        "ed25519", request["key_version"], request["key_seed"])

    def encoded(name: str) -> bytes | None:
        value = request.get(name)
        return None if value is None else value.encode("ascii")

    (header,) = client.build_auth_headers(
        destination=encoded("destination"),
        method=request["method"].encode("ascii"),
        url_bytes=request["uri"].encode("ascii"),
        content=request.get("content"),
        destination_is=encoded("destination_is"),
    )
    return str(header.decode("ascii"))


json.dump([headers_for(r) for r in json.load(sys.stdin)], sys.stdout)
