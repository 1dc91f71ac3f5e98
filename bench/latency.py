"""Batch-1 decode latency: ms per output token next to the roofline (weight bytes / copy
bandwidth, both measured in this run) and HuggingFace transformers `generate` on the same model.

    python bench/latency.py                                  # bundled SmolLM2
    python bench/latency.py --model-config llama-3.1-8b --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.argtypes import positive_int
from bench.args import DTYPES
from bench.common import build_model_dir, describe_device
from bench.kernel_profile import KernelProfile


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        n = 64 * 2**20
        src, dst = torch.randn(n // 4), torch.empty(n // 4)
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        return 2 * n * 10 / (time.perf_counter() - start)
    n = 2 * 2**30
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return 2 * n / statistics.median(times)


async def splitfuse_tpot(engine, prompt: list[int], output_len: int) -> float:
    from app.engine.config import SamplingParams

    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    first = last = None
    count = 0
    async for out in engine.generate(prompt, params):
        now = time.perf_counter()
        count += len(out.token_ids)
        if first is None:
            first = now
        last = now
    return (last - first) / (count - 1)


def transformers_tpot(
    model_dir: Path, prompt: list[int], output_len: int, dtype: torch.dtype, device: torch.device
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)
    # The difference between a long and a short run cancels the prefill.
    return (run(output_len) - run(8)) / (output_len - 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--input-len", type=positive_int, default=128)
    parser.add_argument("--output-len", type=positive_int, default=256)
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="schedule each step after the last"
    )
    parser.add_argument(
        "--quant-policy", type=int, default=0, choices=[0, 4, 8], help="8: int8 KV, 4: int4"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="one more run, its GPU kernels summed by kind"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile sums GPU kernels: it needs a CUDA device")

    from app.engine.config import EngineConfig
    from app.engine.engine import AsyncEngine

    model_dir = build_model_dir(args.model, args.model_config)
    # Measured before the engine loads and again after it stops (an H100 copied at 3,012 GB/s in
    # a fresh process and at 2,599 after the engine); the higher one sets the roofline.
    fresh = copy_bandwidth(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the copy's 4 GiB must not shrink the engine's KV pool
    engine = AsyncEngine(
        str(model_dir),
        EngineConfig(
            dtype=args.dtype,
            max_batch_size=8,
            eager_mode=args.eager,
            async_scheduling=not args.no_async_scheduling,
            quant_policy=args.quant_policy,
        ),
    )
    device, dtype = engine.info.device, engine.info.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.input_len)]

    async def measure(eng: AsyncEngine) -> list[float]:
        await splitfuse_tpot(eng, prompt[:16], 16)  # warm-up
        runs = [await splitfuse_tpot(eng, prompt, args.output_len) for _ in range(args.runs)]
        if args.profile:
            with KernelProfile() as prof:
                tpot = await splitfuse_tpot(eng, prompt, args.output_len)
            prof.report(tpot * (args.output_len - 1), steps=args.output_len - 1)
        await eng.stop()
        return runs

    runs = asyncio.run(measure(engine))
    engine.shutdown()
    del engine  # its KV cache would leave no room for the transformers run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ours = statistics.median(runs)
    copies = [fresh, copy_bandwidth(device)]
    bandwidth = max(copies)
    roofline = weight_bytes / bandwidth
    hf = (
        None
        if args.skip_hf
        else transformers_tpot(model_dir, prompt, args.output_len, dtype, device)
    )
    name = args.model_config or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    print(
        f"\n{describe_device()} | model {name} ({str(dtype).removeprefix('torch.')}, "
        f"{weight_bytes / 1e9:.2f} GB of weights) | {args.input_len} in / {args.output_len} out"
    )
    print(
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (before the engine "
        f"{copies[0] / 1e9:.0f}, after {copies[1] / 1e9:.0f}) -> roofline "
        f"{roofline * 1e3:.2f} ms/token"
    )
    print(
        f"splitfuse     {ours * 1e3:8.2f} ms/token (runs: "
        f"{', '.join(f'{r * 1e3:.2f}' for r in runs)}) = {roofline / ours:.0%} of roofline"
    )
    if hf is not None:
        print(f"transformers  {hf * 1e3:8.2f} ms/token; splitfuse is {hf / ours:.2f}x faster")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": describe_device(),
                    "model": name,
                    "dtype": str(dtype),
                    "weight_bytes": weight_bytes,
                    "copy_bandwidth": bandwidth,
                    "copy_bandwidth_before_after": copies,
                    "roofline_ms": roofline * 1e3,
                    "splitfuse_ms": ours * 1e3,
                    "splitfuse_runs_ms": [r * 1e3 for r in runs],
                    "transformers_ms": None if hf is None else hf * 1e3,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
