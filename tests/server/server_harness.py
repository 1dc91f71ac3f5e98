"""Test helpers: a real `splitfuse serve` subprocess on a loopback port, raw HTTP and SSE.

Servers run through launcher.py, which exits with the test process, so none outlives a killed
pytest; `Server.stop` terminates (then kills) them in any case.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
from processes import free_port, stop_process
from prometheus_client.parser import text_string_to_metric_families

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
API_KEY = "test-key"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    """A running server process; `url` is its root, `model` the id it serves."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path
    model: str
    api_key: str | None = None
    fault_dir: Path | None = None
    _offset: int = field(default=0, repr=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=options.pop("timeout", 120),
            **options,
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        timeout: float = 60,
    ) -> Reply:
        """One raw request; `body` is bytes as given, an iterator of bytes is sent in chunks
        (no Content-Length), anything else is sent as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        raw = body is None or isinstance(body, bytes | Iterator)
        data = body if raw else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(self.auth() if auth else {})}
        sent.update(headers or {})
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
        finally:
            conn.close()

    def post(self, path: str, body: Any, **options: Any) -> Reply:
        return self.request("POST", path, body, **options)

    def health(self) -> int:
        return self.request("GET", "/health", auth=False, timeout=10).status

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels appended as `{k=v}`)."""
        text = self.request("GET", "/metrics").body.decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values

    def wait_for(
        self, condition: Callable[[dict[str, float]], bool], timeout: float = 30
    ) -> dict[str, float]:
        """Poll /metrics until `condition` holds; fail with the last values otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if condition(values):
                return values
            if time.monotonic() > deadline:
                shown = {
                    k: v for k, v in values.items() if "_bucket" not in k and "_created" not in k
                }
                raise AssertionError(f"metrics never satisfied the condition: {shown}")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Until nothing runs or waits and the KV cache holds nothing but idle sessions."""
        return self.wait_for(
            lambda m: (
                m["splitfuse:num_requests_running"] == 0
                and m["splitfuse:num_requests_waiting"] == 0
            ),
            timeout,
        )

    def trigger(self, fault: str, content: str = "") -> None:
        """Arm one of launcher.py's faults."""
        assert self.fault_dir is not None, "the server was started without fault injection"
        (self.fault_dir / fault).write_text(content)

    def release(self, fault: str) -> None:
        """Disarm a fault that lasts while its file exists (`hold`)."""
        assert self.fault_dir is not None, "the server was started without fault injection"
        (self.fault_dir / fault).unlink(missing_ok=True)

    def log_records(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far (other lines skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        stop_process(self.proc)


def start_server(
    model_dir: Path,
    log_dir: Path,
    *args: str,
    api_key: str | None = None,
    model_name: str = "test-model",
    env: dict[str, str] | None = None,
    faults: bool = False,
    ready_timeout: float = 180,
) -> Server:
    """Start `splitfuse serve MODEL_DIR ARGS` on a free loopback port and wait for /health."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    fault_dir = log_dir / f"faults-{port}" if faults else None
    command = [
        sys.executable,
        str(LAUNCHER),
        str(os.getpid()),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-format",
        "json",
        "--model-name",
        model_name,
        *(["--api-keys", api_key] if api_key else []),
        *args,
    ]
    full_env = {**os.environ, **(env or {})}
    if fault_dir is not None:
        fault_dir.mkdir()
        full_env["SPLITFUSE_TEST_FAULT_DIR"] = str(fault_dir)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(
        proc, f"http://127.0.0.1:{port}", port, log_path, model_name, api_key, fault_dir
    )
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if server.health() == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not become healthy:\n{server.log_tail()}")
        time.sleep(0.2)


@dataclass
class SSEReply:
    status: int
    headers: dict[str, str]
    events: list[str]  # each event's data, "[DONE]" included


def parse_sse(text: str) -> list[str]:
    """The data of each event in an SSE body (comments such as pings skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [
            line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")
        ]
        if data:
            events.append("\n".join(data))
    return events


async def stream_sse(
    session: aiohttp.ClientSession,
    server: Server,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> SSEReply:
    """POST a streaming request and read the whole SSE body."""
    async with session.post(
        server.url + path, json=body, headers={**server.auth(), **(headers or {})}
    ) as response:
        text = await response.text()
        events = parse_sse(text) if response.status == 200 else [text]
        return SSEReply(response.status, dict(response.headers), events)


def chunks_of(reply: SSEReply) -> list[dict[str, Any]]:
    """The JSON chunks of a finished SSE reply, checking it ends with exactly one [DONE]."""
    assert reply.status == 200, reply.events
    assert reply.events and reply.events[-1] == "[DONE]", reply.events[-3:]
    assert reply.events.count("[DONE]") == 1
    return [json.loads(e) for e in reply.events[:-1]]
