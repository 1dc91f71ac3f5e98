"""The web UI's in-process backend: an AsyncEngine on the web server's own event loop.

Gradio runs async handlers on its server loop, so the engine loop coroutine starts there on the
first reply and every engine call below happens on that loop (the engine is not thread-safe).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.chat_template import ChatTemplate, ChatTemplateError
from app.engine.config import SamplingParams
from app.engine.engine import AsyncEngine, SessionBusyError
from app.ui.backend import BackendError, Delta, ModelInfo, Sampling


class EngineBackend:
    """Chats with a model loaded in this process; a chat's session id is its chat id."""

    def __init__(self, engine: AsyncEngine, template: ChatTemplate):
        self.engine = engine
        self.template = template
        self._running: dict[int, str] = {}  # chat id -> id of the request generating its reply

    @classmethod
    def load(cls, settings: Any) -> EngineBackend:
        """Load the model `settings` name (None: the bundled one)."""
        engine = AsyncEngine(settings.model, settings.engine)
        template = ChatTemplate.for_tokenizer(engine.tokenizer, settings.engine.chat_template)
        return cls(engine, template)

    async def info(self) -> ModelInfo:
        device = self.engine.info.device
        return ModelInfo(
            self.engine.model_name, self.engine.max_model_len, f"in-process engine ({device})"
        )

    def _prompt_ids(
        self, chat_id: int, messages: list[dict[str, str]], interactive: bool
    ) -> tuple[list[int], int]:
        """The token ids to send and the number of history tokens the session already holds."""
        session = self.engine.scheduler.sessions.get(chat_id) if interactive else None
        tail = self.engine.session_tail(chat_id) if interactive else None
        try:
            text = self.template.render_turn(messages if tail is None else messages[-1:], tail)
        except ChatTemplateError as exc:
            raise BackendError(str(exc)) from None
        history = len(session.history) if session is not None else 0
        return self.engine.tokenizer.encode(text, add_special_tokens=False), history

    async def reply(
        self, chat_id: int, messages: list[dict[str, str]], interactive: bool, sampling: Sampling
    ) -> AsyncIterator[Delta]:
        engine = self.engine
        ids, history = self._prompt_ids(chat_id, messages, interactive)
        room = engine.max_model_len - history - len(ids)
        if room < 1:
            yield Delta("", 0, "length", self._full_message())
            return
        params = SamplingParams(
            max_new_tokens=min(sampling.max_tokens, room),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
        )
        request_id = f"ui-{chat_id}-{uuid.uuid4().hex[:8]}"
        self._running[chat_id] = request_id
        stream = engine.generate(
            ids, params, request_id, session_id=chat_id if interactive else None
        )
        try:
            async for out in stream:
                message = out.error
                used = history + out.prompt_tokens + out.completion_tokens
                if out.finish_reason == "length" and used >= engine.max_model_len:
                    message = self._full_message()
                yield Delta(out.text, out.completion_tokens, out.finish_reason, message)
        except (ValueError, SessionBusyError) as exc:
            raise BackendError(str(exc)) from None
        finally:
            # Leaving early (the page went away) aborts the request: engine.generate's contract.
            await stream.aclose()
            if self._running.get(chat_id) == request_id:
                del self._running[chat_id]

    def _full_message(self) -> str:
        return (
            f"the conversation reached the context length ({self.engine.max_model_len} tokens); "
            "Reset to start over"
        )

    async def cancel(self, chat_id: int) -> None:
        request_id = self._running.get(chat_id)
        if request_id is not None:
            self.engine.abort(request_id)

    async def reset(self, chat_id: int) -> None:
        await self.cancel(chat_id)
        self.engine.end_session(chat_id)

    def close(self) -> None:
        self.engine.shutdown()
