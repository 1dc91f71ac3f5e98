"""Test helpers: real uvicorn servers on loopback threads, and fake OpenAI-shaped nodes."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import uvicorn
import uvloop
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.proxy import ProxyConfig, create_app

ADMIN = {"Authorization": "Bearer admin-key"}


class ServerThread:
    """A uvicorn server listening on `host`, run on its own thread and event loop."""

    def __init__(self, app: Any, host: str = "127.0.0.1", use_uvloop: bool = False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="on",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._loop_factory = uvloop.new_event_loop if use_uvloop else asyncio.new_event_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Graceful shutdown; a no-op when the server is not running."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        self.sock.close()

    def kill(self) -> None:
        """Drop every connection at once and stop listening, as a crashed process would."""
        if self._loop is None or not self._thread.is_alive():
            return

        def abort() -> None:
            self.server.should_exit = self.server.force_exit = True
            for server in self.server.servers:
                server.close()
            for connection in list(self.server.server_state.connections):
                connection.transport.abort()

        self._loop.call_soon_threadsafe(abort)
        self._thread.join(10)
        self.sock.close()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            self._loop = runner.get_loop()
            runner.run(self.server.serve(sockets=[self.sock]))


@dataclass
class Knobs:
    """How a fake node misbehaves; tests change these while it runs."""

    fail_status: int | None = None
    health_status: int = 200
    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 3


@dataclass
class FakeNode:
    """An OpenAI-shaped node whose answers are its own name, recording what it was asked."""

    name: str
    models: tuple[str, ...] = ("m",)
    knobs: Knobs = field(default_factory=Knobs)
    received: list[dict[str, Any]] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()
        app.get("/health")(self._health)
        app.get("/v1/models")(self._models)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive"):
            app.post(path)(self._generate)
        return app

    async def _health(self) -> Response:
        return JSONResponse({"status": "ok"}, status_code=self.knobs.health_status)

    async def _models(self) -> dict[str, Any]:
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in self.models]
        return {"object": "list", "data": cards}

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        record = {
            "path": request.url.path,
            "model": body.get("model"),
            "stream": bool(body.get("stream")),
            "session_id": body.get("session_id"),
            "request_id": request.headers.get("x-request-id"),
            "auth": request.headers.get("authorization"),
        }
        self.received.append(record)
        if self.knobs.fail_status is not None:
            error = {"message": f"{self.name} says no", "type": "x", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=self.knobs.fail_status)
        if record["path"] == "/v1/chat/interactive":
            return await self._interactive(request, record)
        if record["stream"]:
            return StreamingResponse(self._stream(record), media_type="text/event-stream")
        if not await self._wait(request, self.knobs.delay):
            return Response(status_code=499)
        self.served.append(record)
        return JSONResponse(_answer(record["path"], self.name))

    async def _interactive(self, request: Request, record: dict[str, Any]) -> Response:
        """A turn answered as a splitfuse server does, numbering a new session (-1 or none)."""
        session_id = record["session_id"]
        if session_id is None or session_id == -1:
            session_id = random.randrange(1 << 30, 1 << 62)
        answer = _answer(record["path"], self.name) | {"session_id": session_id}
        if not await self._wait(request, self.knobs.delay):
            return Response(status_code=499)
        self.served.append(record)
        if not record["stream"]:
            return JSONResponse(answer)
        lines = [answer | {"finish_reason": None}, answer | {"text": ""}]
        body = (json.dumps(line) + "\n" for line in lines)
        return StreamingResponse(body, media_type="application/x-ndjson")

    async def _wait(self, request: Request, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                self.disconnects += 1
                return False
            await asyncio.sleep(0.01)
        return True

    async def _stream(self, record: dict[str, Any]) -> AsyncIterator[str]:
        finished = False
        try:
            await asyncio.sleep(self.knobs.delay)
            for i in range(self.knobs.chunks):
                if i:
                    await asyncio.sleep(self.knobs.chunk_delay)
                text = self.name if i == 0 else ""
                yield f"data: {json.dumps(_chunk(record['path'], text, None))}\n\n"
            yield f"data: {json.dumps(_chunk(record['path'], '', 'stop'))}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                self.served.append(record)
            else:
                self.disconnects += 1


def _answer(path: str, text: str) -> dict[str, Any]:
    if path == "/v1/chat/interactive":
        return {
            "text": text,
            "tokens": 1,
            "input_tokens": 2,
            "history_tokens": 0,
            "finish_reason": "stop",
        }
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    if path == "/v1/completions":
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {
            "id": "c",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": usage,
        }
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [choice],
        "usage": usage,
    }


def _chunk(path: str, text: str, finish: str | None) -> dict[str, Any]:
    if path == "/v1/completions":
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": "c",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
        }
    delta = {"role": "assistant", "content": text} if text else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [choice],
    }


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A blocking JSON request; returns (status, parsed body) for any status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail the test when it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def assert_openai_error(body: Any) -> dict[str, Any]:
    """The `error` object of an OpenAI error body, after checking its shape."""
    assert isinstance(body, dict) and set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


class Cluster:
    """Starts proxies and fake nodes for one test and stops them all afterwards."""

    def __init__(self) -> None:
        self.servers: list[ServerThread] = []

    def node(
        self, name: str, models: tuple[str, ...] = ("m",), **knobs: Any
    ) -> tuple[FakeNode, ServerThread]:
        fake = FakeNode(name, models)
        for key, value in knobs.items():
            setattr(fake.knobs, key, value)
        server = ServerThread(fake.app())
        self.servers.append(server)
        return fake, server.start()

    def proxy(self, host: str = "127.0.0.1", start: bool = True, **config: Any) -> ServerThread:
        """A proxy (admin key "admin-key", no health checks unless asked)."""
        config.setdefault("admin_key", "admin-key")
        config.setdefault("health_interval", 60.0)
        server = ServerThread(create_app(ProxyConfig(**config)), host=host, use_uvloop=True)
        self.servers.append(server)
        return server.start() if start else server

    def add(self, proxy: ServerThread, *nodes: ServerThread) -> None:
        for node in nodes:
            status, body = http("POST", f"{proxy.url}/nodes/add", {"url": node.url}, ADMIN)
            assert status == 200, body

    def close(self) -> None:
        # Ask them all first, so that their shutdowns overlap.
        for server in self.servers:
            server.server.should_exit = True
        for server in reversed(self.servers):
            server.stop()


def node_status(proxy: ServerThread) -> dict[str, Any]:
    """The proxy's /nodes/status, read with the admin key."""
    status, body = http("GET", f"{proxy.url}/nodes/status", headers=ADMIN)
    assert status == 200, body
    return body


def client(proxy: ServerThread, api_key: str = "none") -> openai.AsyncOpenAI:
    """The official async client against `proxy`, without its own retries."""
    return openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key=api_key, max_retries=0, timeout=20
    )


async def one_request(api: openai.AsyncOpenAI, i: int, model: str = "m") -> str:
    """Request number i: chat or completion, streamed every other time; returns the text."""
    stream = i % 2 == 0
    if i % 4 < 2:
        messages = [{"role": "user", "content": "hi"}]
        if not stream:
            reply = await api.chat.completions.create(model=model, messages=messages)
            return reply.choices[0].message.content
        chunks = await api.chat.completions.create(model=model, messages=messages, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks])
    if not stream:
        reply = await api.completions.create(model=model, prompt="hi")
        return reply.choices[0].text
    chunks = await api.completions.create(model=model, prompt="hi", stream=True)
    return "".join([c.choices[0].text async for c in chunks])


async def burst(proxy: ServerThread, n: int, model: str = "m") -> list[str]:
    """`n` concurrent requests (half streamed); their texts."""
    async with client(proxy) as api:
        return await asyncio.gather(*(one_request(api, i, model) for i in range(n)))
