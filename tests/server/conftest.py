"""Fixtures for the server tests: real `splitfuse serve` processes on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import API_KEY, Server, start_server

# The shared tiny server: a short context so that "prompt over session_len" is cheap to reach,
# a small KV pool so that its usage is visible in /metrics.
TINY_FLAGS = (
    "--session-len",
    "256",
    "--block-size",
    "16",
    "--num-gpu-blocks",
    "512",
    "--max-body-bytes",
    "1048576",
    "--shutdown-timeout",
    "2",
)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    """One tiny-model server with an API key, shared by the tests that do not change its config."""
    server = start_server(tiny_model_dir, server_logs, *TINY_FLAGS, api_key=API_KEY)
    yield server
    server.stop()
