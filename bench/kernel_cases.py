"""What `bench/kernels.py` measures: the model shapes with their kernel cases, and the launch
settings its sweeps try."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

Batch = tuple[tuple[int, int], ...]  # (context length after the step, new tokens) per sequence


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
