"""OpenAI-style errors: one exception type for the routes, one body shape, handlers by type.

Every error a client can cause becomes `{"error": {"message", "type", "param", "code"}}` with a
4xx status; anything else is a 500 whose message reveals no internals.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("splitfuse.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout_error",
}


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in a route before the response starts."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client left before its answer was ready; its engine work has been aborted."""


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> ORJSONResponse:
    return ORJSONResponse(
        error_body(status, message, param, code), status_code=status, headers=headers
    )


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried (`str`, `list[int]`, `function-after[...]`) in
    an error's location; that is no field of the request."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "dict", "list") or any(c in part for c in "[(,")
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # Our own validators explain more than "not a valid string" from another union member,
    # and of the rest the deepest error is the member the input came closest to.
    first = next((e for e in errors if e.get("type") == "value_error"), None) or max(
        errors, key=lambda e: len(e.get("loc", ()))
    )
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # An empty body is missing at ("body", None).
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", None) and not _is_union_tag(p)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        if param is None:  # the body itself: nothing was sent
            return "the request body is empty; a JSON object is expected", None
        return f"'{param}' is a required field", param
    if not loc:
        return f"invalid request body: {message}", None
    return f"{param}: {message}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        log.info("the client disconnected; its request was aborted")
        # Nobody reads this; 499 is what access logs call a request the client closed.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        message = {404: "not found", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        return error_response(500, "internal server error")
