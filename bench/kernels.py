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
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine.models.layers import RopeConfig, RotaryEmbedding
from app.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from app.kernels.attention import (
    AttentionMetadata,
    kv_bytes_per_token,
    new_kv_cache,
    paged_attention_ref,
    paged_attention_triton,
    quantize_kv,
    quantize_kv_int4,
)
from app.kernels.decode_attention import (
    MAX_SPLITS,
    _decode_split_kernel,
    _num_sms,
    decode_num_splits,
    decode_tiles,
    longest_first,
    paged_decode_attention,
)
from app.kernels.linear import gemv_tiles, gemv_triton
from app.kernels.norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from app.kernels.prefill_attention import paged_prefill_attention, prefill_tiles
from app.kernels.rotary import rotary_and_cache_ref, rotary_and_cache_triton
from bench.common import describe_device

TOLERANCE = 1e-2  # relative L2 error; bf16 rounding alone gives a few 1e-3
Batch = tuple[tuple[int, int], ...]  # (context length after the step, new tokens) per sequence
Outputs = Callable[[], list[torch.Tensor]]  # one call of a kernel or reference: its outputs


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    block_size: int
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    decode_sweep: tuple[tuple[int, int], ...]  # the cases `--only decode-sweep` times
    # (batch, shortest, longest context): `--only decode-ragged`, contexts uniform in between
    decode_ragged: tuple[tuple[int, int, int], ...]
    gemm_rows: tuple[int, ...]  # token counts `--only gemm` times cuBLAS at
    prefill: tuple[tuple[str, Batch], ...]
    prefill_sweep: tuple[str, ...]  # names of `prefill` cases `--only prefill-sweep` times
    # (decode sequences, their context, GEMM rows) per micro-batch: `--only overlap`
    overlap: tuple[tuple[int, int, int], ...]
    tokens: tuple[int, ...]  # rows for the norm / rotary / activation kernels (block multiples)
    linears: tuple[tuple[str, int, int], ...]  # (name, out features, in features) for the GEMV


# (batch, context): latency-bound small batches up to the bandwidth-bound 256 x 4096.
DECODE_8B = ((1, 8192), (16, 2048), (32, 8192), (64, 1024), (128, 2048), (256, 128), (256, 1024),
             (256, 4096))  # fmt: skip
LLAMA_8B = Shapes(
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    hidden=4096,
    intermediate=14336,
    block_size=64,
    decode=DECODE_8B,
    # Few sequences (many splits), long contexts, random-256's decode steps.
    decode_sweep=((16, 2048), (256, 4096), (512, 384)),
    # `mixed`'s decode steps: prompts of 128-1024 tokens plus up to 512 generated, the batch
    # shrinking from 512 as requests finish.
    decode_ragged=(
        (512, 128, 1536),
        (256, 256, 1536),
        (128, 512, 1536),
        (64, 512, 1536),
        (48, 512, 1536),
        (32, 512, 1536),
        (16, 512, 1536),
    ),
    prefill=(
        ("prompt 8192", ((8192, 8192),)),
        # An admission step of `mixed`: prompts of 128-1,024 tokens, 8,640 in all.
        ("15 prompts 128-1024", tuple((n, n) for n in range(128, 1025, 64))),
        ("chunk 2048 after 6144", ((8192, 2048),)),
        ("4 prompts x 2048", ((2048, 2048),) * 4),
        # Mixed steps list their decodes first, as the scheduler does.
        ("128 dec @2048 + chunk 4096", ((2048, 1),) * 128 + ((4096, 4096),)),
        ("256 dec @384 + chunk 512", ((384, 1),) * 256 + ((512, 512),)),
    ),
    prefill_sweep=("prompt 8192", "15 prompts 128-1024"),
    # Half of a decode step of `mixed` (contexts ~768) and of `random-256` (~384); the GEMM rows
    # at 256 (decodes only) and 512 (with a prefill chunk).
    overlap=((256, 768, 256), (256, 768, 512), (256, 384, 256), (128, 1024, 128)),
    tokens=(256, 8192),
    gemm_rows=(512, 8192),  # a full decode batch, an admission step's token budget
    linears=(
        ("qkv", 6144, 4096),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ),
)
# Llama-3.2-1B: head_dim 64 (as SmolLM2's), the same GQA 4 and cases, its own matrices.
LLAMA_1B = replace(
    LLAMA_8B,
    head_dim=64,
    hidden=2048,
    intermediate=8192,
    linears=(
        ("qkv", 3072, 2048),
        ("o", 2048, 2048),
        ("gate_up", 16384, 2048),
        ("down", 2048, 8192),
        ("lm_head", 128256, 2048),
    ),
)
TINY = Shapes(
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    hidden=64,
    intermediate=96,
    block_size=16,
    decode=((1, 300), (3, 100)),  # the first takes two splits
    decode_sweep=((3, 100),),
    decode_ragged=((5, 20, 300),),
    prefill=(("mixed", ((17, 1), (300, 1), (40, 40), (90, 30))), ("prompts", ((40, 40), (90, 90)))),
    prefill_sweep=("prompts",),
    overlap=((3, 100, 8),),
    tokens=(32,),
    gemm_rows=(4, 16),
    linears=(("proj", 40, 64), ("wide", 96, 1100)),
)

