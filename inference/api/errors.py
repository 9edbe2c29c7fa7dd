"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import Response

# The scope key under which the HTTP protocol leaves the error it closed a request's connection
# with (a body that stopped arriving, one that gave way at the connection cap): the request's
# handler sees only a disconnect, and records this instead.
CLOSED_BY_SERVER = "vigil.closed_by_server"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        """The low-cardinality cause recorded in metrics, spans and logs: the code if there
        is one (queue_full, deadline_exceeded, ...), else the OpenAI error type."""
        return self.code or self.error_type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            headers=headers,
            media_type="application/json",
        )


def _location(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part
    )


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, named by its field, as a 400."""
    error = exc.errors(include_url=False)[0]
    # Union types add the tried member type to the location ("max_tokens.int"); drop those.
    loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
    param = _location(loc) or None
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = f"'{param}' is a required property"
    elif param:
        message = f"'{param}': {message}"
    return ApiError(400, message, param=param)
