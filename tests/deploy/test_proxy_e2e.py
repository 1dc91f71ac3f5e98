"""Two real `splitfuse serve` processes (bundled SmolLM2) behind a real `splitfuse proxy`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from processes import free_port
from server_harness import LAUNCHER, Server, start_server

pytestmark = pytest.mark.slow
ADMIN = "admin-secret"


class Proxy:
    def __init__(self, log_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / "proxy.log").open("wb")
        command = [
            sys.executable,
            str(LAUNCHER),
            str(os.getpid()),
            "proxy",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-key",
            ADMIN,
            "--health-interval",
            "1",
            *args,
        ]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._up():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.2)

    def _up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def cluster(smollm2_dir: Path, tmp_path: Path) -> Iterator[tuple[Proxy, list[Server]]]:
    proxy = Proxy(tmp_path, "--strategy", "min_expected_latency")
    env = {"SPLITFUSE_ADMIN_KEY": ADMIN}
    servers: list[Server] = []
    try:
        for i in range(2):
            servers.append(
                start_server(
                    smollm2_dir,
                    tmp_path / f"node{i}",
                    "--proxy-url",
                    proxy.url,
                    model_name="smol",
                    env=env,
                )
            )
        yield proxy, servers
    finally:
        for server in servers:
            server.stop()
        proxy.stop()


async def _status(http: aiohttp.ClientSession, proxy: Proxy) -> dict:
    async with http.get(
        proxy.url + "/nodes/status", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as response:
        assert response.status == 200
        return await response.json()


def _served(server: Server) -> float:
    metrics = server.metrics()
    return sum(v for k, v in metrics.items() if k.startswith("splitfuse:request_success_total"))


def test_two_nodes_behind_the_proxy(cluster: tuple[Proxy, list[Server]]) -> None:
    proxy, servers = cluster
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)

    async def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Say the number {i}."}]
        if i % 2:
            text = ""
            stream = await client.chat.completions.create(
                model="smol", messages=messages, max_tokens=8, temperature=0, stream=True
            )
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text
        reply = await client.chat.completions.create(
            model="smol", messages=messages, max_tokens=8, temperature=0
        )
        return reply.choices[0].message.content or ""

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while len(await _status(http, proxy)) < 2:  # both registered through --proxy-url
                assert time.monotonic() < deadline, "nodes never registered"
                await asyncio.sleep(0.5)
            texts = await asyncio.gather(*(one(i) for i in range(40)))
            assert all(texts)
            assert all(_served(s) > 0 for s in servers), "one node served nothing"

            # Interactive sessions stay on the node that holds their KV.
            before = [_served(s) for s in servers]
            for turn in ("Hi, I am Ada.", "What is my name?", "Thanks!"):
                body = {
                    "prompt": turn,
                    "session_id": 77,
                    "interactive_mode": True,
                    "request_output_len": 8,
                    "temperature": 0,
                }
                async with http.post(proxy.url + "/v1/chat/interactive", json=body) as response:
                    assert response.status == 200
            grown = [_served(s) - b for s, b in zip(servers, before, strict=True)]
            assert sorted(grown) == [0, 3]

            # Node management needs the admin key.
            async with http.get(proxy.url + "/nodes/status") as response:
                assert response.status == 401
            async with http.post(
                proxy.url + "/nodes/remove", params={"node_url": servers[1].url}
            ) as response:
                assert response.status == 401

    asyncio.run(scenario())


def test_node_killed_mid_test(cluster: tuple[Proxy, list[Server]]) -> None:
    proxy, servers = cluster
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)

    async def one(i: int) -> str:
        reply = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=6,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while len(await _status(http, proxy)) < 2:
                assert time.monotonic() < deadline, "nodes never registered"
                await asyncio.sleep(0.5)
            servers[0].proc.send_signal(signal.SIGKILL)
            servers[0].proc.wait(10)
            texts = await asyncio.gather(*(one(i) for i in range(10)))
            assert all(texts)  # none lost: refused connections are retried on the other node
            # Removing and adding a node through the API.
            headers = {"Authorization": f"Bearer {ADMIN}"}
            async with http.post(
                proxy.url + "/nodes/remove", headers=headers, params={"node_url": servers[1].url}
            ) as response:
                assert response.status == 200
            assert servers[1].url not in await _status(http, proxy)
            async with http.post(
                proxy.url + "/nodes/add", headers=headers, json={"url": servers[1].url}
            ) as response:
                assert response.status == 200
            assert await one(2)

    asyncio.run(scenario())
