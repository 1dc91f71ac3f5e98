"""The inner step shared by the Triton attention kernels: one tile of keys/values gathered from
the paged cache through a block table (int8 or int4 ones scaled back per token), folded into an
online-softmax accumulator."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def check_head_dim(head_dim: int) -> None:
    """The kernels tile head_dim whole: a power of two, and at least tl.dot's minimum of 16."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs must not silently drop to TF32 on the GPU; half types ignore the knob."""
    return "ieee" if dtype == torch.float32 else "tf32"


def quant_bits(k_cache: torch.Tensor, kv_scales: tuple | None) -> int:
    """The kernels' QUANT: 0 for a cache in the model's dtype, 8 for int8, 4 for packed int4."""
    if kv_scales is None:
        return 0
    return 4 if k_cache.dtype == torch.uint8 else 8


def scale_args(
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """The kernels' scale arguments: both `[N, bs, kvh(, 2)]` scale tensors and the strides of
    their first three dimensions (an int4 cache's zero point sits right after its scale), or
    placeholders (never read) for a cache in the model's dtype."""
    if kv_scales is None:
        return k_cache, k_cache, 0, 0, 0
    k_scale, v_scale = kv_scales
    if k_scale.stride() != v_scale.stride():
        raise ValueError("k and v scales must share a layout")
    if k_scale.dim() == 4 and k_scale.stride(3) != 1:
        raise ValueError("an int4 cache's zero point must follow its scale")
    return k_scale, v_scale, *k_scale.stride()[:3]


@triton.jit
def attend_tile(
    q,
    q_sum,
    acc,
    row_max,
    row_sum,
    k_base,
    v_base,
    table_row,
    n0,
    k_end,
    q_pos,
    window,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    ks_base,
    vs_base,
    stride_sb,
    stride_ss,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
):
    """Fold keys n0 .. n0+BLOCK_N-1 into (acc, row_max, row_sum) and return the new triple;
    `k_base`/`v_base` already point at the kv head, `table_row` at the sequence's block table.

    Scores live in log2 units (scale_log2 = scale * log2 e) so exp2 replaces exp. Unmasked tiles
    must lie wholly below `k_end` and be visible to every query row. Masked tiles also hide keys
    at or past `k_end`, after a row's position, or (window > 0) older than its window. With
    QUANT (8 or 4) the cache holds int8 or packed int4 and `ks_base`/`vs_base` point at the kv
    head's float32 scales: keys are scaled back in the scores and values in the probabilities,
    so neither tile is multiplied out. An int4 key's zero point adds zero * sum(q) (`q_sum`,
    float32 per row) to its scores, a value's adds sum(p * zero) to the output.
    """
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM // 2) if QUANT == 4 else tl.arange(0, HEAD_DIM)  # int4: 2 a byte
    in_range = pos < k_end
    table_ptrs = table_row + pos // BLOCK_SIZE
    page = tl.load(table_ptrs, mask=in_range, other=0) if MASKED else tl.load(table_ptrs)
    page = page.to(tl.int64)
    slot = (pos % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + page[:, None] * stride_kb + slot[:, None] * stride_ks + d[None, :]
    v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :]
    # Masked loads keep never-written (possibly NaN) cache rows out of the arithmetic entirely.
    k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0) if MASKED else tl.load(k_ptrs)
    if QUANT:
        where = page * stride_sb + slot * stride_ss
        if MASKED:
            k_scale = tl.load(ks_base + where, mask=in_range, other=0.0)
            v_scale = tl.load(vs_base + where, mask=in_range, other=0.0)
        else:
            k_scale = tl.load(ks_base + where)
            v_scale = tl.load(vs_base + where)
        if QUANT == 4:
            if MASKED:
                k_zero = tl.load(ks_base + where + 1, mask=in_range, other=0.0)
                v_zero = tl.load(vs_base + where + 1, mask=in_range, other=0.0)
            else:
                k_zero = tl.load(ks_base + where + 1)
                v_zero = tl.load(vs_base + where + 1)
            k = tl.interleave(k & 15, k >> 4)
        k = k.to(q.dtype)  # int8 and int4 values are exact in every float type
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * scale_log2)[None, :]
        if QUANT == 4:
            s += q_sum[:, None] * (k_zero * scale_log2)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = in_range[None, :] & (pos[None, :] <= q_pos[:, None])
        visible &= (window == 0) | (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, 1))
    # A row that has seen no visible key yet keeps row_max = -inf; shifting by 0 instead keeps
    # exp2(-inf - -inf) = NaN out of its (still empty) accumulator.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(row_max - shift)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0) if MASKED else tl.load(v_ptrs)
    if QUANT:
        if QUANT == 4:
            v = tl.interleave(v & 15, v >> 4)
        pv = tl.dot(
            (p * v_scale[None, :]).to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION
        )
        if QUANT == 4:
            pv += tl.sum(p * v_zero[None, :], 1)[:, None]
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, new_max, row_sum