SHAPES = {"llama-3.1-8b": LLAMA_8B, "llama-3.2-1b": LLAMA_1B}


@dataclass
class Row:
    kernel: str
    case: str
    ms: float
    ref_ms: float
    work: float  # bytes moved or FLOPs per call
    unit: str  # "GB/s" or "TFLOP/s"
    rel_err: float
    ok: bool

    @property
    def rate(self) -> float:
        return self.work / self.ms / (1e6 if self.unit == "GB/s" else 1e9)

    def line(self) -> str:
        return (
            f"{self.kernel:<16} {self.case:<28} {self.ms:>9.4f} {self.rate:>9.1f} {self.unit:<7} "
            f"{self.ref_ms:>9.4f} {self.ref_ms / self.ms:>7.1f}x {self.rel_err:>9.2e} "
            f"{'ok' if self.ok else 'FAIL'}"
        )


HEADER = (
    f"{'kernel':<16} {'case':<28} {'ms':>9} {'rate':>9} {'':<7} {'torch ms':>9} {'speedup':>8} "
    f"{'rel err':>9} check"
)


def bench_time(fn: Callable[[], object]) -> float:
    """Median milliseconds per call: do_bench on a GPU, a few wall-clock runs elsewhere."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


# The decode-attention launch settings `--only decode-sweep` tries: (keys per tile, warps, stages).
DECODE_GRID = list(itertools.product((32, 64, 128, 256), (4, 8), (1, 2, 3)))

# The prefill-attention launch settings `--only prefill-sweep` tries: (query rows per tile, keys
# per tile, warps, stages); a tile's rows are its tokens times the GQA group.
PREFILL_GRID = list(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3)))
# A quantized cache's tiles are widened in registers: one load stage (no pipelining) too.
PREFILL_QUANT_GRID = list(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3)))

# The GEMV launch settings `--only gemv-sweep` tries: (rows per program, columns per load, warps,
# stages), tiles of at most 16k elements.
GEMV_GRID = [
    setting
    for setting in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (1, 3))
    if setting[0] * setting[1] <= 16384
]


def graph_time(fn: Callable[[], object]) -> float:
    """Like bench_time, but replayed from a CUDA graph on a GPU: for kernels of a few
    microseconds, whose launch from Python would otherwise be timed too."""
    if torch.cuda.is_available():
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return bench_time(fn)


def compiled_resources(fn: triton.JITFunction) -> set[str]:
    """Registers and shared memory of each variant `fn` has compiled on the GPU: what decides
    how many of its programs an SM holds at once."""
    found = set()
    for cache in getattr(fn, "device_caches", {}).values():
        for kernel in cache[0].values():
            regs, shared = getattr(kernel, "n_regs", None), kernel.metadata.shared
            warps = kernel.metadata.num_warps
            found.add(f"compiled: {warps} warps, {regs} registers/thread, {shared} B shared")
    return found


def timed_setting(timed: list[tuple[float, tuple]], ms: float, setting: tuple) -> None:
    """Keep one sweep timing, and print it at once: a call cut short still shows what it
    timed (the summary comes at the end)."""
    timed.append((ms, setting))
    print(f"  timed {setting}: {ms * 1e3:.1f} us", flush=True)


def kv_label(quant_policy: int) -> str:
    """A case name's suffix for a quantized KV cache."""
    return f" int{quant_policy} KV" if quant_policy else ""


def compare(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, bool]:
    """Relative L2 error over all outputs together, and whether it passes (NaN fails)."""
    pairs = zip(outs, refs, strict=True)
    err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in pairs)
    norm = sum(float(r.double().pow(2).sum()) for r in refs)
    rel = math.sqrt(err / norm)
    return rel, not any(bool(o.isnan().any()) for o in outs) and rel < TOLERANCE


