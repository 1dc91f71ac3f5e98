"""The web UI's client backend: a running splitfuse server (or proxy) through /v1/chat/interactive.

Replies stream as newline-delimited JSON. The chat id is the server-side session id, so a Stop
is a `cancel` request for that session: the server aborts the turn whatever the connection does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from app.ui.backend import BackendError, Delta, ModelInfo, Sampling

INTERACTIVE_PATH = "/v1/chat/interactive"


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The OpenAI-style error message of a failed response, or its status line."""
    try:
        body = await response.json(content_type=None)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return f"HTTP {response.status} {response.reason or ''}".strip()


def _failure(url: str, exc: Exception) -> BackendError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendError(f"cannot reach {url} ({exc.os_error})")
    return BackendError(f"the connection to {url} failed: {exc}")


class ApiBackend:
    """Chats through a server's /v1/chat/interactive endpoint."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A connection attempt fails fast; a reply may take as long as the model needs.
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=10.0)
        self._live: set[int] = set()  # chats whose server session holds their history

    def _session(self) -> aiohttp.ClientSession:
        # One HTTP session per call: it lives and dies on the loop of the handler that uses it.
        return aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)

    async def _post(self, body: dict[str, Any]) -> int:
        """A short control request (cancel, end session); returns the status."""
        try:
            async with (
                self._session() as http,
                http.post(self.url + INTERACTIVE_PATH, json=body) as r,
            ):
                if r.status not in (200, 404):  # 404: the session had already ended
                    raise BackendError(await _error_message(r))
                return r.status
        except aiohttp.ClientError as exc:
            raise _failure(self.url, exc) from None

    async def info(self) -> ModelInfo:
        try:
            async with self._session() as http, http.get(self.url + "/v1/models") as response:
                if response.status != 200:
                    raise BackendError(await _error_message(response))
                models = (await response.json(content_type=None)).get("data") or []
        except (aiohttp.ClientError, ValueError) as exc:
            raise _failure(self.url, exc) from None
        if not models:
            raise BackendError(f"{self.url} serves no model yet")
        card = models[0]
        return ModelInfo(str(card["id"]), card.get("max_model_len"), f"server {self.url}")

    async def reply(
        self, chat_id: int, messages: list[dict[str, str]], interactive: bool, sampling: Sampling
    ) -> AsyncIterator[Delta]:
        continuing = interactive and chat_id in self._live
        body = {
            "prompt": messages[-1:] if continuing else messages,
            "session_id": chat_id,
            "interactive_mode": interactive,
            "stream": True,
            "request_output_len": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
        }
        if not interactive:  # the server ends the chat's session before such a turn
            self._live.discard(chat_id)
        try:
            async with (
                self._session() as http,
                http.post(self.url + INTERACTIVE_PATH, json=body) as response,
            ):
                if response.status != 200:
                    raise BackendError(await _error_message(response))
                if interactive:
                    self._live.add(chat_id)
                first = True
                async for line in response.content:
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    message = item.get("message") or item.get("error")
                    if first and continuing and not item.get("history_tokens"):
                        message = message or (
                            "the server had ended this session (idle too long): the model saw "
                            "only your last message"
                        )
                    first = False
                    yield Delta(
                        item.get("text", ""),
                        item.get("tokens", 0),
                        item.get("finish_reason"),
                        str(message) if message else None,
                    )
        except (aiohttp.ClientError, ValueError) as exc:
            raise _failure(self.url, exc) from None

    async def cancel(self, chat_id: int) -> None:
        await self._post({"prompt": "", "session_id": chat_id, "cancel": True})

    async def reset(self, chat_id: int) -> None:
        self._live.discard(chat_id)
        await self._post({"prompt": "", "session_id": chat_id, "interactive_mode": False})

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own HTTP session."""
