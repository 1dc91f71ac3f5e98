"""The step trace: one record per engine step with the loop's and the GPU thread's times, and
the report that summarizes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import AsyncEngine
from app.engine.trace import TRACE_ENV
from bench.trace_report import report


def test_trace_records_every_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(path))
    engine = AsyncEngine(str(tiny_model_dir), EngineConfig(block_size=16, max_prefill_token_num=32))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        async def one(n: int) -> None:
            async for _ in engine.generate(list(range(100, 100 + n)), params):
                pass

        await asyncio.gather(one(40), one(10))  # 50 prompt tokens: chunked over two steps
        await engine.stop()

    asyncio.run(main())
    engine.shutdown()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if "seqs" in r]
    # Two prefill steps (32 + 18 tokens), then decodes until both have 6 tokens.
    assert [r["tokens"] for r in steps[:2]] == [32, 18]
    assert sum(r["decodes"] for r in steps) == 2 * 5
    for r in steps:
        assert r["t"] <= r["submit"] <= r["start"] <= r["launched"] <= r["end"] <= r["result"]
        assert r["result"] <= r["update_start"] <= r["done"]
        assert r["kind"] == "eager"  # no graphs on the CPU
    summary = report(records)
    assert summary["run"]["steps"] == len(steps)
    assert summary["run"]["ahead_steps"] > 0  # decodes scheduled while the step before ran
    assert summary["eager_launch_ms"]["n"] == len(steps)
    queued = summary["queued_ahead_ms"]
    assert queued["n"] == len(steps) - 1
    # On the CPU a step's tokens are collected before the step ahead of it computes.
    assert queued["max"] < 0
