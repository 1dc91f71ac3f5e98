"""Grammar overhead: decode time per engine step with and without a grammar, at batch 1 and 32, on
the same workload (every sequence decodes exactly --output-len tokens: the grammar never lets
one end early), on AsyncEngine directly.

    python bench/structured.py                      # bundled SmolLM2
    python bench/structured.py --batch-sizes 1 8 32 --output-len 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.argtypes import positive_int
from bench.args import DTYPES
from bench.common import build_model_dir, describe_device

# JSON-ish text that never completes: every step fills a real mask over the whole vocabulary,
# and no sequence can stop before max_new_tokens, so both runs do the same number of steps.
ENDLESS_EBNF = r"""root ::= "{" pair ("," pair)*
pair ::= "\"" [a-z]+ "\": " (num | str)
num ::= [0-9]+
str ::= "\"" [a-z ]* "\""
"""


async def step_times(engine, prompts: list[list[int]], output_len: int, grammar) -> list[float]:
    """Per-step decode seconds of each request in one batch (first token excluded: prefill)."""
    from app.engine.config import SamplingParams

    params = SamplingParams(max_new_tokens=output_len, temperature=1.0, ignore_eos=True, seed=0)

    async def one(prompt: list[int]) -> float:
        first = last = 0.0
        count = 0
        async for out in engine.generate(prompt, params, grammar=grammar):
            now = time.perf_counter()
            if count == 0:
                first = now
            count += len(out.token_ids)
            last = now
        assert count == output_len, f"a request ended after {count} tokens"
        return (last - first) / (count - 1)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=positive_int, default=32)
    parser.add_argument("--output-len", type=positive_int, default=48)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from app.engine.config import EngineConfig
    from app.engine.engine import AsyncEngine
    from app.engine.grammar_spec import GrammarSpec

    model_dir = build_model_dir(args.model, args.model_config)
    engine = AsyncEngine(
        str(model_dir), EngineConfig(dtype=args.dtype, max_batch_size=max(args.batch_sizes))
    )
    rng = random.Random(0)
    vocab = engine.info.vocab_size
    rows = []

    async def run() -> None:
        grammar = await engine.grammar_compiler.compile(GrammarSpec.for_ebnf(ENDLESS_EBNF))
        warm = [[rng.randrange(100, vocab) for _ in range(8)]]
        await step_times(engine, warm, 8, None)
        await step_times(engine, warm, 8, grammar)
        for batch in args.batch_sizes:
            prompts = [
                [rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(batch)
            ]
            plain = statistics.median(await step_times(engine, prompts, args.output_len, None))
            guided = statistics.median(await step_times(engine, prompts, args.output_len, grammar))
            rows.append(
                {
                    "batch": batch,
                    "plain_ms": plain * 1e3,
                    "grammar_ms": guided * 1e3,
                    "overhead_pct": (guided / plain - 1) * 100,
                }
            )
        await engine.stop()

    asyncio.run(run())
    engine.shutdown()
    print(f"device: {describe_device()}; model: {model_dir.name}")
    print(f"{'batch':>5} {'plain ms/step':>14} {'grammar ms/step':>16} {'overhead':>9}")
    for row in rows:
        print(
            f"{row['batch']:>5} {row['plain_ms']:>14.1f} {row['grammar_ms']:>16.1f}"
            f" {row['overhead_pct']:>8.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
