"""Requests through a real proxy to fake nodes: balancing, model routing, sessions, keys, ids."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import openai
import pytest
from proxy_harness import Cluster, assert_openai_error, burst, client, http, one_request

from app.proxy import Strategy


@pytest.mark.parametrize("strategy", list(Strategy))
def test_40_concurrent_requests_spread_over_two_nodes(cluster: Cluster, strategy):
    a, a_server = cluster.node("A", delay=0.05, chunk_delay=0.01)
    b, b_server = cluster.node("B", delay=0.05, chunk_delay=0.01)
    proxy = cluster.proxy(strategy=strategy)
    cluster.add(proxy, a_server, b_server)

    texts = asyncio.run(burst(proxy, 40))

    assert len(texts) == 40 and set(texts) <= {"A", "B"}
    assert len(a.served) + len(b.served) == 40
    assert a.served and b.served
    assert Counter(r["stream"] for r in a.served + b.served) == {True: 20, False: 20}


def test_models_route_only_to_nodes_serving_them(cluster: Cluster):
    a, a_server = cluster.node("A", models=("m",))
    _, b_server = cluster.node("B", models=("m", "b-only"))
    proxy = cluster.proxy()
    cluster.add(proxy, a_server, b_server)

    assert asyncio.run(burst(proxy, 12, model="b-only")) == ["B"] * 12
    assert not a.received

    status, listing = http("GET", f"{proxy.url}/v1/models")
    assert status == 200 and listing["object"] == "list"
    assert [card["id"] for card in listing["data"]] == ["m", "b-only"]
    assert all(card["object"] == "model" for card in listing["data"])

    async def unknown() -> openai.NotFoundError:
        async with client(proxy) as api:
            with pytest.raises(openai.NotFoundError) as caught:
                await api.chat.completions.create(model="nope", messages=[])
            return caught.value

    error = asyncio.run(unknown())
    assert error.status_code == 404
    assert assert_openai_error(error.response.json())["code"] == "model_not_found"


def test_interactive_sessions_stick_to_their_node(cluster: Cluster):
    servers = {name: cluster.node(name)[1] for name in ("A", "B")}
    proxy = cluster.proxy(strategy="random")
    cluster.add(proxy, *servers.values())

    async def turn(http_client: aiohttp.ClientSession, session_id: int) -> str:
        body = {"session_id": session_id, "prompt": "hi", "interactive_mode": True}
        async with http_client.post(f"{proxy.url}/v1/chat/interactive", json=body) as resp:
            assert resp.status == 200
            return (await resp.json())["text"]

    async def conversations() -> dict[int, list[str]]:
        async with aiohttp.ClientSession() as http_client:
            served: dict[int, list[str]] = {s: [] for s in range(8)}
            for _ in range(4):
                texts = await asyncio.gather(*(turn(http_client, s) for s in served))
                for session_id, text in zip(served, texts, strict=True):
                    served[session_id].append(text)
            return served

    served = asyncio.run(conversations())
    assert all(len(set(texts)) == 1 for texts in served.values())
    assert {texts[0] for texts in served.values()} == {"A", "B"}

    # The node holding session 0 dies: its next turn starts over on the other node.
    holder = served[0][0]
    servers[holder].kill()
    other = "B" if holder == "A" else "A"

    async def after_kill() -> list[str]:
        async with aiohttp.ClientSession() as http_client:
            return [await turn(http_client, 0) for _ in range(3)]

    assert asyncio.run(after_kill()) == [other] * 3


@pytest.mark.parametrize("stream", [False, True])
def test_sessions_numbered_by_the_node_stick_to_it(cluster: Cluster, stream):
    nodes = {name: cluster.node(name) for name in ("A", "B")}
    proxy = cluster.proxy(strategy="random")
    cluster.add(proxy, *(server for _, server in nodes.values()))
    url = f"{proxy.url}/v1/chat/interactive"

    async def turn(http_client: aiohttp.ClientSession, session_id: int | None) -> dict:
        body = {"prompt": "hi", "interactive_mode": True, "stream": stream}
        if session_id is not None:
            body["session_id"] = session_id
        async with http_client.post(url, json=body) as resp:
            assert resp.status == 200
            lines = (await resp.read()).splitlines()
        return json.loads(lines[0])

    async def conversations() -> list[list[str]]:
        async with aiohttp.ClientSession() as http_client:
            served = []
            for first in (None, -1, None, -1, None, -1):
                answer = await turn(http_client, first)
                texts = [answer["text"]]
                for _ in range(4):
                    texts.append((await turn(http_client, answer["session_id"]))["text"])
                served.append(texts)
            return served

    served = asyncio.run(conversations())
    assert all(len(set(texts)) == 1 for texts in served), served
    assert sum(len(fake.served) for fake, _ in nodes.values()) == 30


def test_api_keys_guard_openai_routes_and_are_not_forwarded(cluster: Cluster):
    a, a_server = cluster.node("A")
    proxy = cluster.proxy(api_keys=("client-key",), node_api_key="node-key")
    cluster.add(proxy, a_server)

    async def calls() -> None:
        async with client(proxy, api_key="wrong") as api:
            with pytest.raises(openai.AuthenticationError) as caught:
                await api.chat.completions.create(model="m", messages=[])
            assert caught.value.status_code == 401
            assert_openai_error(caught.value.response.json())
        async with client(proxy, api_key="client-key") as api:
            assert await one_request(api, 0) == "A"
            assert await one_request(api, 1) == "A"

    asyncio.run(calls())
    for path in ("/v1/models", "/%76%31/models", "/docs", "/openapi.json", "/nowhere"):
        status, error = http("GET", proxy.url + path)
        assert status == 401 and assert_openai_error(error)["code"] == "invalid_api_key"
    odd_token = {"Authorization": "Bearer cl\u00efent-key"}
    assert http("GET", f"{proxy.url}/v1/models", headers=odd_token)[0] == 401
    good = {"Authorization": "Bearer client-key"}
    assert http("GET", f"{proxy.url}/v1/models", headers=good)[0] == 200
    assert http("GET", f"{proxy.url}/health")[0] == 200
    assert [r["auth"] for r in a.received] == ["Bearer node-key"] * 2


def test_request_ids_are_honoured_and_propagated(cluster: Cluster):
    a, a_server = cluster.node("A")
    proxy = cluster.proxy()
    cluster.add(proxy, a_server)

    async def calls() -> tuple[str, str]:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http_client:
            url = f"{proxy.url}/v1/chat/completions"
            async with http_client.post(url, json=body, headers={"X-Request-Id": "abc-123"}) as r:
                given = r.headers["x-request-id"]
            async with http_client.post(
                url, json=body, headers={"X-Request-Id": "../etc passwd"}
            ) as r:
                made = r.headers["x-request-id"]
        return given, made

    given, made = asyncio.run(calls())
    assert given == "abc-123" and a.received[0]["request_id"] == "abc-123"
    assert made != "../etc passwd" and a.received[1]["request_id"] == made


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"{not json", 400), (b"[1, 2]", 400), (b'{"model": 5}', 400), (b"x" * 5000, 413)],
)
def test_malformed_requests_get_openai_errors(cluster: Cluster, body, status):
    _, a_server = cluster.node("A")
    proxy = cluster.proxy(max_body_bytes=4096)
    cluster.add(proxy, a_server)

    async def post() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http_client:
            url = f"{proxy.url}/v1/chat/completions"
            headers = {"Content-Type": "application/json"}
            async with http_client.post(url, data=body, headers=headers) as resp:
                return resp.status, await resp.json()

    got, error_body = asyncio.run(post())
    assert got == status
    assert_openai_error(error_body)
