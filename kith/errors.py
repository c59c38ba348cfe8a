"""Matrix errors: what every layer raises when a request cannot be served."""

from __future__ import annotations

from typing import Any

M_BAD_JSON = "M_BAD_JSON"
M_NOT_JSON = "M_NOT_JSON"
M_MISSING_PARAMS = "M_MISSING_PARAMS"
M_INVALID_PARAM = "M_INVALID_PARAM"
M_UNAUTHORIZED = "M_UNAUTHORIZED"
M_UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
M_TERMS_NOT_SIGNED = "M_TERMS_NOT_SIGNED"
M_UNRECOGNIZED = "M_UNRECOGNIZED"
M_NOT_FOUND = "M_NOT_FOUND"
M_UNKNOWN = "M_UNKNOWN"
M_INVALID_PEPPER = "M_INVALID_PEPPER"
M_TOO_LARGE = "M_TOO_LARGE"
M_LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
M_FORBIDDEN = "M_FORBIDDEN"
M_INVALID_EMAIL = "M_INVALID_EMAIL"
M_INVALID_ADDRESS = "M_INVALID_ADDRESS"
M_NO_VALID_SESSION = "M_NO_VALID_SESSION"
M_SESSION_EXPIRED = "M_SESSION_EXPIRED"
M_SESSION_NOT_VALIDATED = "M_SESSION_NOT_VALIDATED"
M_TOKEN_INCORRECT = "M_TOKEN_INCORRECT"
M_THREEPID_IN_USE = "M_THREEPID_IN_USE"
M_EMAIL_SEND_ERROR = "M_EMAIL_SEND_ERROR"
M_SEND_ERROR = "M_SEND_ERROR"
M_DESTINATION_REJECTED = "M_DESTINATION_REJECTED"


class MatrixError(Exception):
    """An error answered to the caller as `{"errcode", "error", ...extra}`."""

    def __init__(
        self, status: int, errcode: str, message: str, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.message, **self.extra}

    def __repr__(self) -> str:
        return f"MatrixError({self.status}, {self.errcode!r}, {self.message!r})"


def unauthorized(message: str = "Unrecognised access token") -> MatrixError:
    return MatrixError(401, M_UNAUTHORIZED, message)


def missing_params(*names: str) -> MatrixError:
    return MatrixError(400, M_MISSING_PARAMS, f"Missing parameters: {', '.join(names)}")


def invalid_param(message: str) -> MatrixError:
    return MatrixError(400, M_INVALID_PARAM, message)


def database_unreachable() -> MatrixError:
    """503 for a request kith cannot serve while its database does not answer."""
    return MatrixError(503, M_UNKNOWN,
                       "The server cannot reach its database now; try again later")
