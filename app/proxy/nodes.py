"""The proxy's node registry: which nodes exist, what they serve, how loaded and how healthy.

A node that fails `max_failures` health checks in a row, or as many requests in a row (refused
connections, 5xx, timeouts), is ejected: kept but skipped. A passing health check restores it;
one that stays ejected for `node_expiry` seconds is removed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

log = structlog.get_logger("splitfuse.proxy")

# LMDeploy's proxy averages the last 15 request latencies for min_observed_latency.
LATENCY_WINDOW = 15

_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/\[\]-]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class NodeUnavailable(Exception):
    """A node did not answer its health or models endpoint as a working node does."""


def normalize_base_url(url: str) -> str:
    """The canonical form of a server's base URL; ValueError if it is not a plain http(s) URL."""
    if not isinstance(url, str) or len(url) > 2048 or not _URL_CHARS.fullmatch(url):
        raise ValueError("the URL must be an http:// or https:// URL of plain characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("the URL must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("the URL must not carry credentials, a query or a fragment")
    scheme = parts.scheme.lower()
    try:
        port = parts.port  # urlsplit validates the port lazily, on access
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    if port == 0:
        raise ValueError("the URL has an invalid port")
    segments = parts.path.split("/")
    if ".." in segments:
        raise ValueError("the URL has an invalid path")
    path = "/".join(s for s in segments if s != ".").rstrip("/")
    host = parts.hostname
    if ":" in host:
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ValueError("the URL has an invalid IPv6 host") from None
        host = f"[{host}]"
    # One spelling per server, so that it cannot be registered twice under two.
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


@dataclass
class Node:
    """One registered node, its models and the load numbers the strategies read."""

    url: str
    models: list[str]
    speed: float | None = None
    unfinished: int = 0
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    healthy: bool = True
    request_failures: int = 0
    health_failures: int = 0
    ejected_at: float | None = None

    def status(self) -> dict[str, Any]:
        """The node as /nodes/status shows it (LMDeploy's field names, plus health)."""
        return {
            "models": list(self.models),
            "unfinished": self.unfinished,
            "latency": list(self.latency),
            "speed": self.speed,
            "healthy": self.healthy,
            "request_failures": self.request_failures,
            "health_failures": self.health_failures,
        }


class NodeRegistry:
    """Nodes by URL, their health bookkeeping, and which node holds each interactive session."""

    def __init__(
        self,
        max_failures: int = 3,
        node_expiry: float = 60.0,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.nodes: dict[str, Node] = {}
        self.max_failures = max_failures
        self.node_expiry = node_expiry
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def upsert(self, url: str, models: list[str], speed: float | None = None) -> Node:
        """Add a node, or refresh a known one (its models, speed, and health) keeping its stats."""
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Node(url, list(models), speed)
            log.info("node added", node=url, models=models)
            return node
        node.models = list(models)
        if speed is not None:
            node.speed = speed
        self._restore(node)
        return node

    def remove(self, url: str) -> bool:
        """Forget a node and the sessions it held; False if it was not registered."""
        if self.nodes.pop(url, None) is None:
            return False
        for key in [k for k, v in self._sessions.items() if v == url]:
            del self._sessions[key]
        log.info("node removed", node=url)
        return True

    def knows_model(self, model: str) -> bool:
        """Whether any registered node, healthy or not, lists `model`."""
        return any(model in n.models for n in self.nodes.values())

    def healthy_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.healthy]

    def candidates(self, model: str | None, exclude: set[str]) -> list[Node]:
        """Healthy nodes serving `model` (any model when None), minus the URLs in `exclude`."""
        return [
            n
            for n in self.healthy_nodes()
            if n.url not in exclude and (model is None or model in n.models)
        ]

    def models(self) -> list[str]:
        """The union of the healthy nodes' models, in first-seen order."""
        return list(dict.fromkeys(m for n in self.healthy_nodes() for m in n.models))

    def session_node(self, session: str) -> Node | None:
        """The registered node that served `session` before, if any."""
        url = self._sessions.get(session)
        if url is None:
            return None
        self._sessions.move_to_end(session)
        return self.nodes.get(url)

    def bind_session(self, session: str, url: str) -> None:
        """Remember that `url` holds `session`; the least recently used binding goes first."""
        self._sessions[session] = url
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def forget_session(self, session: str) -> None:
        self._sessions.pop(session, None)

    def request_succeeded(self, node: Node, latency: float | None) -> None:
        """A request got an answer below 500; `latency` is its duration when it succeeded."""
        node.request_failures = 0
        if latency is not None:
            node.latency.append(latency)

    def request_failed(self, node: Node, latency: float | None = None) -> None:
        """A request met a refused connection, a dropped connection, a 5xx or a timeout.

        `latency` is how long a timed-out request waited: a stuck node's history shows it.
        """
        node.request_failures += 1
        if latency is not None:
            node.latency.append(latency)
        if node.request_failures >= self.max_failures:
            self._eject(node, "requests failing")

    def health_checked(self, node: Node, models: list[str] | None) -> None:
        """Record one health check: the node's models when it passed, None when it failed."""
        if models is not None:
            node.models = models
            self._restore(node)
            return
        node.health_failures += 1
        if node.health_failures >= self.max_failures:
            self._eject(node, "health checks failing")

    def expire(self) -> list[str]:
        """Remove the nodes ejected for longer than `node_expiry`; returns their URLs."""
        now = self._clock()
        gone = [
            n.url
            for n in self.nodes.values()
            if n.ejected_at is not None and now - n.ejected_at >= self.node_expiry
        ]
        for url in gone:
            self.remove(url)
        return gone

    def _eject(self, node: Node, reason: str) -> None:
        if node.healthy:
            node.healthy = False
            node.ejected_at = self._clock()
            log.warning("node ejected", node=node.url, reason=reason)

    def _restore(self, node: Node) -> None:
        node.request_failures = node.health_failures = 0
        if not node.healthy:
            node.healthy, node.ejected_at = True, None
            log.info("node restored", node=node.url)


async def probe_node(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], timeout: float
) -> list[str]:
    """The model ids a node serves, after checking its /health; NodeUnavailable if it fails."""
    limit = aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.get(f"{url}/health", headers=headers, timeout=limit) as resp:
            if resp.status != 200:
                raise NodeUnavailable(f"{url}/health answered {resp.status}")
        async with session.get(f"{url}/v1/models", headers=headers, timeout=limit) as resp:
            if resp.status != 200:
                raise NodeUnavailable(f"{url}/v1/models answered {resp.status}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise NodeUnavailable(f"{url} is not reachable ({type(exc).__name__})") from exc
    try:
        models = [str(card["id"]) for card in body["data"]]
    except (KeyError, TypeError) as exc:
        raise NodeUnavailable(f"{url}/v1/models did not answer an OpenAI model list") from exc
    if not models:
        raise NodeUnavailable(f"{url} serves no model")
    return models


async def monitor_health(
    registry: NodeRegistry,
    session: aiohttp.ClientSession,
    headers: Mapping[str, str],
    interval: float,
) -> None:
    """Check every node each `interval` seconds, forever; the lifespan cancels it."""
    while True:
        await asyncio.sleep(interval)
        nodes = list(registry.nodes.values())
        results = await asyncio.gather(
            *(probe_node(session, n.url, headers, timeout=max(interval, 1.0)) for n in nodes),
            return_exceptions=True,
        )
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                log.info("health check failed", node=node.url, reason=str(result))
                registry.health_checked(node, None)
            else:
                registry.health_checked(node, result)
        registry.expire()
