"""The inner step shared by the Triton attention kernels: one tile of keys/values gathered from
the paged cache through a block table (int8 or int4 ones scaled back per token), folded into an
online-softmax accumulator."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Widen quantized bytes with inline PTX on a GPU; the interpreter cannot run it and takes the
# same arithmetic in Triton bit operations.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on"))
# An int8 value x read as float16 through the bits 0x6400 | (x + 128): 1024 + 128 + x.
INT8_OFFSET = tl.constexpr(1152.0)


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
def load_queries(rows_ptr, row_ok, scale_log2, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """(q, q2, q_sum, acc, acc2, scale_log2) for `attend_tile` from query rows (`rows_ptr`
    `[M, 1]` points at each row's first value) and the scores' scale: whole rows and an empty
    accumulator, or for an int4 cache (QUANT 4) both halves of each and the rows' float32 sums.
    For an int8 cache under a half dtype, `q` is the rows over one scale for the tile in float16
    (the scale moves into `scale_log2`), `q_sum` INT8_OFFSET times their sums and `q2` the rows
    as loaded, whose dtype the P x V product takes."""
    if QUANT == 4:
        d = tl.arange(0, HEAD_DIM // 2)
        q = tl.load(rows_ptr + d[None, :], mask=row_ok[:, None], other=0.0)
        q2 = tl.load(rows_ptr + HEAD_DIM // 2 + d[None, :], mask=row_ok[:, None], other=0.0)
        q_sum = tl.sum(q.to(tl.float32), 1) + tl.sum(q2.to(tl.float32), 1)
        acc2 = tl.zeros(q.shape, dtype=tl.float32)
    else:
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(rows_ptr + d[None, :], mask=row_ok[:, None], other=0.0)
        q2 = q
        q_sum = 0.0
        acc2 = 0.0
        if QUANT == 8 and q.dtype != tl.float32:
            # float16 holds the keys' offset bytes exactly (bfloat16 does not); scaled to a
            # largest value of 256, the queries neither overflow nor lose bits there.
            q_scale = tl.maximum(tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0), 1e-30) / 256.0
            q = (q.to(tl.float32) / q_scale).to(tl.float16)
            q_sum = tl.sum(q.to(tl.float32), 1) * INT8_OFFSET
            scale_log2 = scale_log2 * q_scale
    return q, q2, q_sum, tl.zeros(q.shape, dtype=tl.float32), acc2, scale_log2


@triton.jit
def store_rows(rows_ptr, acc, acc2, denom, row_ok, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """Store `acc` (and for an int4 cache `acc2`, the second half) over `denom` per row at
    `rows_ptr` `[M, 1]`, in the pointers' dtype."""
    dtype = rows_ptr.dtype.element_ty
    if QUANT == 4:
        d = tl.arange(0, HEAD_DIM // 2)
        tl.store(rows_ptr + d[None, :], (acc / denom[:, None]).to(dtype), mask=row_ok[:, None])
        out2 = (acc2 / denom[:, None]).to(dtype)
        tl.store(rows_ptr + HEAD_DIM // 2 + d[None, :], out2, mask=row_ok[:, None])
    else:
        d = tl.arange(0, HEAD_DIM)
        tl.store(rows_ptr + d[None, :], (acc / denom[:, None]).to(dtype), mask=row_ok[:, None])


@triton.jit
def _int8_as_f16(x):
    """x + INT8_OFFSET in float16 for int8 x: the byte's sign bit flipped, under float16's
    exponent for 1024 (in PTX one xor and two byte permutes a four bytes)."""
    if _PTX:
        y = tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $2, 0x80808080;"
            " prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }",
            "=r,=r,r",
            [x],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    else:
        y = ((x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400).to(
            tl.float16, bitcast=True
        )
    return y


@triton.jit
def _nibbles_as(x, dtype: tl.constexpr):
    """(offset + low nibbles, offset + high nibbles, offset) of uint8 `x` in `dtype`. A half
    type gets its values by setting the low mantissa bits under an exponent worth `offset` (128
    for bfloat16, 1024 for float16), in PTX two byte permutes a four bytes per half; float32
    converts (offset 0)."""
    if dtype == tl.float32:
        low = (x & 15).to(dtype)
        high = (x >> 4).to(dtype)
        offset = 0.0
    elif _PTX:
        # $0-$1 take the low nibbles' four values, $2-$3 the high ones', $4 holds the bytes.
        if dtype == tl.bfloat16:
            low, high = tl.inline_asm_elementwise(
                "{ .reg .b32 l, h; and.b32 l, $4, 0x0F0F0F0F; shr.b32 h, $4, 4;"
                " and.b32 h, h, 0x0F0F0F0F;"
                " prmt.b32 $0, l, 0x43434343, 0x5140; prmt.b32 $1, l, 0x43434343, 0x7362;"
                " prmt.b32 $2, h, 0x43434343, 0x5140; prmt.b32 $3, h, 0x43434343, 0x7362; }",
                "=r,=r,=r,=r,r",
                [x],
                dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )
            offset = 128.0
        else:
            low, high = tl.inline_asm_elementwise(
                "{ .reg .b32 l, h; and.b32 l, $4, 0x0F0F0F0F; shr.b32 h, $4, 4;"
                " and.b32 h, h, 0x0F0F0F0F;"
                " prmt.b32 $0, l, 0x64646464, 0x5140; prmt.b32 $1, l, 0x64646464, 0x7362;"
                " prmt.b32 $2, h, 0x64646464, 0x5140; prmt.b32 $3, h, 0x64646464, 0x7362; }",
                "=r,=r,=r,=r,r",
                [x],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=4,
            )
            offset = 1024.0
    elif dtype == tl.bfloat16:
        low = ((x & 15).to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        high = ((x >> 4).to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        offset = 128.0
    else:
        low = ((x & 15).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        high = ((x >> 4).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        offset = 1024.0
    return low, high, offset


@triton.jit
def attend_tile(
    q,
    q2,
    q_sum,
    acc,
    acc2,
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
    stride_vd,
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
    ALIGNED: tl.constexpr,
):
    """Fold keys n0 .. n0+BLOCK_N-1 into (acc, acc2, row_max, row_sum) and return the new
    four; `k_base`/`v_base` already point at the kv head, `table_row` at the sequence's block
    table.

    Scores live in log2 units (scale_log2 = scale * log2 e) so exp2 replaces exp. Unmasked tiles
    must lie wholly below `k_end` and be visible to every query row. Masked tiles also hide keys
    at or past `k_end`, after a row's position, or (window > 0) older than its window. ALIGNED:
    `n0` is a multiple of BLOCK_N (no sliding window), so runs of keys share a page. With
    QUANT (8 or 4) the cache holds int8 or int4 and `ks_base`/`vs_base` point at the kv head's
    float32 scales: keys are scaled back in the scores and values in the probabilities, so
    neither tile is multiplied out.

    An int4 cache's byte i holds dimension i in its low nibble and i + HEAD_DIM / 2 in its high
    one, so its rows are used as two halves, never interleaved: `q`/`acc` are the first half of
    the queries and the output, `q2`/`acc2` the second. A key's zero point adds zero * sum(q)
    (`q_sum`, float32 per row) to its scores, a value's adds sum(p * zero) to the output.
    Otherwise `q`/`acc` are whole and `acc2` unused; an int8 cache under a half dtype takes `q`
    rescaled in float16 against keys widened there as x + INT8_OFFSET (whose share, `q_sum`,
    leaves the scores) and `q2`, the rows as loaded, only for its dtype.
    """
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM // 2) if QUANT == 4 else tl.arange(0, HEAD_DIM)
    in_range = pos < k_end
    # A key at or past k_end takes the page of the last key before it (one of the sequence's
    # blocks): every address stays inside the cache and runs of keys keep one page.
    key = tl.minimum(pos, k_end - 1) if MASKED else pos
    page = tl.load(table_row + key // BLOCK_SIZE).to(tl.int64)
    slot = (pos % BLOCK_SIZE).to(tl.int64)
    if QUANT and ALIGNED:
        # Runs of keys share a page and lie side by side in the slot-fastest values: told so,
        # the compiler loads them as vectors.
        RUN: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK_SIZE else BLOCK_SIZE
        page = tl.max_constancy(page, RUN)
        slot = tl.max_contiguous(tl.multiple_of(slot, RUN), RUN)
    k_ptrs = k_base + page[:, None] * stride_kb + slot[:, None] * stride_ks + d[None, :]
    v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :] * stride_vd
    # Masked loads keep never-written (possibly NaN) cache rows out of the arithmetic entirely.
    # Quantized values are finite and their scales masked to 0: they load whole, as vectors.
    MASK_VALUES: tl.constexpr = MASKED and not QUANT
    k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0) if MASK_VALUES else tl.load(k_ptrs)
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
        low, high, offset = _nibbles_as(k, q.dtype)
        s = tl.dot(q, tl.trans(low), input_precision=DOT_PRECISION)
        s = tl.dot(q2, tl.trans(high), s, input_precision=DOT_PRECISION)
        k_zero = (k_zero - offset * k_scale) * scale_log2  # the offset's share of the scores too
        s = s * (k_scale * scale_log2)[None, :] + q_sum[:, None] * k_zero[None, :]
    elif QUANT and q.dtype == tl.float16:
        # Half-type queries come in float16 (`load_queries`): the keys widen to it in a byte
        # permute, their offset leaving with q_sum.
        s = tl.dot(q, tl.trans(_int8_as_f16(k)), input_precision=DOT_PRECISION)
        s = (s - q_sum[:, None]) * (k_scale * scale_log2)[None, :]
    elif QUANT:
        k = k.to(q.dtype)  # int8 values are exact in every float type
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * scale_log2)[None, :]
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
    v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0) if MASK_VALUES else tl.load(v_ptrs)
    if QUANT == 4:
        scaled = (p * v_scale[None, :]).to(q.dtype)
        low, high, offset = _nibbles_as(v, q.dtype)
        # The zero points' share, less the offset's (which meets the same rounded weights).
        shifted = tl.sum(p * v_zero[None, :] - offset * scaled.to(tl.float32), 1)[:, None]
        pv = tl.dot(scaled, low, input_precision=DOT_PRECISION)
        pv2 = tl.dot(scaled, high, input_precision=DOT_PRECISION)
        acc2 = acc2 * alpha[:, None] + pv2 + shifted
        pv += shifted
    elif QUANT:
        p = p * v_scale[None, :]
        pv = tl.dot(p.to(q2.dtype), v.to(q2.dtype), input_precision=DOT_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, acc2, new_max, row_sum
