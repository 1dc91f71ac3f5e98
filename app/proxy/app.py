"""The proxy's FastAPI app: OpenAI routes forwarded to nodes, and node management.

`create_app(config)` builds it; the lifespan opens the shared aiohttp session, starts the health
monitor and hands every request a `ProxyContext` through the lifespan state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
import structlog
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError, ORJSONResponse, error_response, install_error_handlers
from app.middleware import bearer_key_ok, echoing_request_id, request_id_for
from app.proxy.forward import INTERACTIVE_PATH, Forwarder
from app.proxy.nodes import (
    NodeRegistry,
    NodeUnavailable,
    monitor_health,
    normalize_base_url,
    probe_node,
)
from app.proxy.strategies import MAX_SPEED, MIN_SPEED, Strategy

log = structlog.get_logger("splitfuse.proxy")


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the proxy is told on its command line."""

    strategy: Strategy = Strategy.MIN_EXPECTED_LATENCY
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    node_api_key: str | None = None
    health_interval: float = 5.0
    max_failures: int = 3
    node_expiry: float = 60.0
    request_timeout: float = 600.0
    connect_timeout: float = 5.0
    max_body_bytes: int = 4 * 2**20


@dataclass
class ProxyContext:
    """What the routes share: the settings, the node registry and the upstream forwarder."""

    config: ProxyConfig
    registry: NodeRegistry
    forwarder: Forwarder
    session: aiohttp.ClientSession
    started: int


class NodeStatusIn(BaseModel):
    """The optional `status` of /nodes/add; the proxy learns models and load by itself."""

    model_config = ConfigDict(extra="ignore")
    speed: Annotated[float, Field(ge=MIN_SPEED, le=MAX_SPEED, allow_inf_nan=False)] | None = None


class NodeIn(BaseModel):
    """The body of /nodes/add, as LMDeploy's proxy takes it."""

    model_config = ConfigDict(extra="ignore")
    url: str
    status: NodeStatusIn | None = None


class Gate:
    """Gives each request an id (the client's X-Request-Id when sane) for logs and responses,
    and checks the API key on every route but /health and /nodes/* (checked by their routes)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = request_id_for(headers.get(b"x-request-id", b"").decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = request_id
        send_with_id = echoing_request_id(send, request_id)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            # scope["path"] is the decoded path the router matches, so encoding cannot dodge it.
            path = scope["path"]
            open_path = path == "/health" or path.startswith("/nodes/")
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if self.api_keys and not open_path and not bearer_key_ok(authorization, self.api_keys):
                response = error_response(401, "invalid or missing API key", code="invalid_api_key")
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)


def _context(request: Request) -> ProxyContext:
    return request.state.proxy


Context = Annotated[ProxyContext, Depends(_context)]


def _require_admin(request: Request, ctx: Context) -> None:
    """The admin key when there is one; otherwise a loopback client, with an API key if any."""
    authorization = request.headers.get("authorization", "")
    admin_key, api_keys = ctx.config.admin_key, ctx.config.api_keys
    if admin_key:
        if not bearer_key_ok(authorization, (admin_key,)):
            raise APIError(401, "invalid or missing admin key", code="invalid_api_key")
        return
    if api_keys and not bearer_key_ok(authorization, api_keys):
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")
    # The peer of the TCP connection, never a forwarded-for header a client could write.
    peer = request.scope.get("client")
    try:
        loopback = peer is not None and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise APIError(
            401,
            "node management needs an admin key from non-loopback clients",
            code="invalid_api_key",
        )


def create_app(config: ProxyConfig) -> FastAPI:
    """The proxy app for `config`; nodes join through /nodes/add."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Unlimited pool: every in-flight stream holds a connection to its node.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
        node_headers = (
            {"Authorization": f"Bearer {config.node_api_key}"} if config.node_api_key else {}
        )
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            registry = NodeRegistry(config.max_failures, config.node_expiry)
            forwarder = Forwarder(
                session,
                registry,
                config.strategy,
                node_headers,
                config.request_timeout,
                config.max_body_bytes,
                random.Random(),
            )
            ctx = ProxyContext(config, registry, forwarder, session, int(time.time()))
            health = asyncio.create_task(
                monitor_health(registry, session, node_headers, config.health_interval),
                name="proxy-health-monitor",
            )
            log.info("proxy started", strategy=str(config.strategy))
            try:
                yield {"proxy": ctx}
            finally:
                health.cancel()
                await asyncio.gather(health, return_exceptions=True)

    app = FastAPI(title="splitfuse proxy", lifespan=lifespan, default_response_class=ORJSONResponse)
    install_error_handlers(app)
    app.add_middleware(Gate, api_keys=config.api_keys)
    _add_openai_routes(app)
    _add_node_routes(app)
    return app


def _add_openai_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(ctx: Context) -> dict[str, Any]:
        return {"status": "ok", "healthy_nodes": len(ctx.registry.healthy_nodes())}

    @app.get("/v1/models")
    async def models(ctx: Context) -> dict[str, Any]:
        cards = [
            {"id": m, "object": "model", "created": ctx.started, "owned_by": "splitfuse"}
            for m in ctx.registry.models()
        ]
        return {"object": "list", "data": cards}

    for path in ("/v1/chat/completions", "/v1/completions", INTERACTIVE_PATH):
        app.add_api_route(path, _forwarding_route(path), methods=["POST"])


def _forwarding_route(path: str) -> Callable[..., Awaitable[Response]]:
    async def forward(request: Request, ctx: Context) -> Response:
        return await ctx.forwarder.handle(request, path)

    forward.__name__ = "forward_" + path.strip("/").replace("/", "_")
    return forward


def _add_node_routes(app: FastAPI) -> None:
    guarded = [Depends(_require_admin)]

    @app.get("/nodes/status", dependencies=guarded)
    async def nodes_status(ctx: Context) -> dict[str, Any]:
        return {url: node.status() for url, node in ctx.registry.nodes.items()}

    @app.post("/nodes/add", dependencies=guarded)
    async def nodes_add(request: Request, ctx: Context) -> dict[str, Any]:
        # Parsed here rather than by FastAPI so that the admin check runs before the body is read.
        try:
            node = NodeIn.model_validate_json(await request.body())
        except ValidationError:
            raise APIError(
                400,
                'the body must be {"url": str, "status": {"speed": number}}, '
                f"with speed from {MIN_SPEED:g} to {MAX_SPEED:g}",
            ) from None
        url = _node_url(node.url, "url")
        try:
            models = await probe_node(
                ctx.session, url, ctx.forwarder.node_headers, timeout=ctx.config.connect_timeout
            )
        except NodeUnavailable as exc:
            log.info("node refused", node=url, reason=str(exc))
            raise APIError(
                400,
                f"the node at {url} did not answer as a working splitfuse "
                "server (/health and /v1/models)",
                param="url",
                code="node_unavailable",
            ) from None
        speed = node.status.speed if node.status else None
        ctx.registry.upsert(url, models, speed)
        return {"message": "Added successfully", "url": url, "models": models}

    @app.post("/nodes/remove", dependencies=guarded)
    async def nodes_remove(node_url: str, ctx: Context) -> dict[str, Any]:
        url = _node_url(node_url, "node_url")
        if not ctx.registry.remove(url):
            raise APIError(
                404, f"no node {url} is registered", param="node_url", code="node_not_found"
            )
        return {"message": "Deleted successfully", "url": url}


def _node_url(url: str, param: str) -> str:
    try:
        return normalize_base_url(url)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None
