"""splitfuse: an LLM inference and serving engine.

`pipeline()` for offline inference; `splitfuse serve` for the OpenAI-compatible server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "GenerationConfig",
    "Pipeline",
    "PytorchEngineConfig",
    "Response",
    "SamplingParams",
    "Session",
    "pipeline",
]

if TYPE_CHECKING:
    from app.api import Pipeline, Response, Session, pipeline
    from app.engine.config import (
        EngineConfig,
        GenerationConfig,
        PytorchEngineConfig,
        SamplingParams,
    )
    from app.engine.engine import AsyncEngine

_LAZY = {
    "pipeline": "app.api",
    "Pipeline": "app.api",
    "Response": "app.api",
    "Session": "app.api",
    "EngineConfig": "app.engine.config",
    "PytorchEngineConfig": "app.engine.config",
    "GenerationConfig": "app.engine.config",
    "SamplingParams": "app.engine.config",
    "AsyncEngine": "app.engine.engine",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import app` (and the CLI's --help) does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")
