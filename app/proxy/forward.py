"""Forwarding one OpenAI request to a node: choose, retry before the first byte, relay the stream.

A request moves to another node only while nothing of its response has reached the client
(refused or dropped connection, connect timeout, a 5xx, a stream that died before its first
chunk). A client that goes away cancels the upstream request, which closes the connection to
the node so that the node aborts the generation too.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import APIError, error_body, error_response
from app.proxy.nodes import Node, NodeRegistry
from app.proxy.strategies import Strategy, choose

log = structlog.get_logger("splitfuse.proxy")

T = TypeVar("T")

INTERACTIVE_PATH = "/v1/chat/interactive"
# Headers of a node's answer that mean something to the client; hop-by-hop ones stay behind.
_PASSED_HEADERS = ("content-type", "cache-control", "retry-after")


class ClientDisconnected(Exception):
    """The client went away before its response was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (call only after the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[T], disconnect: asyncio.Future[None]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait((task, disconnect), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    # Let the cancelled work close its connection before the caller moves on.
    await asyncio.wait((task,))
    raise ClientDisconnected


@dataclass
class _Reply:
    """A node's answer, up to its first chunk when it streams or whole when it does not."""

    resp: aiohttp.ClientResponse
    data: bytes
    streaming: bool

    def headers(self) -> dict[str, str]:
        return {k: v for k in _PASSED_HEADERS if (v := self.resp.headers.get(k)) is not None}


@dataclass
class Forwarder:
    """Sends requests to nodes through one shared aiohttp session."""

    session: aiohttp.ClientSession
    registry: NodeRegistry
    strategy: Strategy
    node_headers: dict[str, str]
    request_timeout: float
    max_body_bytes: int
    rng: random.Random

    async def handle(self, request: Request, path: str) -> Response:
        """Forward `request` (an OpenAI POST) to a node serving its model."""
        payload, body = await self._read_json(request)
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string", param="model")
        session = _session_key(payload) if path == INTERACTIVE_PATH else None
        # With no healthy node, an unknown model cannot be told from one whose nodes are down.
        if (
            model is not None
            and self.registry.healthy_nodes()
            and not self.registry.knows_model(model)
        ):
            raise APIError(
                404,
                f"The model '{model[:256]}' does not exist",
                param="model",
                code="model_not_found",
            )
        headers = {
            **self.node_headers,
            "Content-Type": "application/json",
            "X-Request-Id": request.state.request_id,
        }
        disconnect = asyncio.ensure_future(wait_for_disconnect(request.receive))
        response: Response | None = None
        try:
            response, node = await self._dispatch(
                path, body, headers, model, session, payload.get("stream") is True, disconnect
            )
        except ClientDisconnected:
            log.info("client disconnected before the response started", path=path)
            return Response(status_code=499)
        finally:
            if not isinstance(response, _Relay):
                disconnect.cancel()
        if path == INTERACTIVE_PATH and node is not None and response.status_code < 300:
            # A new session (no id, or -1) is numbered by the node: its answer tells which.
            session = session or _answered_session(response)
            if session is not None:
                self._track_session(session, payload, node.url)
        return response

    async def _read_json(self, request: Request) -> tuple[dict[str, Any], bytes]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, "the request body is too large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, "the request body is too large")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise APIError(400, "the request body must be a JSON object")
        return payload, body

    async def _dispatch(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        model: str | None,
        session: str | None,
        stream: bool,
        disconnect: asyncio.Future[None],
    ) -> tuple[Response, Node | None]:
        """The response of the first node that answers without failing, and that node."""
        tried: set[str] = set()
        failure: Response | None = None
        while (node := self._pick(model, session, tried)) is not None:
            tried.add(node.url)
            response, retry = await self._attempt(node, path, body, headers, stream, disconnect)
            if response is not None and not retry:
                return response, node
            failure = response or failure
        if failure is not None:
            return failure, None
        log.warning("no healthy node for the request", model=model, tried=len(tried))
        raise APIError(
            503,
            "no healthy node is serving this model now; retry later",
            code="no_healthy_node",
            headers={"Retry-After": "1"},
        )

    def _pick(self, model: str | None, session: str | None, tried: set[str]) -> Node | None:
        if session is not None:
            node = self.registry.session_node(session)
            if (
                node is not None
                and node.healthy
                and node.url not in tried
                and (model is None or model in node.models)
            ):
                return node
        candidates = self.registry.candidates(model, tried)
        if not candidates:
            return None
        return candidates[choose(self.strategy, candidates, self.rng)]

    async def _attempt(
        self,
        node: Node,
        path: str,
        body: bytes,
        headers: dict[str, str],
        stream: bool,
        disconnect: asyncio.Future[None],
    ) -> tuple[Response | None, bool]:
        """One node's try: (response, whether to try another node)."""
        started = time.monotonic()
        node.unfinished += 1
        relayed = False
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    reply = await until_disconnect(
                        self._open(node.url + path, body, headers, stream), disconnect
                    )
            except aiohttp.ClientError as exc:
                log.warning("node request failed", node=node.url, error=type(exc).__name__)
                self.registry.request_failed(node)
                return None, True
            except TimeoutError:
                log.warning("node did not answer in time", node=node.url)
                # The loop's timer may fire a fraction of a millisecond early (uvloop rounds to
                # milliseconds); the node took at least the whole timeout.
                waited = max(time.monotonic() - started, self.request_timeout)
                self.registry.request_failed(node, waited)
                return error_response(
                    504, "the node did not answer in time", code="upstream_timeout"
                ), False
            if reply.resp.status >= 500:
                log.warning("node answered an error", node=node.url, status=reply.resp.status)
                self.registry.request_failed(node)
                return _buffered(reply), True
            if not reply.streaming:
                ok = reply.resp.status < 300
                self.registry.request_succeeded(node, time.monotonic() - started if ok else None)
                log.info("request served", node=node.url, status=reply.resp.status)
                return _buffered(reply), False
            relayed = True
            return _Relay(self.registry, node, reply, started, disconnect), False
        finally:
            if not relayed:
                node.unfinished -= 1

    async def _open(self, url: str, body: bytes, headers: dict[str, str], stream: bool) -> _Reply:
        resp = await self.session.post(url, data=body, headers=headers)
        try:
            if stream and resp.status < 300:
                # Holding back the first chunk keeps a stream that dies at once retryable.
                first = await resp.content.readany()
                if not first:
                    raise aiohttp.ClientPayloadError("the node ended the stream at once")
                # An ndjson stream's first line names its session: hold back all of that line.
                while resp.content_type == "application/x-ndjson" and b"\n" not in first:
                    more = await resp.content.readany()
                    if not more:
                        break
                    first += more
                return _Reply(resp, first, streaming=True)
            return _Reply(resp, await resp.read(), streaming=False)
        except BaseException:
            resp.close()
            raise

    def _track_session(self, session: str, payload: dict[str, Any], url: str) -> None:
        if payload.get("interactive_mode"):
            self.registry.bind_session(session, url)
        elif not payload.get("cancel"):
            self.registry.forget_session(session)


def _session_key(payload: dict[str, Any]) -> str | None:
    """The interactive session a request continues; None when it has none to stick to."""
    session_id = payload.get("session_id")
    if isinstance(session_id, int) and not isinstance(session_id, bool) and session_id >= 0:
        return str(session_id)
    if isinstance(session_id, str) and 0 < len(session_id) <= 256:
        return session_id
    return None


def _answered_session(response: Response) -> str | None:
    """The session id in a node's interactive answer: its JSON body or first ndjson line."""
    data = response.first_chunk if isinstance(response, _Relay) else response.body
    try:
        answer = orjson.loads(data.split(b"\n", 1)[0])
    except orjson.JSONDecodeError:
        return None
    return _session_key(answer) if isinstance(answer, dict) else None


def _buffered(reply: _Reply) -> Response:
    return Response(reply.data, status_code=reply.resp.status, headers=reply.headers())


class _Relay(StreamingResponse):
    """A node's streamed answer passed on chunk by chunk; closing it settles the node's stats."""

    def __init__(
        self,
        registry: NodeRegistry,
        node: Node,
        reply: _Reply,
        started: float,
        disconnect: asyncio.Future[None],
    ):
        self._registry, self._node, self._reply = registry, node, reply
        self._started, self._disconnect = started, disconnect
        self._outcome = "client disconnected"
        self.first_chunk = reply.data
        super().__init__(self._chunks(), status_code=reply.resp.status, headers=reply.headers())

    async def _chunks(self) -> AsyncIterator[bytes]:
        chunk, last = self._reply.data, b""
        content = self._reply.resp.content
        try:
            while chunk:
                yield chunk
                last = chunk
                chunk = await until_disconnect(content.readany(), self._disconnect)
            self._outcome = "done"
        except ClientDisconnected:
            return
        except aiohttp.ClientError:
            self._outcome = "node failed"
            if self._reply.resp.content_type == "text/event-stream":
                yield _sse_error_tail(last)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()

    def _close(self) -> None:
        self._disconnect.cancel()
        node, resp = self._node, self._reply.resp
        node.unfinished -= 1
        if self._outcome == "done":
            resp.release()
            self._registry.request_succeeded(node, time.monotonic() - self._started)
        else:
            # Closing the connection is what tells the node to abort the generation.
            resp.close()
            if self._outcome == "node failed":
                self._registry.request_failed(node)
        log.info("stream ended", node=node.url, outcome=self._outcome)


def _sse_error_tail(last: bytes) -> bytes:
    """An error event and [DONE] after a stream the node broke off, ending any partial event."""
    event = orjson.dumps(
        error_body(500, "the node serving this request failed mid-stream", code="upstream_error")
    )
    separator = b"" if last.endswith(b"\n\n") else b"\n\n"
    return separator + b"data: " + event + b"\n\ndata: [DONE]\n\n"
