"""Paged decode attention (one new query token per sequence) as flash-decoding in Triton.

Each program owns one (sequence, kv head, context split): it gathers that split's keys/values
through the block table, scores them against all query heads of the kv head's GQA group at
once (so K/V are read from memory once per group), and leaves a partial output plus its
log-sum-exp. A second kernel merges the splits. With one split the first kernel writes the
output directly. Given an `order` (the sequences longest first), programs start in that order,
a sequence's kv heads one after another, so that a launch over contexts of mixed lengths ends on
short programs rather than waiting for a long one started last. The reference is
`paged_attention_ref` with every query length 1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from app.kernels.paged_tile import (
    LOG2E,
    attend_tile,
    check_head_dim,
    dot_precision,
    load_queries,
    quant_bits,
    scale_args,
    store_rows,
)
from app.kernels.pdl import launch_options, wait_for_previous

MIN_SPLIT_TOKENS = 128  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # resident at once: bf16 head_dim 128 takes 128 registers per thread
# Tiles of this many keys or more end a split on a half tile where the rest fits in one: a
# context of 384 then reads 256 + 128 keys, not two tiles of 256. Given to int8's 128-key tiles,
# the second tile's code cost them 2-4% at batch 128-256 on an H100, so they go without.
HALF_TAIL_KEYS = 256
WIDE_INT4_SEQS = 16  # int4 tiles take 256 keys from this many sequences on (`decode_tiles`)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence: as many as fit in one wave of resident programs (a second, partial
    wave would cost as long as a full one), never splits shorter than MIN_SPLIT_TOKENS. Depends
    only on shapes, so a CUDA graph keeps its choice on replay."""
    programs = num_seqs * num_kv_heads
    wanted = PROGRAMS_PER_SM * num_sms // programs
    useful = triton.cdiv(max_context, MIN_SPLIT_TOKENS)
    return max(1, min(wanted, useful, MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the Triton interpreter (CPU tensors): nothing to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


# The split count and the block-table width vary with the batch in eager steps: no variant
# per value.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    order_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    window,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    ks_ptr,
    vs_ptr,
    stride_sb,
    stride_ss,
    stride_sh,
    stride_bt,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF_TAIL: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,
    ORDERED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    # kv heads fastest: a sequence's programs start together, so all of them start in `order`
    # (sequence-fastest started the longest sequences' last kv heads in the launch's last wave).
    row = tl.program_id(0) // (NUM_HEADS // GROUP)
    kv_head = tl.program_id(0) % (NUM_HEADS // GROUP)
    seq = tl.load(order_ptr + row).to(tl.int32) if ORDERED else row
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The query sits at seq_len - 1, so a window leaves exactly the keys from seq_len - window.
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    # Splits are whole BLOCK_N tiles so that only a split's last tile needs masking.
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(seq_len, start + per_split)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP  # tl.dot needs >= 16 rows; the padding rows are never stored
    q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q, q2, q_sum, acc, acc2, scale_log2 = load_queries(q_rows, row_ok, scale_log2, HEAD_DIM, QUANT)
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + seq_len - 1

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    ks_base = ks_ptr + kv_head * stride_sh
    vs_base = vs_ptr + kv_head * stride_sh
    row_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n0 in range(start, full_end, BLOCK_N):
        acc, acc2, row_max, row_sum = attend_tile(
            q, q2, q_sum, acc, acc2, row_max, row_sum, k_base, v_base, table_row, n0, end,
            q_pos, window, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd,
            ks_base, vs_base, stride_sb, stride_ss,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, QUANT, ALIGNED,
        )  # fmt: skip
    # The rest of the split fits in half a tile: read that much. The outer `if` is static, so
    # kernels without HALF_TAIL compile no half tile.
    if HALF_TAIL:  # noqa: SIM102
        if (full_end < end) & (end - full_end <= BLOCK_N // 2):
            acc, acc2, row_max, row_sum = attend_tile(
                q, q2, q_sum, acc, acc2, row_max, row_sum, k_base, v_base, table_row, full_end,
                end, q_pos, window, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                stride_vd, ks_base, vs_base, stride_sb, stride_ss,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N // 2, True, DOT_PRECISION, QUANT, ALIGNED,
            )  # fmt: skip
            full_end = end
    if full_end < end:
        acc, acc2, row_max, row_sum = attend_tile(
            q, q2, q_sum, acc, acc2, row_max, row_sum, k_base, v_base, table_row, full_end, end,
            q_pos, window, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd,
            ks_base, vs_base, stride_sb, stride_ss,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, QUANT, ALIGNED,
        )  # fmt: skip

    # An empty split (short context, many splits) has row_sum 0 and gets weight 0 below.
    has_keys = row_sum > 0
    denom = tl.where(has_keys, row_sum, 1.0)
    if SINGLE_SPLIT:
        o_rows = out_ptr + seq * stride_ot + heads[:, None] * stride_oh
        store_rows(o_rows, acc, acc2, denom, row_ok, HEAD_DIM, QUANT)
    else:
        part = (seq * NUM_HEADS + heads).to(tl.int64) * num_splits + split
        store_rows(
            part_out_ptr + part[:, None] * HEAD_DIM, acc, acc2, denom, row_ok, HEAD_DIM, QUANT
        )
        log_sum = tl.log2(tl.where(has_keys, row_sum, 1.0))
        lse = tl.where(has_keys, row_max + log_sum, float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    split_ok = s < num_splits
    part = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    parts_ptrs = part_out_ptr + part[:, None] * HEAD_DIM + d[None, :]
    parts = tl.load(parts_ptrs, mask=split_ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    # A sequence with no keys at all (a zero-length padding row) gets zeros, not NaN.
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def longest_first(seq_lens: torch.Tensor) -> torch.Tensor:
    """The rows of `seq_lens` longest first (int64), on its device: computed once per step and
    shared by every layer's launch."""
    return torch.argsort(seq_lens, descending=True)


def decode_tiles(row_bytes: int, quant: int = 0, num_seqs: int = 1) -> tuple[int, int, int]:
    """(keys per tile, warps, stages): 64 keys for rows of up to 256 bytes (bf16 head_dim 128),
    32 for wider ones, twice as many from an int8 or int4 cache (`quant` 8 or 4), whose tiles are
    a half or a quarter of the bytes, and twice again for int4 over `num_seqs` >= WIDE_INT4_SEQS;
    4 warps, 2 load stages. Swept (`bench/kernels.py --only decode-sweep`): bf16 tiles ran
    0.4-2.5% faster with 2 stages than with Triton's 3 on an H200. On an H100, int4 tiles of 256
    keys ending on half tiles ran 7-16% faster than 128 from batch 16 x 2,048 to 256 x 4,096,
    level at batch 16-64 over short contexts, 3-4% slower at 256-512 x 384 and 12-29% slower at
    batch 1-4 x 1,024, where they leave half of the few splits without keys."""
    keys = (64 if row_bytes <= 256 else 32) * (2 if quant else 1)
    if quant == 4 and num_seqs >= WIDE_INT4_SEQS:
        keys *= 2
    return keys, 4, 2


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_splits: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    order: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence `q [B, H, hd]` over its first seq_lens[b] cached
    positions; returns `[B, H, hd]` in q's dtype (written into `out` when given).

    Launches read only tensor shapes on the host, never tensor values, so the call can be
    captured in a CUDA graph; `num_splits` defaults to a choice from the batch size and the
    block table's width and `tiles` (keys per tile, warps, stages) to `decode_tiles`' choice.
    `order` (integer `[B]`, a permutation of the rows, e.g. `longest_first(seq_lens)`) sets the
    order in which the sequences' programs start; the output is the same.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_head_dim(head_dim)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_sms = _num_sms(q.device)
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_context, num_sms)
    group = num_heads // num_kv_heads
    quant = quant_bits(k_cache, kv_scales)
    block_n, warps, stages = tiles or decode_tiles(head_dim * q.element_size(), quant, num_seqs)
    single = num_splits == 1
    pdl = launch_options(q.device)
    part_out = part_lse = out  # unused by the single-split kernel; any tensor fills the slot
    if not single:
        part_lse = torch.empty(
            num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device
        )
        part_out = torch.empty(
            num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
    _decode_split_kernel[(num_seqs * num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, seq_lens if order is None else order,
        out, part_out, part_lse,
        scale * LOG2E, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *scale_args(kv_scales, k_cache),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        HALF_TAIL=block_n >= HALF_TAIL_KEYS,
        SINGLE_SPLIT=single,
        DOT_PRECISION=dot_precision(q.dtype),
        QUANT=quant,
        ALIGNED=not sliding_window,  # without a window every tile starts at a multiple of BLOCK_N
        ORDERED=order is not None,
        num_warps=warps,
        num_stages=stages,
        **pdl,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
            **pdl,
        )  # fmt: skip
    return out
