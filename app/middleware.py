"""The ASGI gate every request passes: request id, header and body-size limits, drain state,
API-key auth.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and client disconnects pass through
untouched. Paths are the decoded ones the router matches, so an encoded path cannot skip auth.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from fastapi import HTTPException

from app.errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
OPEN_PATHS = frozenset({"/health"})


def request_id_for(given: str) -> str:
    """The client's X-Request-Id when it is sane (it reaches logs and headers), else a new one."""
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def echoing_request_id(send: Send, request_id: str) -> Send:
    """`send`, adding X-Request-Id to the response's headers."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                *message.get("headers", []),
                (b"x-request-id", request_id.encode()),
            ]
        await send(message)

    return send_with_id


def bearer_key_ok(authorization: str, keys: Iterable[str]) -> bool:
    """Whether an Authorization header is `Bearer KEY` for one of `keys`. Every key is compared,
    in constant time, so timing tells nothing about which one nearly matched."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class BodyTooLarge(HTTPException):
    """Raised while the body streams in: FastAPI passes HTTP exceptions through its body
    parsing (any other error there becomes its 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds {limit} bytes")


class Gate:
    """Wraps the app; `state` is the server context (draining flag, api keys, body limit)."""

    def __init__(self, app: ASGIApp, state: Any):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = request_id_for(headers.get("x-request-id", ""))
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self._guarded(scope, receive, echoing_request_id(send, request_id), headers)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        path = scope["path"]
        settings = self.state.settings.server
        raw_headers = scope["headers"]
        if len(raw_headers) > settings.max_headers or (
            sum(len(k) + len(v) for k, v in raw_headers) > settings.max_header_bytes
        ):
            await error_response(
                431,
                f"request headers exceed the limit of {settings.max_headers} headers "
                f"or {settings.max_header_bytes} bytes",
            )(scope, receive, send)
            return
        if self.state.draining and path != "/health":
            await error_response(503, "the server is shutting down", headers={"Retry-After": "5"})(
                scope, receive, send
            )
            return
        if settings.api_keys and path not in OPEN_PATHS and not self._authorized(headers):
            await error_response(401, "missing or invalid API key", code="invalid_api_key")(
                scope, receive, send
            )
            return
        limit = settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            await error_response(
                status,
                f"the request body exceeds {limit} bytes"
                if status == 413
                else "invalid Content-Length",
            )(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await error_response(413, exc.detail)(scope, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        return bearer_key_ok(headers.get("authorization", ""), self.state.settings.server.api_keys)
