"""Paged attention for split-fuse batches in Triton: every sequence brings query_len >= 1 new
tokens (a whole prompt, a later chunk of one, or a single decode token) that attend causally
to everything already in the cache, their own chunk included.

Flash-attention style: a program owns a tile of BLOCK_Q consecutive query tokens of one
sequence times the query heads of one kv head's GQA group (so each key tile is loaded once per
group), and walks the key tiles with an online softmax. Key tiles wholly visible to every row
of the tile skip masking. The reference is `paged_attention_ref`.
"""

from __future__ import annotations

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


@triton.jit
def _find_sequence(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query tile `tile`: sequence b numbers its tiles from
    query_start[b] // BLOCK_Q + b, which increases with b and never reaches into the next
    sequence's numbers, so the owner is the last b whose first number is <= tile."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owns = tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    return lo


# The batch size and the block-table width (an eager step's longest table) vary from step to
# step: specializing on them (== 1, multiple of 16) would compile new variants mid-run.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    scale_log2,
    window,
    num_seqs,
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
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # Numbers run backwards so that a long prompt's last tiles, which see the most keys, start
    # first instead of trailing behind every other program.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first >= q_len:
        return  # the grid is an upper bound on the tile count; this number is unused
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # positions in the cache before this step's tokens

    # Row r of the tile is token first + r // GROUP_PAD, query head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = first + rows // GROUP_PAD
    member = rows % GROUP_PAD
    row_ok = (tok < q_len) & (member < GROUP)
    heads = kv_head * GROUP + member
    token = (q_start + tok).to(tl.int64)
    q_rows = q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh
    q, q2, q_sum, acc, acc2, scale_log2 = load_queries(q_rows, row_ok, scale_log2, HEAD_DIM, QUANT)
    q_pos = cached + tok

    # Keys past the tile's last query are invisible to all its rows.
    k_end = cached + tl.minimum(first + BLOCK_Q, q_len)
    # Without a window, tiles up to the first row's position are visible to every row. With
    # one, every tile is masked: rows see different windows.
    k_lo = tl.where(window > 0, tl.maximum(cached + first - window + 1, 0), 0)
    full_end = tl.where(window > 0, k_lo, (cached + first + 1) // BLOCK_N * BLOCK_N)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    ks_base = ks_ptr + kv_head * stride_sh
    vs_base = vs_ptr + kv_head * stride_sh
    row_max = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    for n0 in range(k_lo, full_end, BLOCK_N):
        acc, acc2, row_max, row_sum = attend_tile(
            q, q2, q_sum, acc, acc2, row_max, row_sum, k_base, v_base, table_row, n0, k_end,
            q_pos, window, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd,
            ks_base, vs_base, stride_sb, stride_ss,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, QUANT, ALIGNED,
        )  # fmt: skip
    for n0 in range(full_end, k_end, BLOCK_N):
        acc, acc2, row_max, row_sum = attend_tile(
            q, q2, q_sum, acc, acc2, row_max, row_sum, k_base, v_base, table_row, n0, k_end,
            q_pos, window, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd,
            ks_base, vs_base, stride_sb, stride_ss,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, QUANT, ALIGNED,
        )  # fmt: skip

    # Every stored row saw at least its own key, so row_sum > 0 there.
    o_rows = out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh
    store_rows(o_rows, acc, acc2, tl.where(row_ok, row_sum, 1.0), row_ok, HEAD_DIM, QUANT)


def prefill_tiles(
    head_dim: int, group: int, elem_size: int, quant: int = 0
) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, GROUP_PAD, BLOCK_N, num_warps, num_stages): about 128 query rows and 64 keys
    per step for rows of up to 256 bytes, half of each for wider rows, whose tiles would not fit
    in registers otherwise. 16-bit head_dim 128 takes 256 rows and three load stages, 16-bit
    head_dim 64 eight warps: 1.3-1.5x and 1.2x faster on an H200 (`bench/kernels.py
    --only prefill-sweep`, GQA 4). A quantized cache's tiles (`quant` 8 or 4) are widened in
    registers before the dot: half the query rows, 64 keys, 4 warps and no load pipelining, 8-22%
    faster than 32 keys at the full rows on an H100 (GQA 4) for int8 and for int4 at head_dim
    128; int4 at head_dim 64 ran 1-22% slower that way and keeps the full rows and 32 keys."""
    group_pad = triton.next_power_of_2(group)
    wide = head_dim * elem_size > 256
    block_q = max(1, (64 if wide else 128) // group_pad)
    if quant == 4 and head_dim < 128:
        return block_q, group_pad, 32, 4, 1
    if quant:
        return max(1, block_q // 2), group_pad, 64, 4, 1
    if elem_size == 2 and head_dim == 128:
        return max(1, 256 // group_pad), group_pad, 64, 8, 3
    if elem_size == 2 and head_dim == 64:
        return block_q, group_pad, 64, 8, 2
    return block_q, group_pad, 32 if wide else 64, 8 if head_dim >= 128 else 4, 2


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens `q [T, H, hd]` (sequence b's are rows
    query_start_loc[b] .. query_start_loc[b+1]-1, at positions ending at seq_lens[b] - 1) over
    the paged cache, which already holds their own keys/values. Returns `[T, H, hd]`.

    The grid comes from T and the batch size only; tensor values stay on the device. `tiles`
    (query tokens per tile, keys per tile, warps, stages) overrides `prefill_tiles`' choice.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_head_dim(head_dim)
    num_seqs = seq_lens.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    group = num_heads // num_kv_heads
    quant = quant_bits(k_cache, kv_scales)
    block_q, group_pad, block_n, num_warps, num_stages = prefill_tiles(
        head_dim, group, q.element_size(), quant
    )
    if tiles is not None:
        block_q, block_n, num_warps, num_stages = tiles
    # Enough tile numbers for the numbering _find_sequence decodes: at most T // BLOCK_Q + B.
    num_tiles = num_tokens // block_q + num_seqs
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *scale_args(kv_scales, k_cache),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        QUANT=quant,
        ALIGNED=not sliding_window,  # without a window every tile starts at a multiple of BLOCK_N
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out
