"""RELIABILITY.md's faults on real servers: the queue cap, injected per-request and forward-pass
exceptions, a stalled engine loop, and SIGTERM with requests in flight (tiny random model).

Faults come from launcher.py (test-only patches applied before the server starts)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_harness import Server, chunks_of, parse_sse, start_server, stream_sse

RUNNING = "splitfuse:num_requests_running"
WAITING = "splitfuse:num_requests_waiting"
KV_USAGE = "splitfuse:kv_cache_usage_perc"
ERRORS = "splitfuse:request_success_total{finished_reason=error}"
LONG = {"prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
SHORT = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
STALL_SECONDS = 2.0


def slow_server(model: Path, logs: Path, step_delay: float, *flags: str) -> Server:
    return start_server(
        model,
        logs,
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "256",
        *flags,
        faults=True,
        env={"SPLITFUSE_TEST_STEP_DELAY": str(step_delay)},
    )


@pytest.fixture(scope="module")
def queue_server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    server = slow_server(
        tiny_model_dir,
        server_logs,
        0.0,
        "--max-batch-size",
        "1",
        "--max-queued-requests",
        "3",
        "--session-len",
        "256",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    server = slow_server(
        tiny_model_dir,
        server_logs,
        0.005,
        "--session-len",
        "256",
        "--health-stall-seconds",
        str(STALL_SECONDS),
    )
    yield server
    server.stop()


async def open_stream(
    session: aiohttp.ClientSession, server: Server, body: dict[str, Any], **headers: str
) -> aiohttp.ClientResponse:
    """Start a streaming completion and return once its status line is in."""
    return await session.post(
        server.url + "/v1/completions",
        json={**body, "stream": True},
        headers={**server.auth(), **headers},
    )


def test_queue_cap_is_all_or_nothing_and_counts_n(queue_server: Server) -> None:
    server = queue_server

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            running = await open_stream(session, server, LONG)
            await running.content.readline()
            # Freeze the engine: one request runs (the batch holds one), the queue stays put.
            server.trigger("hold")
            await asyncio.to_thread(server.wait_for, lambda m: m[RUNNING] == 1)
            # Six at once for three places: exactly three get in, however they interleave.
            burst = await asyncio.gather(*(open_stream(session, server, SHORT) for _ in range(6)))
            assert sorted(r.status for r in burst) == [200] * 3 + [429] * 3
            await asyncio.to_thread(server.wait_for, lambda m: m[WAITING] == 3)
            for response in burst:
                if response.status == 429:
                    assert response.headers["Retry-After"]
                    error = (await response.json())["error"]
                    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
                response.close()
            await asyncio.to_thread(server.wait_for, lambda m: m[WAITING] == 0)
            # n counts as n, all or nothing: n=4 can never fit the queue of three (400, not a
            # 429 to retry), and nothing of it is queued.
            too_many = await open_stream(session, server, {**SHORT, "n": 4})
            assert too_many.status == 400
            assert (await too_many.json())["error"]["param"] == "n"
            assert server.metrics()[WAITING] == 0
            two_prompts = {**SHORT, "prompt": ["one", "two"], "n": 2}
            assert (await open_stream(session, server, two_prompts)).status == 400
            fits = await open_stream(session, server, {**SHORT, "n": 3})
            assert fits.status == 200
            await asyncio.to_thread(server.wait_for, lambda m: m[WAITING] == 3)
            one_more = await session.post(
                server.url + "/v1/completions", json=SHORT, headers=server.auth()
            )
            assert one_more.status == 429
            fits.close()
            running.close()
            await asyncio.to_thread(server.wait_for, lambda m: m[RUNNING] == 0 and m[WAITING] == 0)

    try:
        asyncio.run(run())
    finally:
        server.release("hold")
    server.wait_for(lambda m: m[KV_USAGE] == 0)
    assert server.post("/v1/completions", {**SHORT, "n": 3}).status == 200


def test_an_exception_in_one_request_fails_only_that_request(fault_server: Server) -> None:
    server = fault_server
    errors_before = server.metrics()[ERRORS]

    async def run() -> tuple[Any, Any]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                stream_sse(
                    session, server, "/v1/completions", {**LONG, "max_tokens": 60, "stream": True}
                ),
                stream_sse(
                    session,
                    server,
                    "/v1/completions",
                    {**SHORT, "stream": True},
                    {"X-Request-Id": "poison-stream"},
                ),
            )

    healthy, poisoned = asyncio.run(run())
    assert chunks_of(healthy)[-1]["choices"][0]["finish_reason"] == "length"
    last = chunks_of(poisoned)[-1]
    assert last["error"]["code"] == "engine_error" and "Traceback" not in last["error"]["message"]
    whole = server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
        headers={"X-Request-Id": "poison-whole"},
    )
    assert whole.status == 500
    assert set(whole.json()["error"]) == {"message", "type", "param", "code"}
    assert server.health() == 200
    after = server.wait_idle()
    assert after[ERRORS] == errors_before + 2 and after[KV_USAGE] == 0
    logged = [r for r in server.log_records() if r.get("level") == "error"]
    assert any("poison-stream" in json.dumps(r) for r in logged)
    assert server.post("/v1/completions", SHORT).status == 200


def test_a_forward_pass_exception_fails_every_request_in_flight(fault_server: Server) -> None:
    server = fault_server

    async def run() -> tuple[list[Any], int]:
        async with aiohttp.ClientSession() as session:
            streams = [
                asyncio.create_task(
                    stream_sse(session, server, "/v1/completions", {**LONG, "stream": True})
                )
                for _ in range(3)
            ]
            whole = asyncio.create_task(
                session.post(server.url + "/v1/completions", json=LONG, headers=server.auth())
            )
            await asyncio.to_thread(server.wait_for, lambda m: m[RUNNING] == 4)
            server.trigger("broken")
            replies = await asyncio.gather(*streams)
            response = await whole
            body = await response.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}
            return replies, response.status

    try:
        replies, status = asyncio.run(run())
        assert status == 500
        for reply in replies:
            assert reply.events[-1] == "[DONE]"
            assert json.loads(reply.events[-2])["error"]["code"] == "engine_error"
        assert server.wait_idle()[KV_USAGE] == 0
        # While the forward pass keeps failing, /health says so and requests fail cleanly.
        assert server.health() == 503
        assert server.post("/v1/completions", SHORT).status == 500
    finally:
        server.release("broken")
    # Once it works again /health finds out by itself (it probes), and requests succeed.
    assert server.health() == 200
    assert server.post("/v1/completions", SHORT).status == 200
    # A one-off failure fails its request; the probe finds the engine well at once.
    server.trigger("forward-error")
    assert server.post("/v1/completions", SHORT).status == 500
    assert server.health() == 200
    assert server.wait_idle()[KV_USAGE] == 0


def test_a_stalled_engine_loop_turns_health_unhealthy(fault_server: Server) -> None:
    server = fault_server
    assert server.health() == 200
    server.trigger("stall", str(STALL_SECONDS + 3))

    async def run() -> float:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.post(server.url + "/v1/completions", json=SHORT, headers=server.auth())
            )
            start = time.monotonic()
            while server.health() == 200:
                assert time.monotonic() - start < STALL_SECONDS + 2, "/health never turned 503"
                await asyncio.sleep(0.1)
            unhealthy_after = time.monotonic() - start
            response = await request
            assert response.status == 200
            return unhealthy_after

    unhealthy_after = asyncio.run(run())
    assert unhealthy_after >= STALL_SECONDS - 0.5
    assert server.health() == 200


def test_sigterm_shuts_the_engine_down_before_the_process_ends(
    tiny_model_dir: Path, server_logs: Path, tmp_path: Path
) -> None:
    # The step trace is buffered and flushed by the engine's shutdown: a short run's steps are
    # in the file only if that ran before the process ended by the signal uvicorn re-raises.
    trace = tmp_path / "steps.jsonl"
    server = start_server(tiny_model_dir, server_logs, env={"SPLITFUSE_STEP_TRACE": str(trace)})
    try:
        assert server.post("/v1/completions", SHORT).status == 200
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == -signal.SIGTERM
    finally:
        server.stop()
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sum(step.get("tokens", 0) for step in steps if "gc" not in step) >= 4


def test_sigterm_drains_then_aborts_then_exits(tiny_model_dir: Path, server_logs: Path) -> None:
    server = slow_server(
        tiny_model_dir, server_logs, 0.02, "--session-len", "1024", "--shutdown-timeout", "4"
    )
    long_body = {**LONG, "max_tokens": 900, "stream": True}

    async def run() -> tuple[list[str], list[str], Any, float]:
        async with aiohttp.ClientSession() as session:
            long = await open_stream(session, server, long_body)
            short = await open_stream(session, server, {**SHORT, "max_tokens": 8})
            whole = asyncio.create_task(
                session.post(
                    server.url + "/v1/completions",
                    json={**LONG, "max_tokens": 900},
                    headers=server.auth(),
                )
            )
            await asyncio.to_thread(server.wait_for, lambda m: m[RUNNING] == 3)
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            refused = None
            while refused is None or refused.status != 503:
                refused = await session.post(
                    server.url + "/v1/completions", json=SHORT, headers=server.auth()
                )
            assert refused.headers.get("Retry-After")
            assert (await refused.json())["error"]["type"] == "service_unavailable"
            short_events = parse_sse(await short.text())
            long_events = parse_sse(await long.text())
            drained = time.monotonic() - signalled
            return short_events, long_events, await (await whole).json(), drained

    try:
        short_events, long_events, whole, drained = asyncio.run(run())
        # uvicorn re-raises the signal once it has shut down, as a process killed by it exits.
        assert server.proc.wait(15) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in short_events[:-1]]
    assert short_events[-1] == "[DONE]" and finishes[-1] == "length"
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in long_events[:-1]]
    assert long_events[-1] == "[DONE]" and finishes[-1] == "abort"
    assert whole["choices"][0]["finish_reason"] == "abort"
    assert 3.5 < drained < 9
