"""KV-cache pressure on a real server with a tiny KV pool: preempted requests give the same
greedy text with no lost or duplicated deltas, and idle sessions give way and recompute."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_harness import Server, chunks_of, start_server, stream_sse

BLOCKS, BLOCK_SIZE = 12, 16  # 192 tokens in all: four 100-token requests cannot fit at once


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    running = start_server(
        tiny_model_dir,
        server_logs,
        "--num-gpu-blocks",
        str(BLOCKS),
        "--block-size",
        str(BLOCK_SIZE),
        "--session-len",
        "160",
    )
    yield running
    running.stop()


def body(i: int) -> dict[str, Any]:
    return {"prompt": f"Story {i}:", "max_tokens": 100, "ignore_eos": True, "temperature": 0}


def test_preemption_keeps_greedy_text_and_every_delta(server: Server) -> None:
    alone = [server.post("/v1/completions", body(i)).json()["choices"][0]["text"] for i in range(4)]
    before = server.metrics()["splitfuse:num_preemptions_total"]

    async def run() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                *(
                    stream_sse(session, server, "/v1/completions", {**body(i), "stream": True})
                    for i in range(4)
                )
            )

    for i, reply in enumerate(asyncio.run(run())):
        chunks = chunks_of(reply)
        assert "".join(c["choices"][0]["text"] for c in chunks) == alone[i], i
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.metrics()["splitfuse:num_preemptions_total"] > before
    server.wait_for(lambda m: m["splitfuse:kv_cache_usage_perc"] == 0)


def test_idle_sessions_give_way_under_pressure_and_recompute(server: Server) -> None:
    def turn(session_id: int, prompt: str) -> dict[str, Any]:
        reply = server.post(
            "/v1/chat/interactive",
            {
                "session_id": session_id,
                "prompt": prompt,
                "interactive_mode": True,
                "temperature": 0,
                "request_output_len": 8,
            },
        )
        assert reply.status == 200, reply.body
        return reply.json()

    first = {sid: turn(sid, f"Session {sid} says hello.") for sid in range(12)}
    # Twelve sessions of ~40 tokens cannot all keep their KV in 192 tokens; each still answers.
    for sid, reply in first.items():
        again = turn(sid, "And then?")
        assert again["history_tokens"] == reply["input_tokens"] + reply["tokens"], sid
        assert again["tokens"] == 8
    for sid in range(12):
        server.post(
            "/v1/chat/interactive", {"session_id": sid, "prompt": "", "interactive_mode": False}
        )
    server.wait_for(lambda m: m["splitfuse:kv_cache_usage_perc"] == 0)
