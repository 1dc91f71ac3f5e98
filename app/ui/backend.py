"""What the web page needs from whatever answers it: one small interface, two implementations.

`EngineBackend` (engine_backend.py) runs the model in this process; `ApiBackend` (api_backend.py)
talks to a running server. The page code sees only `ChatBackend`, so both modes share it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class BackendError(RuntimeError):
    """A failure to show the user as a message (bad settings, server unreachable, ...)."""


@dataclass(frozen=True)
class Sampling:
    """The page's sampling controls."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40  # 0: no top-k cut
    max_tokens: int = 512


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int | None  # None when the server does not report it (the proxy)
    where: str  # how the page reaches the model, e.g. "in-process engine (cpu)"


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed reply; the last one carries `finish_reason`."""

    text: str
    tokens: int = 0  # tokens generated so far in this reply
    finish_reason: str | None = None  # stop | length | abort | error
    message: str | None = None  # why the reply ended early, or a warning about the turn


class ChatBackend(Protocol):
    """A conversation is identified by `chat_id` (one per browser tab).

    `messages` is always the whole conversation, system prompt first, ending with the new user
    message. With `interactive` the backend keeps the history as an engine session, and once the
    session holds it sends only the new message; without it the whole conversation is sent.
    """

    async def info(self) -> ModelInfo: ...

    def reply(
        self, chat_id: int, messages: list[dict[str, str]], interactive: bool, sampling: Sampling
    ) -> AsyncIterator[Delta]: ...

    async def cancel(self, chat_id: int) -> None:
        """Stop the reply being generated for `chat_id` (the engine request is aborted)."""

    async def reset(self, chat_id: int) -> None:
        """Stop any running reply and end the chat's session: the next turn starts afresh."""

    def close(self) -> None:
        """Release what the backend holds; called once the web server has stopped."""
