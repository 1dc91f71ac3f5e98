"""Streams under load and clients that leave: 64 concurrent streams, disconnects mid-stream and
while waiting for a whole answer, request ids in headers and logs (shared tiny server)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp
import pytest
from server_harness import Server, chunks_of, stream_sse

RUNNING = "splitfuse:num_requests_running"
KV_USAGE = "splitfuse:kv_cache_usage_perc"
ABORTED = "splitfuse:request_success_total{finished_reason=abort}"
LONG = {"prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "temperature": 0}


def wait_for_running(server: Server, count: int = 1) -> None:
    server.wait_for(lambda m: m[RUNNING] >= count, timeout=30)


def test_64_concurrent_streams_end_with_done(tiny_server: Server) -> None:
    body = {"max_tokens": 12, "temperature": 0, "stream": True}
    bodies = [
        {**body, "messages": [{"role": "user", "content": f"Question number {i}?"}]}
        for i in range(64)
    ]
    for i, item in enumerate(bodies):
        item["stream_options"] = {"include_usage": i % 2 == 0}

    async def run() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                *(stream_sse(session, tiny_server, "/v1/chat/completions", b) for b in bodies)
            )

    replies = asyncio.run(run())
    for i, reply in enumerate(replies):
        chunks = chunks_of(reply)
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        finishes = [c["finish_reason"] for c in choices]
        assert finishes[-1] in ("stop", "length") and finishes.count(None) == len(finishes) - 1
        assert choices[0]["delta"]["role"] == "assistant"
        if i % 2 == 0:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    # Greedy text does not depend on what else was in the batch.
    alone = tiny_server.post("/v1/chat/completions", {**bodies[5], "stream": False}).json()
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks_of(replies[5]) if c["choices"]
    )
    assert streamed == alone["choices"][0]["message"]["content"]
    tiny_server.wait_idle()


def test_disconnect_mid_stream_aborts(tiny_server: Server) -> None:
    tiny_server.wait_idle()
    baseline = tiny_server.metrics()

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                tiny_server.url + "/v1/completions",
                json={**LONG, "stream": True},
                headers=tiny_server.auth(),
            ) as response,
        ):
            assert response.status == 200
            for _ in range(3):
                await response.content.readline()
            assert tiny_server.metrics()[RUNNING] == 1
        # Leaving the block closes the connection mid-stream.

    asyncio.run(run())
    after = tiny_server.wait_for(
        lambda m: m[RUNNING] == 0 and m[KV_USAGE] == baseline[KV_USAGE], timeout=10
    )
    assert after[ABORTED] == baseline[ABORTED] + 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts(tiny_server: Server) -> None:
    tiny_server.wait_idle()
    baseline = tiny_server.metrics()

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.post(
                    tiny_server.url + "/v1/chat/completions",
                    json={
                        **LONG,
                        "max_tokens": 200,
                        "messages": [{"role": "user", "content": "Go."}],
                    },
                    headers=tiny_server.auth(),
                )
            )
            while tiny_server.metrics()[RUNNING] == 0:
                assert not request.done(), "the request finished before it could be abandoned"
                await asyncio.sleep(0.02)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(run())
    after = tiny_server.wait_for(
        lambda m: m[RUNNING] == 0 and m[KV_USAGE] == baseline[KV_USAGE], timeout=10
    )
    assert after[ABORTED] == baseline[ABORTED] + 1


def test_usage_in_every_chunk_with_continuous_usage_stats(tiny_server: Server) -> None:
    async def run() -> Any:
        async with aiohttp.ClientSession() as session:
            return await stream_sse(
                session,
                tiny_server,
                "/v1/completions",
                {
                    "prompt": "Hello",
                    "max_tokens": 5,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                },
            )

    chunks = chunks_of(asyncio.run(run()))
    counts = [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")]
    assert counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 5


def test_request_id_header_is_honoured_and_logged(tiny_server: Server) -> None:
    rid = f"client-{uuid.uuid4().hex[:12]}"
    reply = tiny_server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={"X-Request-Id": rid},
    )
    assert reply.status == 200 and reply.headers["x-request-id"] == rid
    assert reply.json()["id"] == f"chatcmpl-{rid}"
    generated = tiny_server.request("GET", "/v1/models").headers["x-request-id"]
    assert generated and generated != rid
    for odd in ("has spaces", "x" * 500, "new\\nline"):
        echoed = tiny_server.request("GET", "/v1/models", headers={"X-Request-Id": odd})
        assert echoed.headers["x-request-id"] != odd
    for path, status in (("/health", 200), ("/nowhere", 404), ("/metrics", 200)):
        answer = tiny_server.request("GET", path, auth=path != "/health")
        assert answer.status == status and answer.headers.get("x-request-id")
    # Streams and errors carry it too.
    bad = tiny_server.post("/v1/chat/completions", {"messages": []}, headers={"X-Request-Id": rid})
    assert bad.status == 400 and bad.headers["x-request-id"] == rid
    deadline = time.monotonic() + 5
    while True:
        mine = [r for r in tiny_server.log_records() if r.get("request_id") == rid]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine, "no log line carries the request id"
    assert all(json.dumps(r) for r in mine)


def test_duplicate_client_request_ids_do_not_collide(tiny_server: Server) -> None:
    headers = {"X-Request-Id": "same-id-twice"}

    async def run() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            body = {**LONG, "max_tokens": 20, "stream": True}
            return await asyncio.gather(
                *(stream_sse(session, tiny_server, "/v1/completions", body, headers) for _ in "ab")
            )

    for reply in asyncio.run(run()):
        finishes = [c["choices"][0]["finish_reason"] for c in chunks_of(reply)]
        assert finishes[-1] == "length"


def test_usage_is_the_same_streamed_or_not_for_many_prompts_and_samples(
    tiny_server: Server,
) -> None:
    body = {"prompt": ["One two three", "Four five"], "n": 2, "max_tokens": 6, "seed": 5}
    whole = tiny_server.post("/v1/completions", body).json()

    async def run() -> Any:
        async with aiohttp.ClientSession() as session:
            return await stream_sse(
                session,
                tiny_server,
                "/v1/completions",
                {**body, "stream": True, "stream_options": {"include_usage": True}},
            )

    chunks = chunks_of(asyncio.run(run()))
    assert chunks[-1]["usage"] == whole["usage"]
    assert sorted(c["index"] for c in whole["choices"]) == [0, 1, 2, 3]
    for slot in range(4):
        text = "".join(
            c["choices"][0]["text"]
            for c in chunks
            if c["choices"] and c["choices"][0]["index"] == slot
        )
        assert text == whole["choices"][slot]["text"]
