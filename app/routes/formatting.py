"""OpenAI's shapes for what the engine streams back: logprobs, usage, SSE framing."""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import EventSourceResponse

from app.engine.detokenizer import token_listing
from app.engine.engine import RequestOutput
from app.engine.outputs import TokenLogprob
from app.errors import APIError, error_body
from app.routes.generation import in_thread_if

log = logging.getLogger("splitfuse.server")


def _logprob_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text, data = token_listing(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(data)}


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for lp in logprobs:
        entry = _logprob_entry(tokenizer, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_logprob_entry(tokenizer, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


class TextOffsets:
    """Where each token of one completion starts in its text, in characters: the tokens' bytes
    are decoded as they come, so a token inside a multi-byte character starts where that
    character does."""

    def __init__(self) -> None:
        self._chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, data: bytes) -> int:
        """The offset of a token of these bytes, which the text then holds."""
        start = self._chars
        self._chars += len(self._decoder.decode(data))
        return start


def completion_logprobs(
    tokenizer: Any,
    logprobs: list[TokenLogprob] | None,
    offsets: TextOffsets,
    prompt: tuple[list[int], list[float]] | None = None,
) -> dict[str, Any] | None:
    """The legacy shape; `prompt` (ids, logprobs of ids[1:]) leads it when echo asks for it."""
    if logprobs is None:
        return None
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def add(token_id: int, value: float | None) -> str:
        text, data = token_listing(tokenizer, token_id)
        tokens.append(text)
        values.append(value)
        text_offset.append(offsets.advance(data))
        return text

    if prompt is not None:
        ids, prompt_values = prompt
        for i, token_id in enumerate(ids):
            # The first prompt token has no context, so no logprob (as OpenAI answers); the
            # others list themselves as their top logprobs.
            value = prompt_values[i - 1] if 0 < i <= len(prompt_values) else None
            text = add(token_id, value)
            tops.append(None if value is None else {text: value})
    for lp in logprobs:
        add(lp.token_id, lp.logprob)
        tops.append({token_listing(tokenizer, t)[0]: v for t, v in lp.top} or None)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": text_offset,
    }


# Listing a prompt token costs ~3 us: an echoed prompt this long is listed in a worker thread.
THREAD_LISTING_TOKENS = 10_000


async def completion_logprobs_echoed(
    tokenizer: Any,
    logprobs: list[TokenLogprob],
    offsets: TextOffsets,
    prompt: tuple[list[int], list[float]],
) -> dict[str, Any] | None:
    """`completion_logprobs` led by an echoed prompt, off the event loop when it is long."""
    large = len(prompt[0]) >= THREAD_LISTING_TOKENS
    return await in_thread_if(large, completion_logprobs, tokenizer, logprobs, offsets, prompt)


class Usage:
    """A request's token counts as its deltas arrive, for any number of prompts and samples.

    Cached tokens are counted once per prompt (from its first sample): its siblings share the
    prompt's KV, which no client would call a cache hit.
    """

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self._completion: dict[tuple[int, int], int] = {}
        self._cached: dict[int, int] = {}

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self._completion[(prompt_index, out.index)] = out.completion_tokens
        if out.index == 0:
            self._cached[prompt_index] = out.cached_tokens

    def body(self) -> dict[str, Any]:
        completion = sum(self._completion.values())
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached.values())},
        }


def generation_error(message: str | None, code: str | None) -> APIError:
    """A failed request's error (RequestOutput's `error`, `error_code`): 400 when its own input
    caused it (`code`, e.g. a grammar the vocabulary cannot continue), else 500."""
    if code:
        return APIError(400, message or "the request cannot be served", code=code)
    return APIError(500, message or "generation failed", code="engine_error")


def engine_error(out: RequestOutput) -> dict[str, Any]:
    """The event a stream ends with when its request failed."""
    error = generation_error(out.error, out.error_code)
    return error_body(error.status, error.message, code=error.code)


def sse(chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """Chunks as SSE `data:` events, then `[DONE]`: also after an error, which becomes an event
    (the status line has been sent by then)."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield orjson.dumps(chunk).decode()
        except Exception:
            log.exception("a stream failed")
            yield orjson.dumps(error_body(500, "internal server error")).decode()
        yield "[DONE]"

    return _EventStream(events(), ping=15, sep="\n")


class _EventStream(EventSourceResponse):
    """sse-starlette's response, minus the cancel scope it opens around every send to apply a
    per-send timeout: none is set here, and at one event per token the scope cost more than
    the send itself."""

    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
        else:
            await send(message)
