"""Tokenizer work the routes hand to a worker thread when it is large, so that the event loop
keeps streaming other requests meanwhile."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from app.engine.outputs import TokenLogprob
from app.routes import formatting
from app.routes import generation as gen
from app.routes.formatting import TextOffsets


class _RecordingTokenizer:
    """Notes the thread each call runs on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return [len(text)]

    def decode(self, ids: list[int]) -> str:
        self.threads.append(threading.current_thread())
        return ",".join(map(str, ids))


def test_long_texts_and_echoed_prompts_leave_the_event_loop() -> None:
    tokenizer = _RecordingTokenizer()
    long_ids = list(range(gen.THREAD_DECODE_TOKENS))

    async def calls() -> list[object]:
        return [
            await gen.encode(tokenizer, "short"),
            await gen.encode(tokenizer, "x" * gen.THREAD_ENCODE_CHARS),
            await gen.decode(tokenizer, [1, 2]),
            await gen.decode(tokenizer, long_ids),
        ]

    results = asyncio.run(calls())
    assert results == [[5], [gen.THREAD_ENCODE_CHARS], "1,2", ",".join(map(str, long_ids))]
    on_loop = [t is threading.current_thread() for t in tokenizer.threads]
    assert on_loop == [True, False, True, False]


def test_long_echoed_prompts_are_listed_off_the_event_loop(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    listing = formatting.completion_logprobs

    def recorded(*args: Any) -> dict[str, Any] | None:
        threads.append(threading.current_thread())
        return listing(*args)

    monkeypatch.setattr(formatting, "completion_logprobs", recorded)
    sampled = [TokenLogprob(token_id=11, logprob=-0.5, top=[(11, -0.5)])]

    async def echo(ids: list[int]) -> dict[str, Any] | None:
        prompt = (ids, [-1.0] * (len(ids) - 1))
        return await formatting.completion_logprobs_echoed(
            tokenizer, sampled, TextOffsets(), prompt
        )

    short_ids = tokenizer.encode("Hello there, world")
    long_ids = (short_ids * formatting.THREAD_LISTING_TOKENS)[: formatting.THREAD_LISTING_TOKENS]
    short, long = asyncio.run(echo(short_ids)), asyncio.run(echo(long_ids))
    assert [t is threading.current_thread() for t in threads] == [True, False]
    assert short == listing(
        tokenizer, sampled, TextOffsets(), (short_ids, [-1.0] * (len(short_ids) - 1))
    )
    assert long is not None and len(long["tokens"]) == len(long_ids) + 1
    assert "".join(long["tokens"][:-1]) == tokenizer.decode(long_ids)