class Bench:
    def __init__(self, shapes: Shapes, dtype: torch.dtype, device: str) -> None:
        self.s, self.dtype, self.device = shapes, dtype, device
        self.rows: list[Row] = []
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.host_gen = torch.Generator().manual_seed(0)  # block-table shuffles

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device).to(self.dtype)

    def nan(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype or self.dtype, device=self.device)

    def record(
        self, kernel: str, case: str, run: Outputs, ref: Outputs, work: float, unit: str
    ) -> None:
        """Check the first call of `run` against `ref`, then time both."""
        rel, ok = compare(run(), ref())
        row = Row(kernel, case, bench_time(run), bench_time(ref), work, unit, rel, ok)
        self.rows.append(row)
        print(row.line(), flush=True)

    # -- attention ------------------------------------------------------------------------

    def metadata(self, batch: Batch, tables: torch.Tensor) -> AttentionMetadata:
        """One step's metadata for `batch` over the device block tables `[B, width]`."""
        bs = self.s.block_size
        lens, query_lens = [n for n, _ in batch], [q for _, q in batch]
        seq = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(query_lens))
        pos = torch.cat([torch.arange(n - q, n) for n, q in batch])
        seq, pos = seq.to(self.device), pos.to(self.device)
        ints = {"dtype": torch.int32, "device": self.device}
        return AttentionMetadata(
            query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], **ints),
            seq_lens=torch.tensor(lens, **ints),
            block_tables=tables,
            slot_mapping=tables[seq, pos // bs].long() * bs + pos % bs,
            query_lens_cpu=query_lens,
            seq_lens_cpu=lens,
            max_query_len=max(query_lens),
            max_seq_len=max(lens),
        )

    def paged(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Caches holding random K/V at every sequence position and NaN elsewhere, shuffled
        block tables (one spare block that no table names), and the step's metadata."""
        s = self.s
        need = [math.ceil(n / s.block_size) for n, _ in batch]
        pool = torch.randperm(sum(need) + 1, generator=self.host_gen).tolist()
        tables = [[pool.pop() for _ in range(k)] + [0] * (max(need) - k) for k in need]
        table_t = torch.tensor(tables, dtype=torch.int32, device=self.device)
        shape = (sum(need) + 1, s.block_size, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = self.nan(*shape), self.nan(*shape)
        every = self.metadata(tuple((n, n) for n, _ in batch), table_t).slot_mapping
        for cache in (k_cache, v_cache):
            rows = cache.view(-1, s.num_kv_heads, s.head_dim)
            rows[every] = self.randn(len(every), s.num_kv_heads, s.head_dim)
        return k_cache, v_cache, self.metadata(batch, table_t)

    def paged_caches(self, batch: Batch, quant_policy: int) -> tuple:
        """`paged`'s caches, quantized for quant_policy 8 or 4 with their scales, in the
        engine's layout (`new_kv_cache`: values slot-fastest, scales head-major within a
        block): k, v, kv_scales (None for a cache in the model's dtype), metadata."""
        k_cache, v_cache, meta = self.paged(batch)
        if not quant_policy:
            return k_cache, v_cache, None, meta
        quantize = quantize_kv_int4 if quant_policy == 4 else quantize_kv
        (k_q, k_scale), (v_q, v_scale) = quantize(k_cache), quantize(v_cache)
        shape = (*k_cache.shape[:3], self.s.head_dim)
        cache = new_kv_cache(*shape, self.dtype, self.device, quant_policy)
        for stored, computed in zip(cache, (k_q, v_q, k_scale, v_scale), strict=True):
            stored.copy_(computed)
        return cache[0], cache[1], (cache[2], cache[3]), meta

    def decode_inputs(self, batch_size: int, context: int, quant_policy: int) -> tuple:
        """q, the caches, their scales (None for a cache in the model's dtype) and metadata."""
        batch = ((context, 1),) * batch_size
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(batch_size, self.s.num_heads, self.s.head_dim)
        return q, k_cache, v_cache, kv_scales, meta

    def decode(
        self, batch_size: int, context: int, quant_policy: int = 0, *, sweep: bool = False
    ) -> None:
        """One decode-attention case; `sweep` times every DECODE_GRID setting on it instead."""
        s = self.s
        q, k_cache, v_cache, kv_scales, meta = self.decode_inputs(batch_size, context, quant_policy)
        scale = s.head_dim**-0.5
        out = self.nan(*q.shape)

        def run(tiles: tuple[int, int, int] | None = None) -> list[torch.Tensor]:
            args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
            return [paged_decode_attention(*args, kv_scales=kv_scales, tiles=tiles, out=out)]

        def run_ref() -> list[torch.Tensor]:
            return [paged_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales=kv_scales)]

        per_token = kv_bytes_per_token(s.num_kv_heads, s.head_dim, q.dtype, quant_policy)
        work = batch_size * context * per_token + 2 * q.numel() * q.element_size()
        case = f"batch {batch_size} ctx {context}" + kv_label(quant_policy)
        if not sweep:
            self.record("decode attn", case, run, run_ref, work, "GB/s")
            return
        ref = run_ref()
        chosen = decode_tiles(s.head_dim * q.element_size(), quant_policy, batch_size)
        timed = []
        for setting in DECODE_GRID:
            try:
                rel, ok = compare(run(setting), ref)
            except triton.runtime.errors.OutOfResources:
                continue  # its tiles do not fit in shared memory
            if not ok:
                print(f"  {setting}: wrong (rel err {rel:.2e})")
                continue
            timed_setting(timed, graph_time(lambda setting=setting: run(setting)), setting)
        self.print_sweep(f"decode sweep {case}", "decode_tiles", chosen, timed, work)

    def decode_ragged(
        self, batch_size: int, shortest: int, longest: int, quant_policy: int = 0
    ) -> None:
        """Decode attention over contexts of mixed lengths (most ending inside a key tile) at
        every split count up to 8 (and the one `decode_num_splits` picks for a block table as
        wide as the longest context), with the programs started in row order and longest
        first."""
        s = self.s
        lens = torch.randint(shortest, longest + 1, (batch_size,), generator=self.host_gen)
        batch = tuple((n, 1) for n in lens.tolist())
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(batch_size, s.num_heads, s.head_dim)
        scale = s.head_dim**-0.5
        ref = [paged_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales=kv_scales)]
        out = self.nan(*q.shape)
        order = longest_first(meta.seq_lens)
        per_token = kv_bytes_per_token(s.num_kv_heads, s.head_dim, q.dtype, quant_policy)
        work = int(lens.sum()) * per_token + 2 * q.numel() * q.element_size()
        width = meta.block_tables.shape[1] * s.block_size
        auto = decode_num_splits(batch_size, s.num_kv_heads, width, _num_sms(q.device))
        case = f"batch {batch_size} ctx {shortest}-{longest}" + kv_label(quant_policy)
        print(f"\ndecode ragged, {case} (mean {lens.float().mean():.0f}), picked {auto} split(s):")
        print(f"  {'splits':>6} {'order':<14} {'us':>8} {'GB/s':>8}")
        # MAX_SPLITS: what a CUDA graph's launch asks at batch 1, its splits counted for the
        # graph's block table (as wide as the context window).
        for splits in sorted({1, 2, 3, 4, 6, 8, auto, MAX_SPLITS}):
            for ordered in (None, order):

                def run(splits: int = splits, ordered: torch.Tensor | None = ordered) -> list:
                    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
                    opts = {"num_splits": splits, "order": ordered, "out": out}
                    return [paged_decode_attention(*args, kv_scales=kv_scales, **opts)]

                rel, ok = compare(run(), ref)
                if not ok:
                    sys.exit(f"decode ragged {case}, {splits} splits: wrong (rel err {rel:.2e})")
                ms = graph_time(run)
                name = "rows" if ordered is None else "longest first"
                print(f"  {splits:>6} {name:<14} {ms * 1e3:>8.1f} {work / ms / 1e6:>8.1f}")
        sort_ms = graph_time(lambda: longest_first(meta.seq_lens))
        print(f"  ordering the rows (once per step): {sort_ms * 1e3:.1f} us")
        for line in compiled_resources(_decode_split_kernel):
            print(f"  {line}")

    def prefill(
        self, name: str, batch: Batch, quant_policy: int = 0, *, sweep: bool = False
    ) -> None:
        """One prefill-attention case; `sweep` times every PREFILL_GRID setting on it instead
        (a batch of prompts and chunks only: no decodes)."""
        s = self.s
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(sum(meta.query_lens_cpu), s.num_heads, s.head_dim)
        scale = s.head_dim**-0.5
        out, ref = self.nan(*q.shape), torch.empty_like(q)
        # The reference pads every sequence to the longest query; run it on groups of equal
        # query length (all decodes together, each longer query alone) to keep memory bounded.
        starts = meta.query_start_loc.tolist()
        decodes = [i for i, (_, n) in enumerate(batch) if n == 1]
        groups = [decodes] * bool(decodes) + [[i] for i, (_, n) in enumerate(batch) if n > 1]
        parts = [
            self.metadata(tuple(batch[i] for i in g), meta.block_tables[torch.tensor(g)])
            for g in groups
        ]
        rows = [
            torch.cat([torch.arange(starts[i], starts[i + 1]) for i in g]).to(self.device)
            for g in groups
        ]

        def run() -> list[torch.Tensor]:
            return [
                paged_attention_triton(
                    q, k_cache, v_cache, meta, scale, kv_scales=kv_scales, out=out
                )
            ]

        def run_ref() -> list[torch.Tensor]:
            for part, idx in zip(parts, rows, strict=True):
                ref[idx] = paged_attention_ref(
                    q[idx], k_cache, v_cache, part, scale, kv_scales=kv_scales
                )
            return [ref]

        visible = sum(sum(range(n - k + 1, n + 1)) for n, k in batch)  # keys per query, summed
        work = 4 * visible * s.num_heads * s.head_dim
        name += kv_label(quant_policy)
        if not sweep:
            self.record("prefill attn", name, run, run_ref, work, "TFLOP/s")
            return
        ref_out = run_ref()  # `ref`, which no setting's run writes
        group = triton.next_power_of_2(s.num_heads // s.num_kv_heads)
        timed = []
        for rows_per_tile, *launch in PREFILL_QUANT_GRID if quant_policy else PREFILL_GRID:
            setting = (max(1, rows_per_tile // group), *launch)

            def run_setting(setting: tuple[int, ...] = setting) -> list[torch.Tensor]:
                args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens)
                opts = {"kv_scales": kv_scales, "tiles": setting, "out": out}
                return [paged_prefill_attention(*args, meta.query_start_loc, scale, **opts)]

            try:
                rel, ok = compare(run_setting(), ref_out)
            except triton.runtime.errors.OutOfResources:
                continue  # its tiles do not fit in shared memory
            if not ok:
                print(f"  {setting}: wrong (rel err {rel:.2e})")
                continue
            timed_setting(timed, bench_time(run_setting), setting)
        block_q, _, block_n, warps, stages = prefill_tiles(
            s.head_dim, s.num_heads // s.num_kv_heads, q.element_size(), quant_policy
        )
        rule = "prefill_tiles (query tokens, keys, warps, stages)"
        chosen = (block_q, block_n, warps, stages)
        self.print_sweep(f"prefill sweep {name}", rule, chosen, timed, work, unit="TFLOP/s")

    def overlap(self, batch_size: int, context: int, rows: int) -> None:
        """A layer's four GEMMs on `rows` tokens beside decode attention over `batch_size`
        sequences of `context`: one after the other, then on two streams at once, with cuBLAS
        given every SM or leaving some to the attention (torch's experimental SM carveout). Two
        micro-batches, each one's GEMMs running beside the other's attention, would take twice
        the concurrent time where the whole batch takes its GEMMs and attention in turn."""
        q, k_cache, v_cache, _, meta = self.decode_inputs(batch_size, context, 0)
        scale, out = self.s.head_dim**-0.5, self.nan(*q.shape)
        mats = [(self.randn(n, k) / k**0.5, k) for _, n, k in self.s.linears[:4]]
        x = {m: {k: self.randn(m, k) for _, k in mats} for m in (rows, 2 * rows)}
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        whole = self.decode_inputs(2 * batch_size, context, 0)
        whole_args = (whole[0], whole[1], whole[2], whole[4].block_tables, whole[4].seq_lens)
        whole_out = self.nan(*whole[0].shape)

        def gemms(m: int = rows) -> None:
            for w, k in mats:
                torch.nn.functional.linear(x[m][k], w)

        def attend() -> None:
            paged_decode_attention(*args, out=out)

        def whole_step() -> None:
            gemms(2 * rows)
            paged_decode_attention(*whole_args, scale, out=whole_out)

        side = [torch.cuda.Stream() for _ in range(2)] if q.is_cuda else []

        def concurrent() -> None:
            if not side:
                gemms()
                return attend()
            main = torch.cuda.current_stream()
            for stream, work in zip(side, (gemms, attend), strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    work()
            for stream in side:
                main.wait_stream(stream)

        attention, both = bench_time(attend), bench_time(whole_step)
        print(
            f"overlap: {rows} GEMM rows beside {batch_size} x {context} decode attention "
            f"({attention * 1e3:.0f} us); the whole batch ({2 * rows} rows, {2 * batch_size} "
            f"sequences) in turn {both * 1e3:.0f} us",
            flush=True,
        )
        for carveout in (0, 16, 32, 48, 64) if side else (0,):
            torch._C._set_sm_carveout_experimental(carveout or None)
            alone, paired = bench_time(gemms), bench_time(concurrent)
            print(
                f"  cuBLAS leaving {carveout:>2} SMs: GEMMs {alone * 1e3:.0f} us, in turn with "
                f"the attention {(alone + attention) * 1e3:.0f} us, on two streams "
                f"{paired * 1e3:.0f} us ({paired / (alone + attention):.2f}); two micro-batches "
                f"{2 * paired * 1e3:.0f} us against the whole batch ({2 * paired / both:.2f})",
                flush=True,
            )
        torch._C._set_sm_carveout_experimental(None)

    # -- elementwise ----------------------------------------------------------------------

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
        rates = []
        default = torch.backends.cuda.preferred_blas_library()
        # torch's two CUDA paths for one product (the CPU has its own).
        for library in ("cublas", "cublaslt") if x.is_cuda else ("cpu",):
            if x.is_cuda:
                torch.backends.cuda.preferred_blas_library(library)
            ms = bench_time(lambda: torch.nn.functional.linear(x, w))
            rates.append(f"{library} {ms * 1e3:8.1f} us {2 * rows * n * k / ms / 1e9:6.1f} TFLOP/s")
        torch.backends.cuda.preferred_blas_library(default)
        print(f"gemm {name:<8} {rows:>5} x {n:>6} x {k:>5}: {'; '.join(rates)}")

    def gemv_sweep(self, name: str, n: int, k: int, top: int = 5) -> None:
        """Every GEMV_GRID setting on one shape, checked and timed from a CUDA graph: the data
        `gemv_tiles` is chosen from (rerun it on a new kind of GPU)."""
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
        self.print_sweep(f"gemv sweep {name} {n} x {k}", "gemv_tiles", gemv_tiles(n, k), timed,
                         bytes_moved, top)  # fmt: skip

    @staticmethod
    def print_sweep(
        title: str, rule: str, chosen: tuple, timed: list[tuple[float, tuple]], work: float,
        top: int = 5, unit: str = "GB/s",
    ) -> None:  # fmt: skip
        """The rule's current setting and the `top` fastest, with their rate of `work` (bytes
        for GB/s, operations for TFLOP/s)."""
        per_ms = {"GB/s": 1e6, "TFLOP/s": 1e9}[unit]
        timed.sort()
        now = next((t for t, setting in timed if setting == chosen), float("nan"))
        print(f"{title}: {rule} {chosen} {now * 1e3:.1f} us; best:", flush=True)
        for t, setting in timed[:top]:
            print(f"  {t * 1e3:8.1f} us {work / t / per_ms:7.0f} {unit}  {setting}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (interpreter dry run)")
    parser.add_argument(
        "--shapes", choices=sorted(SHAPES), default="llama-3.1-8b", help="the model's shapes"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--only", default="decode,prefill,elementwise,gemv", help="comma-separated groups to run"
    )
    parser.add_argument(
        "--gemm-rows", default=None, help="comma-separated token counts for --only gemm"
    )
    parser.add_argument(
        "--kv",
        default="0,8,4",
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter cannot multiply bf16 in tl.dot (triton-lang/triton#11584): fp16 on CPU.
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    shapes = TINY if args.tiny else SHAPES[args.shapes]
    if args.gemm_rows:
        shapes = replace(shapes, gemm_rows=tuple(int(n) for n in args.gemm_rows.split(",")))
    if args.sweep_cases:
        shapes = replace(shapes, prefill_sweep=tuple(args.sweep_cases.split(",")))
    if args.ragged:
        cases = tuple(tuple(int(n) for n in case.split(":")) for case in args.ragged.split(","))
        shapes = replace(shapes, decode_ragged=cases)
    print(f"device: {describe_device()}, triton {triton.__version__}, {dtype}", flush=True)
    bench = Bench(shapes, dtype, device)
    print(HEADER)
    groups = set(args.only.split(","))
    for quant_policy in (int(n) for n in args.kv.split(",")):
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
