"""lmdeploy's /v1/chat/interactive sessions on a real server (tiny random model)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_harness import Server, start_server

SESSION_LEN = 256
SESSION_TTL = 2.0
PROMPT_TOKENS = "splitfuse:prompt_tokens_total"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    running = start_server(
        tiny_model_dir,
        server_logs,
        "--session-len",
        str(SESSION_LEN),
        "--session-ttl",
        str(SESSION_TTL),
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "256",
    )
    yield running
    running.stop()


def turn(server: Server, session_id: int, prompt: Any, **fields: Any) -> dict[str, Any]:
    body = {"session_id": session_id, "prompt": prompt, "interactive_mode": True, **fields}
    reply = server.post("/v1/chat/interactive", {"temperature": 0, **body})
    assert reply.status == 200, reply.body
    return reply.json()


def unique(text: str) -> str:
    """A prompt nothing else has sent, so that the prefix cache cannot shorten its prefill."""
    return f"{text} ({uuid.uuid4().hex[:8]})"


def test_three_turns_prefill_only_new_tokens(server: Server) -> None:
    prefilled, replies = [], []
    for i, text in enumerate(["Hello there!", "How are you?", "Tell me more."]):
        before = server.metrics()[PROMPT_TOKENS]
        replies.append(turn(server, 101, unique(text), request_output_len=6))
        prefilled.append(server.metrics()[PROMPT_TOKENS] - before)
        assert replies[-1]["session_id"] == 101 and replies[-1]["tokens"] == 6, i
    first, second, third = replies
    assert first["history_tokens"] == 0
    assert prefilled[0] <= first["input_tokens"]  # the system prompt may be a cache hit
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"]
    assert third["history_tokens"] == (
        second["history_tokens"] + second["input_tokens"] + second["tokens"]
    )
    # Only the new tokens, plus the previous reply's last token: sampled, never fed back.
    assert prefilled[1] == second["input_tokens"] + 1
    assert prefilled[2] == third["input_tokens"] + 1
    end = turn(server, 101, "bye", interactive_mode=False, request_output_len=2)
    assert end["history_tokens"] == 0


def test_messages_prompt_and_new_session_id(server: Server) -> None:
    reply = turn(server, -1, [{"role": "user", "content": "hi"}], request_output_len=3)
    assert reply["session_id"] >= 0 and reply["tokens"] == 3
    again = turn(server, reply["session_id"], "and?", request_output_len=3)
    assert again["history_tokens"] == reply["input_tokens"] + 3


async def read_ndjson(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in response.content if line.strip()]


def test_stream_is_ndjson_and_matches_non_stream(server: Server) -> None:
    prompt = unique("Count to five.")

    async def run() -> tuple[str, list[dict[str, Any]]]:
        body = {"prompt": prompt, "interactive_mode": True, "temperature": 0}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.url + "/v1/chat/interactive",
                json={**body, "session_id": 201, "stream": True, "request_output_len": 8},
            ) as response,
        ):
            assert response.status == 200
            return response.headers["Content-Type"], await read_ndjson(response)

    content_type, lines = asyncio.run(run())
    assert content_type.startswith("application/x-ndjson")
    assert [line["finish_reason"] for line in lines][-1] == "length"
    assert all(line["finish_reason"] is None for line in lines[:-1])
    assert [line["tokens"] for line in lines][-1] == 8
    whole = turn(server, 202, prompt, request_output_len=8)
    assert "".join(line["text"] for line in lines) == whole["text"]


def long_turn(session_id: int, prompt: str, **fields: Any) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "prompt": prompt,
        "interactive_mode": True,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        "request_output_len": 120,
        **fields,
    }


# A second turn, one that keeps the session or one that would start it over, leaves the
# running turn alone.
@pytest.mark.parametrize(("session_id", "interactive"), [(301, True), (302, False)])
def test_concurrent_turn_gets_409_and_session_survives(
    server: Server, session_id: int, interactive: bool
) -> None:
    async def run() -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            url = server.url + "/v1/chat/interactive"
            async with session.post(url, json=long_turn(session_id, unique("Go on."))) as first:
                head = json.loads(await first.content.readline())
                second_turn = {
                    "session_id": session_id, "prompt": "interrupt",
                    "interactive_mode": interactive,
                }  # fmt: skip
                async with session.post(url, json=second_turn) as second:
                    status, error = second.status, await second.json()
                lines = [head, *await read_ndjson(first)]
        return lines, status, error

    lines, status, error = asyncio.run(run())
    assert status == 409
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["tokens"] == 120
    after = turn(server, session_id, "Next.", request_output_len=4)
    assert after["history_tokens"] == lines[-1]["input_tokens"] + 120


def test_interactive_mode_false_resets(server: Server) -> None:
    first = turn(server, 401, unique("Remember me."), request_output_len=4)
    second = turn(server, 401, "Still there?", request_output_len=4)
    assert second["history_tokens"] > 0
    reset = turn(server, 401, "Start over.", interactive_mode=False, request_output_len=4)
    assert reset["history_tokens"] == 0
    fresh = turn(server, 401, "Hello again.", request_output_len=4)
    assert fresh["history_tokens"] == 0
    assert first["input_tokens"] > 0


def test_cancel_aborts_a_running_turn(server: Server) -> None:
    url = server.url + "/v1/chat/interactive"

    async def run() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            body = long_turn(501, unique("A long answer, please."), request_output_len=230)
            async with session.post(url, json=body) as first:
                head = json.loads(await first.content.readline())
                async with session.post(
                    url, json={"session_id": 501, "prompt": "", "cancel": True}
                ) as cancel:
                    assert cancel.status == 200, await cancel.text()
                    cancelled = await cancel.json()
                lines = [head, *await read_ndjson(first)]
        return lines, cancelled

    lines, cancelled = asyncio.run(run())
    assert cancelled["finish_reason"] == "abort"
    assert lines[-1]["finish_reason"] == "abort" and lines[-1]["tokens"] < 230
    server.wait_idle()
    # The session lives on with what was generated before the cancel.
    after = turn(server, 501, "Shorter.", request_output_len=2)
    assert after["history_tokens"] == lines[-1]["input_tokens"] + lines[-1]["tokens"]
    missing = server.post(
        "/v1/chat/interactive", {"session_id": 987654, "prompt": "", "cancel": True}
    )
    assert missing.status == 404 and missing.json()["error"]["param"] == "session_id"


def test_turn_past_session_len_finishes_with_length(server: Server) -> None:
    first = turn(server, 601, unique("Talk."), request_output_len=1000, ignore_eos=True)
    assert first["finish_reason"] == "length"
    assert first["input_tokens"] + first["tokens"] == SESSION_LEN
    assert "session_len" in first["message"]
    full = turn(server, 601, "More.", request_output_len=10)
    assert full["finish_reason"] == "length" and full["tokens"] == 0
    assert "session_len" in full["message"]
    reset = turn(server, 601, "Again.", interactive_mode=False, request_output_len=2)
    assert reset["tokens"] == 2


def test_idle_sessions_expire(server: Server) -> None:
    turn(server, 701, unique("Hold this."), request_output_len=3)
    busy = server.metrics()["splitfuse:kv_cache_usage_perc"]
    assert busy > 0
    deadline = time.monotonic() + SESSION_TTL + 5
    while True:
        cancel = server.post(
            "/v1/chat/interactive", {"session_id": 701, "prompt": "", "cancel": True}
        )
        if cancel.status == 404:
            break
        assert time.monotonic() < deadline, "the idle session never expired"
        time.sleep(0.25)
    server.wait_for(lambda m: m["splitfuse:kv_cache_usage_perc"] == 0)
    assert turn(server, 701, "Back.", request_output_len=2)["history_tokens"] == 0
