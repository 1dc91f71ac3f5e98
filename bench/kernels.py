"""Kernel benchmark: every Triton kernel against its torch reference at Llama-3.1-8B shapes.

    python bench/kernels.py                              # on a GPU: check, time, print a table
    python bench/kernels.py --json kernels.json          # also write the numbers
    TRITON_INTERPRET=1 python bench/kernels.py --tiny    # CPU dry run of every check
    python bench/kernels.py --shapes llama-3.2-1b        # head_dim 64 and the 1B's matrices
    python bench/kernels.py --only gemv-sweep            # the one-row GEMV's launch settings
    python bench/kernels.py --only decode-sweep          # decode attention's launch settings
    python bench/kernels.py --only decode-ragged         # its split counts and program order
    python bench/kernels.py --only decode-ragged --ragged 1:384:384  # split counts, a case
    python bench/kernels.py --only prefill-sweep         # prefill attention's launch settings
    python bench/kernels.py --only prefill-sweep --kv 4 --sweep-cases "prompt 8192"  # int4, a case
    python bench/kernels.py --only gemm                  # cuBLAS TFLOP/s at the linear shapes
    python bench/kernels.py --only gemm --gemm-rows 256,264,272  # ... at these token counts
    python bench/kernels.py --only overlap               # GEMMs beside decode attention

Each case runs on random inputs (outputs poisoned with NaN first, unwritten cache slots NaN),
checks the kernel against the reference (relative error ||out - ref|| / ||ref|| within bf16
tolerance, no NaN anywhere), then times both with triton.testing.do_bench (median). Attention
cases use block_size 64 and shuffled block tables; memory-bound kernels report GB/s of
compulsory traffic, prefill attention TFLOP/s of causal attention. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.argtypes import positive_int
from app.engine.models.layers import RopeConfig, RotaryEmbedding
from app.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from app.kernels.attention import kv_bytes_per_token, new_kv_cache
from app.kernels.linear import GEMV_TILES, gemv_triton
from app.kernels.norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from app.kernels.rotary import rotary_and_cache_ref, rotary_and_cache_triton
from bench.args import int_list
from bench.attention_bench import AttentionBench
from bench.common import describe_device
from bench.kernel_cases import GEMV_GRID, SHAPES, TINY
from bench.kernel_timing import (
    HEADER,
    Outputs,
    bench_time,
    compare,
    graph_time,
    kv_label,
    timed_setting,
)

GROUPS = [
    "decode", "decode-sweep", "decode-ragged", "prefill", "prefill-sweep", "elementwise", "gemv",
    "gemm", "gemv-sweep", "overlap",
]  # fmt: skip


def kv_policy(text: str) -> int:
    """A KV cache's quant_policy: 0 (the model's dtype), 8 or 4."""
    if text not in ("0", "8", "4"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a KV cache: 0, 8 or 4")
    return int(text)


def ragged_cases(text: str) -> tuple[tuple[int, int, int], ...]:
    """Comma-separated BATCH:SHORTEST:LONGEST, 1 <= SHORTEST <= LONGEST."""
    cases = []
    for case in text.split(","):
        try:
            batch, shortest, longest = (positive_int(n) for n in case.split(":"))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{case!r} is not BATCH:SHORTEST:LONGEST") from None
        if shortest > longest:
            raise argparse.ArgumentTypeError(f"{case!r}: SHORTEST is above LONGEST")
        cases.append((batch, shortest, longest))
    return tuple(cases)


class Bench(AttentionBench):
    """Every case: attention (`AttentionBench`), the elementwise kernels and the linear layers."""

    def norms(self, tokens: int) -> None:
        n, elem = self.s.hidden, self.dtype.itemsize
        x, residual, weight = self.randn(tokens, n), self.randn(tokens, n), self.randn(n)
        out, res_out = self.nan(tokens, n), self.nan(tokens, n)
        self.record(
            "rms_norm", f"{tokens} x {n}",
            lambda: [rms_norm_triton(x, weight, 1e-5, out=out)],
            lambda: [rms_norm_ref(x, weight, 1e-5)],
            (2 * tokens + 1) * n * elem, "GB/s",
        )  # fmt: skip
        self.record(
            "add+rms_norm", f"{tokens} x {n}",
            lambda: list(fused_add_rms_norm_triton(
                x, residual, weight, 1e-5, out=out, residual_out=res_out
            )),
            lambda: list(fused_add_rms_norm_ref(x, residual, weight, 1e-5)),
            (4 * tokens + 1) * n * elem, "GB/s",
        )  # fmt: skip

    def rotary(self, tokens: int, quant_policy: int = 0) -> None:
        s, elem = self.s, self.dtype.itemsize
        rope = RopeConfig("llama3", 500000.0, 131072, 8.0, 1.0, 4.0, 8192)
        positions = torch.randint(0, 8192, (tokens,), generator=self.gen, device=self.device)
        cos, sin = RotaryEmbedding(s.head_dim, rope, torch.device(self.device))(positions)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        qkv = self.randn(tokens, q_size + 2 * kv_size)
        # Every cache row gets exactly one token (shuffled), so no NaN may survive the write.
        slots = torch.randperm(tokens, generator=self.gen, device=self.device)
        shape = (tokens // s.block_size, s.block_size, s.num_kv_heads, s.head_dim)

        def setup(fn: Callable[..., None]) -> Outputs:
            """In-place op on its own copy of q/k/v and caches; returns all it writes."""
            packed = qkv.clone()
            cache = new_kv_cache(*shape, self.dtype, self.device, quant_policy, fill=math.nan)
            q, k, v = packed.split([q_size, kv_size, kv_size], dim=-1)
            args = (
                q.view(tokens, s.num_heads, s.head_dim), k.view(tokens, s.num_kv_heads, -1),
                v.view(tokens, s.num_kv_heads, -1), cos, sin, cache[0], cache[1], slots,
                cache[2:] or None,
            )  # fmt: skip

            def call() -> list[torch.Tensor]:
                fn(*args)
                return [packed, *cache]

            return call

        # q/k rotate further on every call; both sides are compared after their first call.
        cache_bytes = kv_bytes_per_token(s.num_kv_heads, s.head_dim, self.dtype, quant_policy)
        work = tokens * ((2 * q_size + 3 * kv_size) * elem + cache_bytes + s.head_dim * 4 + 8)
        run, run_ref = setup(rotary_and_cache_triton), setup(rotary_and_cache_ref)
        case = f"{tokens} tokens" + kv_label(quant_policy)
        self.record("rope+kv write", case, run, run_ref, work, "GB/s")

    def silu(self, tokens: int) -> None:
        size, elem = self.s.intermediate, self.dtype.itemsize
        x = self.randn(tokens, 2 * size)
        out = self.nan(tokens, size)
        self.record(
            "silu_and_mul", f"{tokens} x {size}",
            lambda: [silu_and_mul_triton(x, out=out)],
            lambda: [silu_and_mul_ref(x)],
            3 * tokens * size * elem, "GB/s",
        )  # fmt: skip

    def gemv(self, name: str, n: int, k: int) -> None:
        x, w, out_elem = self.randn(1, k), self.randn(n, k) / k**0.5, self.dtype.itemsize
        self.record(
            "gemv (1 row)", f"{name} {n} x {k}",
            lambda: [gemv_triton(x, w)],
            lambda: [torch.nn.functional.linear(x, w)],  # cuBLAS: the time to beat
            (n * k + k + n) * out_elem, "GB/s",
        )  # fmt: skip

    def gemm(self, name: str, n: int, k: int, rows: int) -> None:
        """cuBLAS (F.linear) on `rows` tokens: the arithmetic rate the engine's GEMMs run at,
        which bounds every batched step."""
        x, w = self.randn(rows, k), self.randn(n, k) / k**0.5
        zero = torch.zeros(n, dtype=w.dtype, device=w.device)
        rates = []
        default = torch.backends.cuda.preferred_blas_library()
        # torch's two CUDA paths for one product (the CPU has its own), and a zero bias, which
        # takes cuBLASLt's bias epilogue without changing the preferred library.
        for library in ("cublas", "cublaslt", "cublas+bias") if x.is_cuda else ("cpu",):
            if x.is_cuda:
                torch.backends.cuda.preferred_blas_library(library.removesuffix("+bias"))
            bias = zero if library.endswith("+bias") else None
            ms = bench_time(lambda bias=bias: torch.nn.functional.linear(x, w, bias))
            rates.append(f"{library} {ms * 1e3:8.1f} us {2 * rows * n * k / ms / 1e9:6.1f} TFLOP/s")
        torch.backends.cuda.preferred_blas_library(default)
        print(f"gemm {name:<8} {rows:>5} x {n:>6} x {k:>5}: {'; '.join(rates)}")

    def gemv_sweep(self, name: str, n: int, k: int, top: int = 5) -> None:
        """Every GEMV_GRID setting on one shape, checked and timed from a CUDA graph: the data
        `GEMV_TILES` is chosen from (rerun it on a new kind of GPU)."""
        x, w = self.randn(1, k), self.randn(n, k) / k**0.5
        ref = [torch.nn.functional.linear(x, w)]
        timed: list[tuple[float, tuple[int, int, int, int]]] = []
        for setting in GEMV_GRID:

            def run(setting: tuple[int, int, int, int] = setting) -> list[torch.Tensor]:
                return [gemv_triton(x, w, tiles=setting)]

            rel, ok = compare(run(), ref)
            if not ok:
                print(f"  {setting}: wrong (rel err {rel:.2e})")
                continue
            timed_setting(timed, graph_time(run), setting)
        bytes_moved = (n * k + k + n) * self.dtype.itemsize
        self.print_sweep(f"gemv sweep {name} {n} x {k}", "GEMV_TILES", GEMV_TILES, timed,
                         bytes_moved, top)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (interpreter dry run)")
    parser.add_argument(
        "--shapes", choices=sorted(SHAPES), default="llama-3.1-8b", help="the model's shapes"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--only",
        default="decode,prefill,elementwise,gemv",
        help=f"comma-separated groups to run, of: {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--gemm-rows", type=int_list(), default=None, help="comma-separated token counts"
    )
    parser.add_argument(
        "--kv",
        type=int_list(kv_policy),
        default=[0, 8, 4],
        help="comma-separated KV caches (quant_policy) for the attention and rope cases: "
        "0 model dtype, 8 int8, 4 int4",
    )
    parser.add_argument(
        "--sweep-cases",
        default=None,
        help="comma-separated names of prefill cases for --only prefill-sweep",
    )
    parser.add_argument(
        "--ragged",
        type=ragged_cases,
        default=None,
        help="comma-separated BATCH:SHORTEST:LONGEST cases for --only decode-ragged",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="the activations' dtype (default bfloat16 on a GPU, float16 on the CPU)",
    )
    args = parser.parse_args()
    groups = set(args.only.split(","))
    if not groups <= set(GROUPS):
        parser.error(f"unknown --only groups {sorted(groups - set(GROUPS))}; known: {GROUPS}")
    shapes = TINY if args.tiny else SHAPES[args.shapes]
    names = [name for name, _ in shapes.prefill]
    unknown = set(args.sweep_cases.split(",")) - set(names) if args.sweep_cases else set()
    if unknown:
        parser.error(f"unknown --sweep-cases {sorted(unknown)}; known: {names}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter cannot multiply bf16 in tl.dot (triton-lang/triton#11584): fp16 on CPU.
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    if args.gemm_rows:
        shapes = replace(shapes, gemm_rows=tuple(args.gemm_rows))
    if args.sweep_cases:
        shapes = replace(shapes, prefill_sweep=tuple(args.sweep_cases.split(",")))
    if args.ragged:
        shapes = replace(shapes, decode_ragged=args.ragged)
    print(f"device: {describe_device()}, triton {triton.__version__}, {dtype}", flush=True)
    bench = Bench(shapes, dtype, device)
    print(HEADER)
    for quant_policy in args.kv:
        for batch_size, context in shapes.decode if "decode" in groups else ():
            bench.decode(batch_size, context, quant_policy)
        for batch_size, context in shapes.decode_sweep if "decode-sweep" in groups else ():
            bench.decode(batch_size, context, quant_policy, sweep=True)
        for case in shapes.decode_ragged if "decode-ragged" in groups else ():
            bench.decode_ragged(*case, quant_policy)
        for name, batch in shapes.prefill if "prefill" in groups else ():
            bench.prefill(name, batch, quant_policy)
        sweeps = shapes.prefill_sweep if "prefill-sweep" in groups else ()
        for name, batch in ((n, b) for n, b in shapes.prefill if n in sweeps):
            bench.prefill(name, batch, quant_policy, sweep=True)
        for tokens in shapes.tokens if "elementwise" in groups else ():
            bench.rotary(tokens, quant_policy)
    for tokens in shapes.tokens if "elementwise" in groups else ():
        bench.norms(tokens)
        bench.silu(tokens)
    for name, n, k in shapes.linears if "gemv" in groups else ():
        bench.gemv(name, n, k)
    gemms = itertools.product(shapes.gemm_rows, shapes.linears) if "gemm" in groups else ()
    for rows, (name, n, k) in gemms:
        bench.gemm(name, n, k, rows)
    for name, n, k in shapes.linears if "gemv-sweep" in groups else ():
        bench.gemv_sweep(name, n, k)
    for case in shapes.overlap if "overlap" in groups else ():
        bench.overlap(*case)
    print(f"\n{HEADER}")
    for row in bench.rows:
        print(row.line())
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": describe_device(),
                    "triton": triton.__version__,
                    "dtype": str(dtype),
                    "rows": [asdict(r) | {"rate": r.rate} for r in bench.rows],
                },
                indent=2,
            )
        )
    failed = [f"{r.kernel} {r.case}" for r in bench.rows if not r.ok]
    if failed:
        sys.exit(f"checks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
