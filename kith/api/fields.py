"""The longest strings kith takes from a client for what it stores or mails.

Each is a msgspec type, so a longer string is refused while the body is decoded, with
400 M_INVALID_PARAM naming the field, before anything is stored or sent.  The bounds
are far above what real clients and homeservers send (docs/decisions.md): they exist so
that no request can make kith store or mail kilobytes of a stranger's text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from kith.errors import invalid_param

# Matrix IDs and room aliases are at most 255 bytes (the spec's grammar); so are the
# short names of the Matrix vocabulary (room types, join rules).
MAX_IDENTIFIER = 255
# A link: next_link, an avatar's mxc:// URI, a web client's location.  Browsers and
# mail readers cope with links of a few kilobytes at most.
MAX_URL = 4096
# A name a person chose: a room name, a display name (Synapse caps display names at
# 256).  The mail shows a shorter prefix still (kith.delivery.email).
MAX_NAME = 1024

Identifier = Annotated[str, msgspec.Meta(max_length=MAX_IDENTIFIER)]
Url = Annotated[str, msgspec.Meta(max_length=MAX_URL)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]


def check_string_lengths(fields: Mapping[str, Any], limit: int = MAX_URL) -> None:
    """400 M_INVALID_PARAM for any string field longer than `limit` (for the fields a
    request may add beyond the known ones, which still reach the mail templates)."""
    for name, value in fields.items():
        if isinstance(value, str) and len(value) > limit:
            raise invalid_param(f"Invalid parameter: {name[:64]!r} is longer than "
                                f"{limit} characters")
