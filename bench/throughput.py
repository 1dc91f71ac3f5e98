"""Offline throughput: one fixed workload through splitfuse's pipeline() and through HuggingFace
transformers `generate` (static batches) in the same run.

    python bench/throughput.py                                   # bundled SmolLM2, small CPU run
    python bench/throughput.py --workload random-256 --model-config llama-3.1-8b   # on a GPU
    python bench/throughput.py --workload mixed --skip-hf --json out.json

Workloads (greedy, eos ignored): `random-256` N requests of 256 random input tokens and exactly 256
output tokens; `mixed` seed 0, input lengths uniform in [128, 1024], outputs in [64, 512];
`custom` --input-len/--output-len.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.argtypes import non_negative_int, positive_int
from bench.args import DTYPES
from bench.common import build_model_dir, describe_device
from bench.kernel_profile import KernelProfile
from bench.stacks import StackSampler


@dataclass
class Result:
    engine: str
    requests: int
    input_tokens: int
    output_tokens: int
    seconds: float
    max_batch: int | None = None  # the engine's batch cap (transformers: its static batch)
    kernels: dict | None = None  # --profile: device time by kernel kind

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds

    @property
    def req_s(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        return (
            f"{self.engine:<14} {self.requests:>6} {self.input_tokens:>9} "
            f"{self.output_tokens:>9} {self.seconds:>9.2f} {self.output_tok_s:>11.1f} "
            f"{self.total_tok_s:>11.1f} {self.req_s:>8.2f} {self.max_batch or '':>9}"
        )


def make_workload(
    name: str, num: int, input_len: int, output_len: int, vocab: int, seed: int = 0
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    low, high = 1000, min(vocab, 30000)  # ordinary tokens, clear of the special ones
    requests = []
    for _ in range(num):
        if name == "mixed":
            n_in, n_out = rng.randint(128, 1024), rng.randint(64, 512)
        elif name == "random-256":
            n_in, n_out = 256, 256
        else:
            n_in, n_out = input_len, output_len
        requests.append(([rng.randrange(low, high) for _ in range(n_in)], n_out))
    return requests


class GapMeter:
    """GPU idle time between engine steps, from CUDA events around each step's device work, and
    the caching allocator's device calls in the meantime.

    An event recorded before a step's launches completes when the GPU reaches it; the gap to the
    previous step's end event is time the GPU had nothing to do. A retry (an allocation that
    failed until every cached block was freed) synchronizes the device.
    """

    ALLOCATOR = ("num_alloc_retries", "num_device_alloc", "num_device_free")

    def __init__(self, runner) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self.allocator = [torch.cuda.memory_stats().get(key, 0) for key in self.ALLOCATOR]
        launch = runner.launch

        def timed(out, *args):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            result = launch(out, *args)
            end.record()  # the step's device work, its sampling included, is queued by now
            self.events.append((begin, end, len(out.scheduled)))
            return result

        runner.launch = timed

    def report(self) -> None:
        torch.cuda.synchronize()
        rows = []
        for (_, prev_end, _), (begin, end, batch) in zip(
            self.events, self.events[1:], strict=False
        ):
            rows.append((batch, prev_end.elapsed_time(begin), begin.elapsed_time(end)))
        big = [r for r in rows if r[0] >= 200] or rows
        gap = sum(r[1] for r in big) / len(big)
        step = sum(r[2] for r in big) / len(big)
        print(
            f"GPU idle gap between steps (batch >= 200 where any): {gap:.2f} ms per step, "
            f"step {step:.2f} ms -> idle {gap / (gap + step):.1%} ({len(big)} steps)"
        )
        stats = torch.cuda.memory_stats()
        retries, mallocs, frees = (
            stats.get(key, 0) - before
            for key, before in zip(self.ALLOCATOR, self.allocator, strict=True)
        )
        print(f"allocator: {retries} retries, {mallocs} cudaMalloc, {frees} cudaFree")


def run_splitfuse(model_dir: Path, requests: list[tuple[list[int], int]], args) -> Result:
    from app import EngineConfig, GenerationConfig, pipeline

    config = EngineConfig(
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_prefill_token_num=args.max_prefill_token_num,
        eager_mode=args.eager,
        async_scheduling=not args.no_async_scheduling,
        quant_policy=args.quant_policy,
    )
    with pipeline(str(model_dir), backend_config=config) as pipe:
        warm = GenerationConfig(max_new_tokens=4, top_k=1, ignore_eos=True)
        pipe([requests[0][0][:16]], gen_config=warm)
        gaps = GapMeter(pipe.engine.runner) if torch.cuda.is_available() else None
        configs = [
            GenerationConfig(max_new_tokens=n_out, top_k=1, ignore_eos=True)
            for _, n_out in requests
        ]
        profile = KernelProfile() if args.profile else contextlib.nullcontext()
        stacks = StackSampler() if args.stacks else contextlib.nullcontext()
        _sync()
        with profile, stacks:
            start = time.perf_counter()
            outputs = pipe([ids for ids, _ in requests], gen_config=configs)
            _sync()
            seconds = time.perf_counter() - start
        if gaps is not None:
            gaps.report()
        if args.stacks:
            stacks.report()
        kernels = profile.report(seconds) if args.profile else None
        max_batch = pipe.engine.config.max_batch_size
        info, stats = pipe.engine.info, pipe.engine.stats()
        print(
            f"splitfuse: KV pool {info.num_blocks * pipe.engine.config.block_size} tokens "
            f"(quant_policy {args.quant_policy}), {stats['num_preemptions']} preemptions"
        )
    produced = sum(o.generate_token_len for o in outputs)
    expected = sum(n for _, n in requests)
    if produced != expected:
        raise SystemExit(f"splitfuse produced {produced} tokens, expected {expected}")
    num_in = sum(len(i) for i, _ in requests)
    return Result("splitfuse", len(requests), num_in, produced, seconds, max_batch, kernels)


def run_transformers(model_dir: Path, requests: list[tuple[list[int], int]], args) -> Result:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {
        "auto": torch.bfloat16 if device == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    produced = 0
    # Static batches of similar lengths, left-padded, each run to its longest output.
    order = sorted(requests, key=lambda r: len(r[0]))
    _sync()
    start = time.perf_counter()
    for i in range(0, len(order), args.hf_batch_size):
        batch = order[i : i + args.hf_batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (tokens, _) in enumerate(batch):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        new = max(n for _, n in batch)
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        produced += sum(min(n, out.shape[1] - width) for _, n in batch)
    _sync()
    seconds = time.perf_counter() - start
    num_in = sum(len(i) for i, _ in requests)
    return Result("transformers", len(requests), num_in, produced, seconds, args.hf_batch_size)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model dir or GGUF (default: bundled)")
    parser.add_argument(
        "--model-config",
        default=None,
        help="random-weight model of a known shape: llama-3.1-8b, llama-3.2-1b",
    )
    parser.add_argument("--workload", default="custom", choices=["random-256", "mixed", "custom"])
    parser.add_argument("--num-prompts", type=positive_int, default=None)
    parser.add_argument("--input-len", type=positive_int, default=64)
    parser.add_argument("--output-len", type=positive_int, default=32)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument(
        "--max-batch-size",
        type=non_negative_int,
        default=0,
        help="0 (default): the engine's for the device",
    )
    parser.add_argument("--max-prefill-token-num", type=positive_int, default=8192)
    parser.add_argument("--hf-batch-size", type=positive_int, default=16)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="schedule each step after the last"
    )
    parser.add_argument(
        "--quant-policy", type=int, default=0, choices=[0, 4, 8], help="8: int8 KV, 4: int4"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="sum the GPU kernels by kind (torch.profiler)"
    )
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="sample the threads' Python stacks during the run and print where they wait",
    )
    parser.add_argument(
        "--hf-num-prompts",
        type=positive_int,
        default=None,
        help="run transformers on only the first N requests (it is slow); "
        "rates are compared, not totals",
    )
    parser.add_argument(
        "--blas",
        choices=["cublas", "cublaslt"],
        default=None,
        help="the CUDA library torch's matrix products go through (default: torch's choice)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile sums GPU kernels: it needs a CUDA device")
    if args.blas is not None:
        if not torch.cuda.is_available():
            parser.error("--blas picks a CUDA library: it needs a CUDA device")
        torch.backends.cuda.preferred_blas_library(args.blas)

    default_num = {"random-256": 1000, "mixed": 512, "custom": 32}[args.workload]
    num = args.num_prompts or default_num
    model_dir = build_model_dir(args.model, args.model_config)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    requests = make_workload(args.workload, num, args.input_len, args.output_len, vocab)
    results = [run_splitfuse(model_dir, requests, args)]
    gc.collect()  # the engine's KV cache must go before transformers loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.skip_hf:
        results.append(run_transformers(model_dir, requests[: args.hf_num_prompts], args))

    name = args.model_config or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    print(f"\n{describe_device()} | model {name} | workload {args.workload} x{num}")
    print(
        f"{'engine':<14} {'reqs':>6} {'in tok':>9} {'out tok':>9} {'seconds':>9} "
        f"{'out tok/s':>11} {'total tok/s':>11} {'req/s':>8} {'max batch':>9}"
    )
    for result in results:
        print(result.row())
    if len(results) == 2:
        print(
            f"splitfuse / transformers output tok/s: "
            f"{results[0].output_tok_s / results[1].output_tok_s:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": describe_device(),
                    "model": name,
                    "workload": args.workload,
                    "results": [
                        asdict(r)
                        | {
                            "output_tok_s": r.output_tok_s,
                            "total_tok_s": r.total_tok_s,
                            "req_s": r.req_s,
                        }
                        for r in results
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
