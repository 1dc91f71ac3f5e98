"""Faults behind the proxy: dying nodes, node errors, ejection, no node, client disconnects."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from proxy_harness import (
    Cluster,
    assert_openai_error,
    burst,
    client,
    http,
    node_status,
    one_request,
    wait_until,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_killed_node_loses_no_request_that_had_not_started(cluster: Cluster):
    a, a_server = cluster.node("A", delay=0.6)
    _, b_server = cluster.node("B", delay=0.6)
    proxy = cluster.proxy(strategy="min_expected_latency")
    cluster.add(proxy, a_server, b_server)

    async def run() -> list[str]:
        requests = asyncio.ensure_future(burst(proxy, 20))
        # Kill A while it holds requests, none of which has answered (its delay is 0.6 s).
        await asyncio.to_thread(wait_until, lambda: len(a.received) >= 5)
        await asyncio.to_thread(a_server.kill)
        return await requests

    started = time.monotonic()
    texts = asyncio.run(run())
    assert texts == ["B"] * 20 and len(a.received) >= 5 and not a.served
    assert time.monotonic() - started < 5

    # Traffic moves to the survivor; refused connections eject the dead node.
    assert asyncio.run(burst(proxy, 10)) == ["B"] * 10
    assert not node_status(proxy)[a_server.url]["healthy"]


def test_stream_broken_mid_way_ends_with_an_error_event(cluster: Cluster):
    _, a_server = cluster.node("A", chunks=20, chunk_delay=0.1)
    proxy = cluster.proxy()
    cluster.add(proxy, a_server)

    async def run() -> None:
        async with client(proxy) as api:
            stream = await api.chat.completions.create(**CHAT, stream=True)
            first = await anext(stream)
            assert first.choices[0].delta.content == "A"
            await asyncio.to_thread(a_server.kill)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass

    asyncio.run(run())


def test_node_4xx_passes_through_and_does_not_eject(cluster: Cluster):
    a, a_server = cluster.node("A", fail_status=400)
    proxy = cluster.proxy()
    cluster.add(proxy, a_server)

    async def run() -> None:
        async with client(proxy) as api:
            for i in range(5):
                with pytest.raises(openai.BadRequestError) as caught:
                    await one_request(api, i)
                assert caught.value.status_code == 400
                assert assert_openai_error(caught.value.response.json())["message"] == "A says no"

    asyncio.run(run())
    status = node_status(proxy)[a_server.url]
    assert status["healthy"] and status["request_failures"] == 0 and len(a.received) == 5


def test_node_5xx_is_retried_elsewhere_then_ejected(cluster: Cluster):
    a, a_server = cluster.node("A", fail_status=500)
    b, b_server = cluster.node("B")
    proxy = cluster.proxy(strategy="random")
    cluster.add(proxy, a_server, b_server)

    async def one_by_one() -> list[str]:
        async with client(proxy) as api:
            return [await one_request(api, i) for i in range(30)]

    # Every request that met A's 500 moved to B; after three in a row A gets no more.
    assert asyncio.run(one_by_one()) == ["B"] * 30
    assert not node_status(proxy)[a_server.url]["healthy"]
    assert len(a.received) == 3 and len(b.served) == 30


def test_lone_failing_node_passes_its_5xx_then_503_once_ejected(cluster: Cluster):
    _, a_server = cluster.node("A", fail_status=500)
    proxy = cluster.proxy(max_failures=3)
    cluster.add(proxy, a_server)

    async def run() -> list[tuple[int, dict]]:
        async with aiohttp.ClientSession() as http_client:
            results = []
            for _ in range(4):
                async with http_client.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
                    results.append((r.status, await r.json()))
            return results

    results = asyncio.run(run())
    assert [status for status, _ in results] == [500, 500, 500, 503]
    assert results[0][1]["error"]["message"] == "A says no"
    error = assert_openai_error(results[3][1])
    assert error["code"] == "no_healthy_node" and "127.0.0.1" not in error["message"]


def test_refused_connections_eject_the_node(cluster: Cluster):
    _, a_server = cluster.node("A")
    _, b_server = cluster.node("B")
    proxy = cluster.proxy(strategy="random")
    cluster.add(proxy, a_server, b_server)
    a_server.kill()

    assert asyncio.run(burst(proxy, 30)) == ["B"] * 30
    assert not node_status(proxy)[a_server.url]["healthy"]
    assert node_status(proxy)[b_server.url]["healthy"]


def test_no_node_answers_503_with_an_openai_body(cluster: Cluster):
    proxy = cluster.proxy()

    async def run() -> openai.APIStatusError:
        async with client(proxy) as api:
            assert (await api.models.list()).data == []
            with pytest.raises(openai.APIStatusError) as caught:
                await api.chat.completions.create(**CHAT)
            return caught.value

    error = asyncio.run(run())
    assert error.status_code == 503 and error.response.headers["retry-after"]
    assert assert_openai_error(error.response.json())["type"] == "service_unavailable"


def test_client_disconnect_mid_stream_cancels_the_node_request(cluster: Cluster):
    a, a_server = cluster.node("A", chunks=50, chunk_delay=0.05)
    proxy = cluster.proxy()
    cluster.add(proxy, a_server)

    async def run() -> None:
        async with aiohttp.ClientSession() as http_client:
            body = {**CHAT, "stream": True}
            resp = await http_client.post(f"{proxy.url}/v1/chat/completions", json=body)
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()

    asyncio.run(run())
    wait_until(lambda: a.disconnects == 1, timeout=3)
    wait_until(lambda: node_status(proxy)[a_server.url]["unfinished"] == 0, timeout=3)
    assert not a.served


def test_client_disconnect_while_waiting_cancels_the_node_request(cluster: Cluster):
    a, a_server = cluster.node("A", delay=5.0)
    proxy = cluster.proxy()
    cluster.add(proxy, a_server)

    async def run() -> None:
        async with aiohttp.ClientSession() as http_client:
            with pytest.raises(TimeoutError):
                await http_client.post(
                    f"{proxy.url}/v1/chat/completions",
                    json=CHAT,
                    timeout=aiohttp.ClientTimeout(total=0.4),
                )

    asyncio.run(run())
    wait_until(lambda: a.disconnects == 1, timeout=3)
    status = node_status(proxy)[a_server.url]
    assert status["unfinished"] == 0 and status["healthy"] and not a.served


def test_a_node_that_times_out_does_not_take_the_traffic(cluster: Cluster):
    a, a_server = cluster.node("A", delay=3.0)
    _, b_server = cluster.node("B")
    proxy = cluster.proxy(strategy="min_observed_latency", request_timeout=0.3)
    cluster.add(proxy, a_server, b_server)

    statuses = [http("POST", f"{proxy.url}/v1/chat/completions", CHAT)[0] for _ in range(8)]

    # Its first request times out; its history then shows it slow, so B takes the rest.
    assert sorted(statuses) == [200] * 7 + [504] and len(a.received) == 1
    stuck = node_status(proxy)[a_server.url]
    assert stuck["request_failures"] == 1 and stuck["latency"][0] >= 0.3


def test_timeouts_in_a_row_eject_the_node(cluster: Cluster):
    _, a_server = cluster.node("A", delay=3.0)
    _, b_server = cluster.node("B")
    proxy = cluster.proxy(strategy="random", request_timeout=0.3, max_failures=2)
    cluster.add(proxy, a_server, b_server)

    statuses = [http("POST", f"{proxy.url}/v1/chat/completions", CHAT)[0] for _ in range(16)]

    assert statuses.count(504) == 2 and statuses.count(200) == 14
    assert not node_status(proxy)[a_server.url]["healthy"]
