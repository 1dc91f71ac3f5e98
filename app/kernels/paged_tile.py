"""The inner step shared by the Triton attention kernels: one tile of keys/values gathered from
the paged cache through a block table, folded into an online-softmax accumulator."""

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


@triton.jit
def attend_tile(
    q,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys n0 .. n0+BLOCK_N-1 into (acc, row_max, row_sum) and return the new triple;
    `k_base`/`v_base` already point at the kv head, `table_row` at the sequence's block table.

    Scores live in log2 units (scale_log2 = scale * log2 e) so exp2 replaces exp. Unmasked tiles
    must lie wholly below `k_end` and be visible to every query row. Masked tiles also hide keys
    at or past `k_end`, after a row's position, or (window > 0) older than its window.
    """
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    in_range = pos < k_end
    table_ptrs = table_row + pos // BLOCK_SIZE
    page = tl.load(table_ptrs, mask=in_range, other=0) if MASKED else tl.load(table_ptrs)
    page = page.to(tl.int64)
    slot = (pos % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + page[:, None] * stride_kb + slot[:, None] * stride_ks + d[None, :]
    v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :]
    # Masked loads keep never-written (possibly NaN) cache rows out of the arithmetic entirely.
    k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0) if MASKED else tl.load(k_ptrs)
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
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum
