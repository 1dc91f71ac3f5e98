"""Tokenizer work the routes hand to a worker thread when it is large, so that the event loop
keeps streaming other requests meanwhile."""

from __future__ import annotations

import asyncio
import threading

from app.routes import generation as gen


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
