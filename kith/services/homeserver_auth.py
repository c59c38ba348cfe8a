"""Requests signed by a homeserver (X-Matrix): who sent them, and what they may do."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from kith.errors import unauthorized
from kith.federation.keys import ServerKeyFetcher
from kith.federation.xmatrix import (
    InvalidXMatrixHeader,
    XMatrixVerificationError,
    parse_x_matrix,
    verify_x_matrix_request,
)

log = logging.getLogger(__name__)


class HomeserverAuthenticator:
    """Checks `Authorization: X-Matrix` requests against the origin's published keys.

    `public_names` are the names this identity server answers to (server.name and its
    aliases): a signed request must be addressed to one of them.
    """

    def __init__(self, fetcher: ServerKeyFetcher, public_names: Collection[str]) -> None:
        self._fetcher = fetcher
        self._public_names = tuple(dict.fromkeys(public_names))

    async def verify(self, header: str, *, method: str, uri: str, content: Any) -> str:
        """The homeserver that signed the request, or 401 M_UNAUTHORIZED."""
        try:
            auth = parse_x_matrix(header)
            return await verify_x_matrix_request(
                auth, method=method, uri=uri, content=content,
                expected_destinations=self._public_names, fetcher=self._fetcher)
        except InvalidXMatrixHeader as exc:
            raise unauthorized(f"Invalid X-Matrix authorization: {exc}") from None
        except XMatrixVerificationError as exc:
            log.info("refused an X-Matrix request: %s", exc.reason)
            raise unauthorized(f"X-Matrix signature not accepted: {exc.reason}") from None

