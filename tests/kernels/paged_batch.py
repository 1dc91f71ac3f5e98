"""Random paged-attention batches for the kernel tests: shuffled block tables, a NaN-filled cache
with random keys/values at every written position, and the AttentionMetadata of one step."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from app.kernels.attention import AttentionMetadata, KVScales, new_kv_cache, write_kv_cache

# Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton
# was imported; with neither, the Triton-vs-reference tests have nothing to run on.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1",
)
# The interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584); float16
# takes the same half-precision path through the attention kernels.
HALF_DTYPES = [torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer poisoned with NaN, so any element a kernel skips shows up."""
    return torch.full_like(x, float("nan"))


def close(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: tight for float32, about one bf16/fp16 rounding otherwise."""
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, H, hd]
    k_cache: torch.Tensor  # [N, block_size, kvh, hd]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    kv_scales: KVScales | None = None  # a quantized cache's scales [N, block_size, kvh(, 2)]


def paged_batch(
    batch: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    quant_policy: int = 0,
) -> PagedBatch:
    """`batch` lists (context length after this step, new tokens this step) per sequence;
    `quant_policy=8` (4) stores the keys and values as int8 (int4) with their scales."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(s / block_size) for s, _ in batch) + 2
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cache = new_kv_cache(*shape, dtype, "cpu", quant_policy, fill=float("nan"))
    k_cache, v_cache = cache[:2]
    kv_scales = cache[2:] or None
    tables, slots = [], []
    for seq_len, query_len in batch:
        table = [pool.pop() for _ in range(math.ceil(seq_len / block_size))]
        tables.append(table)
        pos = torch.arange(seq_len)
        seq_slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        write_kv_cache(k.to(dtype), v.to(dtype), k_cache, v_cache, seq_slots, kv_scales)
        slots += seq_slots[seq_len - query_len :].tolist()
    width = max(len(t) for t in tables)
    query_lens = [q for _, q in batch]
    seq_lens = [s for s, _ in batch]
    ints = {"dtype": torch.int32, "device": DEVICE}
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], **ints),
        seq_lens=torch.tensor(seq_lens, **ints),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **ints),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    if kv_scales is not None:
        kv_scales = (kv_scales[0].to(DEVICE), kv_scales[1].to(DEVICE))
    return PagedBatch(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta, kv_scales)
