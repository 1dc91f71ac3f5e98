"""Streaming chunks of chat and completions: the role first, then content deltas, each sample's
finish_reason once on its last chunk, then the optional usage chunk (sse() adds `[DONE]`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.engine.engine import RequestOutput
from app.routes.chat_output import ChoiceParser
from app.routes.formatting import (
    TextOffsets,
    Usage,
    chat_logprobs,
    completion_logprobs,
    completion_logprobs_echoed,
    engine_error,
)


async def chat_chunks(
    ctx: Any,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    head: dict[str, Any],
    n: int,
    prompt_len: int,
    include_usage: bool,
    continuous: bool,
    parsers: Callable[[], ChoiceParser] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """With `parsers`, each choice's text goes through its own ChoiceParser (reasoning, tool
    calls); otherwise it is streamed as content unchanged."""
    tokenizer = ctx.engine.tokenizer
    base = {**head, "model": ctx.model_name, "system_fingerprint": None}
    usage = Usage(prompt_len)
    choices = {i: parsers() for i in range(n)} if parsers is not None else {}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> Any:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": usage.body()} if continuous else {})}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""}, None, None)
    async for p, out in outputs:
        usage.add(p, out)
        if out.finish_reason == "error":
            yield engine_error(out)
            return
        parser = choices.get(out.index)
        if parser is None:
            delta = {"content": out.text} if out.text else {}
        else:
            delta = parser.feed(out.text)
        if delta or out.logprobs:
            yield chunk(
                out.index, delta or {"content": ""}, chat_logprobs(tokenizer, out.logprobs), None
            )
        if out.finished:
            if parser is None:
                yield chunk(out.index, {}, None, out.finish_reason)
                continue
            last = parser.finish()
            if last:
                yield chunk(out.index, last, None, None)
            yield chunk(out.index, {}, None, parser.finish_reason(out.finish_reason))
    if include_usage:
        yield {**base, "choices": [], "usage": usage.body()}


async def completion_chunks(
    ctx: Any,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    head: dict[str, Any],
    n: int,
    prompts: list[list[int]],
    echoed: list[str] | None,
    echo_logprobs: bool,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[dict[str, Any]]:
    tokenizer = ctx.engine.tokenizer
    base = {**head, "model": ctx.model_name, "system_fingerprint": None}
    usage = Usage(sum(len(p) for p in prompts))
    offsets: defaultdict[int, TextOffsets] = defaultdict(TextOffsets)

    def chunk(slot: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": slot, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": usage.body()} if continuous else {})}

    # With logprobs, a prompt's echo waits for its logprobs, which come on a sample's first delta.
    unechoed = set(range(n * len(prompts))) if echoed else set()
    if not echo_logprobs:
        for slot in sorted(unechoed):
            yield chunk(slot, echoed[slot // n], None, None)
        unechoed.clear()
    async for p, out in outputs:
        slot = p * n + out.index
        usage.add(p, out)
        if out.finish_reason == "error":
            yield engine_error(out)
            return
        if slot in unechoed:
            unechoed.discard(slot)
            prompt = (prompts[p], out.prompt_logprobs or [])
            logprobs = await completion_logprobs_echoed(tokenizer, [], offsets[slot], prompt)
            yield chunk(slot, echoed[p], logprobs, None)
        if out.text or out.logprobs or out.finished:
            logprobs = completion_logprobs(tokenizer, out.logprobs, offsets[slot])
            yield chunk(slot, out.text, logprobs, out.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": usage.body()}
