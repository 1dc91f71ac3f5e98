"""The engine runs with torch, triton and transformers alone (what the GPU machines have)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys

SERVER_SIDE = {"xgrammar", "fastapi", "starlette", "uvicorn", "sse_starlette", "orjson",
               "structlog", "prometheus_client", "aiohttp", "gradio", "gguf"}


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in SERVER_SIDE:
            raise ImportError(f"{name} is not allowed here")


sys.meta_path.insert(0, Block())
import app.api, app.engine.engine, app.engine.builder, app.engine.model_runner  # noqa: E401
from app import EngineConfig, GenerationConfig, pipeline  # noqa: F401
print("ok")
"""


def test_engine_imports_without_server_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
