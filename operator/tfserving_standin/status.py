"""absl::Status in miniature: the real server's errors carry a code whose name prefixes the message."""

from __future__ import annotations

from http import HTTPStatus

# http_server.cc ToHTTPStatusCode.
_HTTP = {
    "OK": HTTPStatus.OK,
    "CANCELLED": 499,
    "UNKNOWN": HTTPStatus.INTERNAL_SERVER_ERROR,
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "DEADLINE_EXCEEDED": HTTPStatus.GATEWAY_TIMEOUT,
    "NOT_FOUND": HTTPStatus.NOT_FOUND,
    "ALREADY_EXISTS": HTTPStatus.CONFLICT,
    "PERMISSION_DENIED": HTTPStatus.FORBIDDEN,
    "RESOURCE_EXHAUSTED": HTTPStatus.TOO_MANY_REQUESTS,
    "FAILED_PRECONDITION": HTTPStatus.BAD_REQUEST,
    "ABORTED": HTTPStatus.CONFLICT,
    "OUT_OF_RANGE": HTTPStatus.BAD_REQUEST,
    "UNIMPLEMENTED": HTTPStatus.NOT_IMPLEMENTED,
    "INTERNAL": HTTPStatus.INTERNAL_SERVER_ERROR,
    "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
    "DATA_LOSS": HTTPStatus.INTERNAL_SERVER_ERROR,
    "UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED,
}


class StatusError(Exception):
    """A failed status: ``code`` is the canonical name (NOT_FOUND...), ``message`` what follows it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return int(_HTTP.get(self.code, HTTPStatus.INTERNAL_SERVER_ERROR))


def invalid_argument(*parts: object) -> StatusError:
    return StatusError("INVALID_ARGUMENT", "".join(map(str, parts)))


def not_found(*parts: object) -> StatusError:
    return StatusError("NOT_FOUND", "".join(map(str, parts)))
