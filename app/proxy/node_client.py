"""What `splitfuse serve --proxy-url URL` runs: join the proxy and keep re-joining (heartbeat).

Re-registering every interval brings the node back after a proxy restart or an ejection; a proxy
that is down is retried with a growing backoff, never fatally.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from app.proxy.nodes import normalize_base_url

log = structlog.get_logger("splitfuse.proxy.node")

_FIRST_RETRY = 0.25


class NodeRegistration:
    """Registers `node_url` with the proxy at `proxy_url` and heartbeats until stopped."""

    def __init__(
        self, proxy_url: str, node_url: str, admin_key: str | None = None, interval: float = 5.0
    ):
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self.proxy_url = normalize_base_url(proxy_url)
        self.node_url = normalize_base_url(node_url)
        self.interval = interval
        self.registered = False
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start heartbeating; returns at once (the node may not be listening yet)."""
        if self._task is not None:
            return
        timeout = aiohttp.ClientTimeout(total=max(self.interval, 5.0))
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._heartbeat(self._session), name="proxy-registration")

    async def stop(self) -> None:
        """Stop heartbeating and ask the proxy to drop this node (best effort)."""
        if self._task is None or self._session is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with self._session.post(
                f"{self.proxy_url}/nodes/remove",
                params={"node_url": self.node_url},
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=2.0),
            ) as resp:
                log.info("left the proxy", proxy=self.proxy_url, status=resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not leave the proxy", proxy=self.proxy_url, error=type(exc).__name__)
        finally:
            await self._session.close()
            self._task = self._session = None
            self.registered = False

    async def _heartbeat(self, session: aiohttp.ClientSession) -> None:
        backoff = min(_FIRST_RETRY, self.interval)
        while True:
            if await self._register(session):
                backoff = min(_FIRST_RETRY, self.interval)
                await asyncio.sleep(self.interval)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.interval)

    async def _register(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.post(
                f"{self.proxy_url}/nodes/add", json={"url": self.node_url}, headers=self._headers
            ) as resp:
                ok, problem = resp.status == 200, f"status {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, problem = False, type(exc).__name__
        if ok and not self.registered:
            log.info("registered with the proxy", proxy=self.proxy_url, node=self.node_url)
        elif not ok and self.registered:
            log.warning("lost the proxy", proxy=self.proxy_url, problem=problem)
        elif not ok:
            log.debug("proxy registration failed", proxy=self.proxy_url, problem=problem)
        self.registered = ok
        return ok
