"""The OpenAI-compatible API against a real server with the bundled SmolLM2, through the official
`openai` client (and raw SSE where the wire format itself is the point)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from server_harness import Server, chunks_of, start_server, stream_sse

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a brave little cat."}]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, server_logs: Path) -> Iterator[Server]:
    running = start_server(
        smollm2_dir, server_logs, "--session-len", "1024", model_name="SmolLM2-135M-Instruct"
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


def count_tokens(server: Server, **body: Any) -> int:
    reply = server.post("/tokenize", body)
    assert reply.status == 200, reply.body
    return reply.json()["count"]


def test_models_list(server: Server, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].object == "model" and models[0].owned_by


def test_chat_answers_the_question(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server.model, messages=QUESTION, temperature=0, max_tokens=20
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"


def test_chat_stream_equals_non_stream(server: Server, client: openai.OpenAI) -> None:
    common = dict(model=server.model, messages=STORY, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**common, logprobs=True)
    chunks = list(
        client.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == whole.choices[0].message.content
    assert [f for f in finishes if f] == [whole.choices[0].finish_reason] == ["length"]
    assert finishes[-1] == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Exact usage: the prompt as the server tokenizes it, one logprob entry per generated token.
    usage = whole.usage
    assert usage.prompt_tokens == count_tokens(server, messages=STORY)
    assert usage.completion_tokens == len(whole.choices[0].logprobs.content) == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_stream_equals_non_stream(server: Server, client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    common = dict(model=server.model, prompt=prompt, temperature=0, max_tokens=10)
    whole = client.completions.create(**common, logprobs=0)
    chunks = list(
        client.completions.create(**common, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.object == "text_completion"
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage == whole.usage
    usage = whole.usage
    assert usage.prompt_tokens == count_tokens(server, prompt=prompt)
    assert usage.completion_tokens == len(whole.choices[0].logprobs.tokens)
    assert "".join(whole.choices[0].logprobs.tokens) == whole.choices[0].text


def test_raw_sse_has_one_finish_per_choice_and_done_last(server: Server) -> None:
    async def run() -> list[list[dict[str, Any]]]:
        body = {"model": server.model, "temperature": 0.7, "seed": 3, "max_tokens": 12, "n": 2}
        async with aiohttp.ClientSession() as session:
            chat = await stream_sse(
                session,
                server,
                "/v1/chat/completions",
                {**body, "messages": QUESTION, "stream": True},
            )
            completion = await stream_sse(
                session, server, "/v1/completions", {**body, "prompt": "Once upon", "stream": True}
            )
        return [chunks_of(chat), chunks_of(completion)]

    for chunks in asyncio.run(run()):
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            finishes = [c["finish_reason"] for c in mine]
            assert finishes[-1] in ("stop", "length")
            assert all(f is None for f in finishes[:-1]), finishes


def test_n_two(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server.model, messages=STORY, n=2, temperature=1.0, seed=7, max_tokens=10
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.prompt_tokens == count_tokens(server, messages=STORY)
    assert reply.usage.completion_tokens <= 20
    completion = client.completions.create(
        model=server.model, prompt=["A", "B"], n=2, max_tokens=3, seed=1, temperature=1.0
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]


def test_chat_logprobs_shape(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    # The end-of-turn token has a logprob entry but no text.
    joined = "".join(t.token for t in content).removesuffix("<|im_end|>")
    assert joined == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_completion_logprobs_and_echo(server: Server, client: openai.OpenAI) -> None:
    prompt = "Paris is the capital of"
    reply = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, max_tokens=5, logprobs=2
    )
    lp = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n and lp.text_offset[0] == 0
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    echoed = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, max_tokens=5, echo=True
    )
    assert echoed.choices[0].text == prompt + reply.choices[0].text
    streamed = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, max_tokens=5, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_echo_with_logprobs_covers_the_prompt(server: Server, client: openai.OpenAI) -> None:
    prompt = "Paris is the capital of"
    reply = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, max_tokens=3, logprobs=1, echo=True
    )
    lp = reply.choices[0].logprobs
    prompt_tokens = reply.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + reply.usage.completion_tokens
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == reply.choices[0].text


@pytest.mark.parametrize("stop", ["Paris", "is Par", "France is"])
def test_stop_strings_never_appear(server: Server, client: openai.OpenAI, stop: str) -> None:
    common = dict(model=server.model, messages=QUESTION, temperature=0, max_tokens=20, stop=[stop])
    whole = client.chat.completions.create(**common)
    text = whole.choices[0].message.content
    assert stop not in text and whole.choices[0].finish_reason == "stop"
    assert "The capital of France is Paris".startswith(text)
    chunks = list(client.chat.completions.create(**common, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_same_seed_same_text(server: Server, client: openai.OpenAI) -> None:
    common = dict(model=server.model, messages=STORY, temperature=1.0, max_tokens=10)
    first = client.chat.completions.create(**common, seed=1234).choices[0].message.content
    again = client.chat.completions.create(**common, seed=1234).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**common, seed=1234, stream=True)
    )
    assert first == again == streamed


def test_max_completion_tokens_and_min_tokens(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server.model, messages=QUESTION, temperature=0, max_completion_tokens=3
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    longer = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        extra_body={"min_tokens": 11},
    )
    # "The capital of France is Paris." and its end-of-turn token are 8: EOS waits for 11.
    assert longer.usage.completion_tokens >= 11


EMOJI_PROMPT = "Emoji party: 🎉🎉🎉"


def test_chat_logprob_bytes_rebuild_the_content(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": EMOJI_PROMPT}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
    )
    content = reply.choices[0].logprobs.content
    assert any(entry.token.startswith("bytes:") for entry in content)  # a character split
    data = b"".join(bytes(entry.bytes) for entry in content)
    assert data.decode("utf-8", errors="replace") == reply.choices[0].message.content


@pytest.mark.parametrize("echo", [False, True])
def test_completion_text_offsets_streamed_and_not(
    server: Server, client: openai.OpenAI, echo: bool
) -> None:
    common = dict(
        model=server.model, prompt=EMOJI_PROMPT, temperature=0, max_tokens=6, logprobs=1, echo=echo
    )
    whole = client.completions.create(**common)
    text, lp = whole.choices[0].text, whole.choices[0].logprobs
    assert any(token.startswith("bytes:") for token in lp.tokens)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] < len(text)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    tokens, offsets, values, streamed = [], [], [], ""
    for chunk in client.completions.create(**common, stream=True):
        choice = chunk.choices[0]
        streamed += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
            values += choice.logprobs.token_logprobs
    assert streamed == text
    assert (tokens, offsets) == (lp.tokens, lp.text_offset)
    assert values == pytest.approx(lp.token_logprobs, abs=1e-4)
