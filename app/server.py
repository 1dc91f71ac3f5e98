"""The HTTP server: app factory, lifespan (engine start/stop), graceful drain, uvicorn start-up.

Endpoint modules each `register(router, ctx)` with one explicit ServerContext; nothing lives in
module globals. One asyncio loop (uvloop) runs HTTP and the engine loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute

from app import __version__
from app.chat_template import ChatTemplate, resolve_template_source
from app.engine.engine import AsyncEngine
from app.errors import ORJSONResponse, install_error_handlers
from app.metrics import Metrics
from app.middleware import Gate
from app.settings import ServerConfig, Settings

log = logging.getLogger("splitfuse.server")


@dataclass
class ServerContext:
    """Everything the endpoints share, created once per app."""

    engine: AsyncEngine
    settings: Settings
    template: ChatTemplate
    metrics: Metrics
    draining: bool = False
    pending: int = 0  # samples admitted that have not produced their first delta yet
    started: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def healthy(self) -> bool:
        engine = self.engine
        if self.draining or not engine.running or engine.last_error is not None:
            return False
        stalled = time.monotonic() - engine.last_progress
        return stalled < self.settings.server.health_stall_seconds


class _OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson refuses lone surrogates, invalid UTF-8, NaN and Infinity: all become 400s.
            self._json = orjson.loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            scope = request.scope
            if scope["method"] == "POST":
                # Bodies are JSON whatever the client labels them (curl -d says form-urlencoded).
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(_OrjsonRequest(scope, request.receive))

        return route


def create_app(engine: AsyncEngine, settings: Settings) -> FastAPI:
    """Build the FastAPI app around an engine that is already loaded."""
    from app.routes import admin, interactive, openai

    server = settings.server
    template = ChatTemplate.for_tokenizer(
        engine.tokenizer,
        settings.engine.chat_template,
        server.chat_template_timeout,
        server.chat_template_max_chars,
    )
    ctx = ServerContext(engine, settings, template, Metrics(engine.stats))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        registration = None
        if server.proxy_url:
            from app.proxy.node_client import NodeRegistration

            # The proxy's admin key, which a node on another host needs to register.
            admin_key = os.environ.get("SPLITFUSE_ADMIN_KEY") or None
            registration = NodeRegistration(
                server.proxy_url, _node_url(server), admin_key=admin_key
            )
            await registration.start()
        log.info(
            "serving %s: %d KV tokens, context %d",
            ctx.model_name,
            engine.block_manager.num_blocks * engine.config.block_size,
            engine.max_model_len,
        )
        try:
            yield
        finally:
            if registration is not None:
                await registration.stop()
            await engine.stop()

    app = FastAPI(
        title="splitfuse",
        version=__version__,
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    router = APIRouter(route_class=OrjsonRoute)
    for module in (openai, interactive, admin):
        module.register(router, ctx)
    app.include_router(router)
    app.add_middleware(Gate, state=ctx)
    return app


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests, let in-flight ones finish, then abort the rest."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext):
        super().__init__(config)
        self.ctx = ctx
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.ctx.draining = True
        self._drain = asyncio.get_event_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: Any) -> None:
        engine = self.ctx.engine
        deadline = time.monotonic() + self.ctx.settings.server.shutdown_timeout
        while engine.scheduler.has_work and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        engine.abort_all()
        await asyncio.sleep(0.1)  # let aborted streams write their last chunk
        super().handle_exit(sig, frame)


def _node_url(server: ServerConfig) -> str:
    """The URL the proxy is told to reach this server at."""
    return server.node_url or f"http://{server.host}:{server.port}"


def _check_proxy_urls(server: ServerConfig) -> None:
    """Refuse a --proxy-url or --node-url the registration would refuse, before the load."""
    from app.proxy.nodes import normalize_base_url

    if not server.proxy_url:
        return
    if not server.node_url and server.port == 0:
        raise ValueError("port 0 (any free port) with proxy_url needs node_url")
    for name, url in (("proxy_url", server.proxy_url), ("node_url", _node_url(server))):
        try:
            normalize_base_url(url)
        except ValueError as exc:
            raise ValueError(f"setting {name}: {url!r}: {exc}") from None


def _check_bindable(host: str, port: int) -> None:
    """Bind the address and let it go, so a port in use or a bad host fails before the load."""
    try:
        # Every address the host resolves to, with SO_REUSEADDR, as asyncio's create_server does.
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def serve(settings: Settings) -> None:
    """Load the model, then serve until SIGTERM/SIGINT."""
    from app.logs import configure_logging

    server = settings.server
    _check_proxy_urls(server)
    _check_bindable(server.host, server.port)
    if settings.engine.chat_template:
        resolve_template_source(settings.engine.chat_template)
    configure_logging(server.log_format, server.log_level)
    engine = AsyncEngine(settings.model, settings.engine)
    # Shut the engine down on every way out, or its native objects leak at exit.
    with _sigterm_after_cleanup():
        try:
            app = create_app(engine, settings)
            config = uvicorn.Config(
                app,
                host=server.host,
                port=server.port,
                loop="uvloop",
                http="httptools",
                log_config=None,
                timeout_graceful_shutdown=5,
                access_log=False,
            )
            DrainingServer(config, app.state.ctx).run()
        finally:
            engine.shutdown()


class _Terminated(Exception):
    """SIGTERM arrived again after uvicorn shut down: unwind, then end by the signal."""


def _raise_terminated(sig: int, frame: Any) -> None:
    raise _Terminated


@contextmanager
def _sigterm_after_cleanup() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it has shut down, so that the process
    ends as one killed by it; SIGTERM's default action would end it there, before the clean-up
    of the block's `finally` (the engine's shutdown). Here the re-raise unwinds the block first,
    then the process ends by SIGTERM as uvicorn meant."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # the handler before did not end it
    finally:
        signal.signal(signal.SIGTERM, previous)
