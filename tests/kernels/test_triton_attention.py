"""The Triton decode and prefill attention kernels against `paged_attention_ref` on random paged
batches (tiny shapes, so they also run under TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch
from paged_batch import DEVICE, HALF_DTYPES, close, nan_like, needs_triton, paged_batch

from app.kernels.attention import paged_attention, paged_attention_ref, paged_attention_triton
from app.kernels.decode_attention import (
    decode_num_splits,
    decode_tiles,
    longest_first,
    paged_decode_attention,
)
from app.kernels.prefill_attention import paged_prefill_attention, prefill_tiles

pytestmark = needs_triton

# Context lengths spanning one, several and a partial key tile (BLOCK_N is 64 or 32).
DECODES = [(1, 1), (17, 1), (100, 1), (250, 1)]
# With contexts past a 128-key tile: in 3 splits, tiles of 256 keys end a split on a half tile
# where the rest fits in one (17 and 100 keys, the last 44 of 300), on a whole one where not
# (180, 250).
HALF_TAILS = [*DECODES, (180, 1), (300, 1)]
# (context after this step, new tokens): a decode, a whole prompt, a chunk after a cached
# prefix, a first-token decode, a chunk ending mid-block, a prompt of exactly one key tile and
# a chunk whose first query sits one key short of a whole unmasked tile.
MIXED = [(9, 1), (7, 7), (130, 70), (1, 1), (200, 3), (64, 64), (71, 9)]


def _decode(batch, *, splits, window=None, tiles=None, ordered=False, **shape) -> None:
    b = paged_batch(batch, **shape)
    scale = shape["head_dim"] ** -0.5
    opts = {"sliding_window": window, "kv_scales": b.kv_scales}
    order = longest_first(b.meta.seq_lens) if ordered else None
    out = paged_decode_attention(
        b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, scale,
        num_splits=splits, tiles=tiles, order=order, out=nan_like(b.q), **opts,
    )  # fmt: skip
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, scale, **opts)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **close(shape["dtype"]))


def _prefill(batch, *, window=None, tiles=None, **shape) -> None:
    b = paged_batch(batch, **shape)
    scale = shape["head_dim"] ** -0.5
    opts = {"sliding_window": window, "kv_scales": b.kv_scales}
    out = paged_prefill_attention(
        b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens,
        b.meta.query_start_loc, scale, tiles=tiles, out=nan_like(b.q), **opts,
    )  # fmt: skip
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, scale, **opts)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **close(shape["dtype"]))


def test_decode_tiles_by_row_width_and_cache_type() -> None:
    assert decode_tiles(256) == (64, 4, 2)  # bf16 head_dim 128
    assert decode_tiles(512) == (32, 4, 2)  # float32 head_dim 128
    assert decode_tiles(256, 8) == (128, 4, 2)  # int8 tiles: twice the keys
    assert decode_tiles(256, 4) == (128, 4, 2)  # int4 the same for a few sequences
    assert decode_tiles(256, 4, 16) == (256, 4, 2)  # and twice again for many


def test_prefill_tiles_by_row_width_and_cache_type() -> None:
    assert prefill_tiles(128, 4, 2) == (64, 4, 64, 8, 3)  # bf16 head_dim 128, GQA 4
    assert prefill_tiles(128, 4, 2, 8) == (16, 4, 64, 4, 1)  # int8: widened in registers
    assert prefill_tiles(128, 4, 2, 4) == (16, 4, 64, 4, 1)  # int4 the same
    assert prefill_tiles(64, 4, 2, 8) == (16, 4, 64, 4, 1)
    assert prefill_tiles(64, 4, 2, 4) == (32, 4, 32, 4, 1)  # int4 head_dim 64: full rows
    assert prefill_tiles(128, 1, 4, 8) == (32, 1, 64, 4, 1)  # float32 rows: half as many


# Every launch setting the decode sweep may pick computes the same attention, masked tail
# tiles (keys not a multiple of the tile), half tails and splits included.
@pytest.mark.parametrize("tiles", [(32, 4, 1), (128, 8, 3), (256, 4, 2)])
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_decode_launch_settings(tiles: tuple[int, int, int], quant_policy: int) -> None:
    _decode(
        HALF_TAILS, splits=3, tiles=tiles, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32, quant_policy=quant_policy,
    )  # fmt: skip


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_gqa_float32(splits: int) -> None:
    _decode(
        DECODES, splits=splits, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])  # float32 takes narrower tiles
def test_decode_head_dim_128(dtype: torch.dtype) -> None:
    _decode(
        DECODES, splits=2, num_heads=4, num_kv_heads=1, head_dim=128, block_size=32,
        dtype=dtype,
    )  # fmt: skip


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_sliding_window(splits: int) -> None:
    _decode(
        DECODES, splits=splits, window=90, num_heads=4, num_kv_heads=2, head_dim=32,
        block_size=16, dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("heads", [(3, 3), (6, 2)], ids=["mha", "group3"])
def test_decode_head_layouts(heads: tuple[int, int]) -> None:
    _decode(
        DECODES, splits=2, num_heads=heads[0], num_kv_heads=heads[1], head_dim=32,
        block_size=64, dtype=torch.float32,
    )  # fmt: skip


def test_longest_first_orders_rows_by_context() -> None:
    seq_lens = torch.tensor([17, 250, 1, 100, 250], dtype=torch.int32)
    order = longest_first(seq_lens)
    assert sorted(order.tolist()) == list(range(5))
    assert seq_lens[order.long()].tolist() == [250, 250, 100, 17, 1]


# Programs started longest first write each sequence's output to its own row, split or not.
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_decode_longest_first(splits: int, quant_policy: int) -> None:
    _decode(
        DECODES[::-1] + DECODES, splits=splits, ordered=True, num_heads=8, num_kv_heads=2,
        head_dim=32, block_size=16, dtype=torch.float32, quant_policy=quant_policy,
    )  # fmt: skip


def test_decode_num_splits_fills_the_gpu() -> None:
    assert decode_num_splits(1, 8, 8192, 132) == 64
    assert decode_num_splits(1, 8, 1024, 132) == 8  # no split under MIN_SPLIT_TOKENS
    # Whole waves of 4 programs per SM: 512 of 528 slots rather than 640 (1.2 waves).
    assert decode_num_splits(16, 8, 8192, 132) == 4
    assert decode_num_splits(32, 8, 8192, 132) == 2
    assert decode_num_splits(48, 8, 8192, 132) == 1  # 384 programs: one wave already
    assert decode_num_splits(256, 8, 8192, 132) == 1


# Every launch setting the prefill sweep may pick computes the same attention: query tiles of
# other sizes, key tiles smaller and larger than a cache block.
@pytest.mark.parametrize("tiles", [(8, 16, 4, 1), (2, 64, 4, 3)])
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_prefill_launch_settings(tiles: tuple[int, int, int, int], quant_policy: int) -> None:
    _prefill(
        MIXED, tiles=tiles, num_heads=8, num_kv_heads=2, head_dim=32, block_size=32,
        dtype=torch.float32, quant_policy=quant_policy,
    )  # fmt: skip


@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_mixed_batch_float32(block_size: int) -> None:
    _prefill(
        MIXED, num_heads=4, num_kv_heads=2, head_dim=64, block_size=block_size,
        dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])  # float32 takes narrower tiles
def test_prefill_head_dim_128(dtype: torch.dtype) -> None:
    _prefill(
        MIXED, num_heads=8, num_kv_heads=2, head_dim=128, block_size=32, dtype=dtype,
    )  # fmt: skip


@pytest.mark.parametrize("batch", [[(90, 90)], [(150, 100)]], ids=["prompt", "chunk"])
def test_prefill_single_sequence(batch: list[tuple[int, int]]) -> None:
    _prefill(
        batch, num_heads=4, num_kv_heads=1, head_dim=32, block_size=32, dtype=torch.float32,
    )  # fmt: skip


def test_prefill_sliding_window() -> None:
    _prefill(
        MIXED, window=24, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("heads", [(3, 3), (6, 2)], ids=["mha", "group3"])
def test_prefill_head_layouts(heads: tuple[int, int]) -> None:
    _prefill(
        MIXED, num_heads=heads[0], num_kv_heads=heads[1], head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip


# Decodes first, as the scheduler orders a mixed step: they take the decode kernel (with splits
# for the long one), the chunks after them the prefill kernel.
DECODES_THEN_CHUNKS = [(9, 1), (300, 1), (1, 1), (130, 70), (7, 7), (200, 3)]


@pytest.mark.parametrize("batch", [DECODES, MIXED, DECODES_THEN_CHUNKS])
def test_mixed_step_splits_decodes_from_chunks(batch: list[tuple[int, int]]) -> None:
    b = paged_batch(batch, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                    dtype=torch.float32)  # fmt: skip
    out = paged_attention_triton(b.q, b.k_cache, b.v_cache, b.meta, 0.1, out=nan_like(b.q))
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, 0.1)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **close(torch.float32))


# An int8 or int4 cache (quant_policy=8 or 4): both kernels scale keys and values back per token
# and kv head (int4 also adds zero points), as the reference does; NaN scales in the slots nobody
# wrote must stay out of the results.
QUANTIZED = pytest.mark.parametrize("quant_policy", [8, 4])


@QUANTIZED
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_quantized_cache_decode(splits: int, dtype: torch.dtype, quant_policy: int) -> None:
    _decode(
        DECODES, splits=splits, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
        dtype=dtype, quant_policy=quant_policy,
    )  # fmt: skip


# From 16 sequences on an int4 cache's default tiles take 256 keys, ending on half tiles.
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_int4_cache_decode_many_sequences(splits: int, dtype: torch.dtype) -> None:
    _decode(
        HALF_TAILS * 3, splits=splits, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
        dtype=dtype, quant_policy=4,
    )  # fmt: skip


@QUANTIZED
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_quantized_cache_prefill(dtype: torch.dtype, quant_policy: int) -> None:
    _prefill(
        MIXED, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
        quant_policy=quant_policy,
    )  # fmt: skip


@pytest.mark.parametrize("sign", [-1, 1])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_int8_cache_half_queries_of_any_magnitude(
    kernel: str, dtype: torch.dtype, sign: int
) -> None:
    """Under a half dtype the int8 path rescales each tile's queries to a largest value of 256
    in float16 (`load_queries`): queries far from 1 (bfloat16's beyond float16's range), with
    the scale moved the other way, give the same attention without overflowing or flushing to
    zero there."""
    magnitude = (1e3 if dtype == torch.float16 else 1e6) ** sign
    b = paged_batch(DECODES if kernel == "decode" else MIXED, num_heads=8, num_kv_heads=2,
                    head_dim=64, block_size=16, dtype=dtype, quant_policy=8)  # fmt: skip
    q = (b.q.float() * magnitude).to(dtype)
    scale = 64**-0.5 / magnitude
    tables, lens = b.meta.block_tables, b.meta.seq_lens
    if kernel == "decode":
        out = paged_decode_attention(q, b.k_cache, b.v_cache, tables, lens, scale, num_splits=2,
                                     kv_scales=b.kv_scales, out=nan_like(q))  # fmt: skip
    else:
        out = paged_prefill_attention(q, b.k_cache, b.v_cache, tables, lens,
                                      b.meta.query_start_loc, scale, kv_scales=b.kv_scales,
                                      out=nan_like(q))  # fmt: skip
    ref = paged_attention_ref(q, b.k_cache, b.v_cache, b.meta, scale, kv_scales=b.kv_scales)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **close(dtype))


@QUANTIZED
def test_quantized_cache_sliding_window(quant_policy: int) -> None:
    shape = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "block_size": 16}
    _decode(DECODES, splits=2, window=90, dtype=torch.float32, quant_policy=quant_policy, **shape)
    _prefill(MIXED, window=24, dtype=torch.float32, quant_policy=quant_policy, **shape)


@QUANTIZED
def test_quantized_cache_mixed_step(quant_policy: int) -> None:
    b = paged_batch(DECODES_THEN_CHUNKS, num_heads=8, num_kv_heads=2, head_dim=64,
                    block_size=16, dtype=torch.float32, quant_policy=quant_policy)  # fmt: skip
    out = paged_attention_triton(
        b.q, b.k_cache, b.v_cache, b.meta, 0.1, kv_scales=b.kv_scales, out=nan_like(b.q)
    )
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, 0.1, kv_scales=b.kv_scales)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **close(torch.float32))


@pytest.mark.skipif(DEVICE == "cpu", reason="dispatch to Triton happens on CUDA tensors")
@pytest.mark.parametrize("batch", [DECODES, MIXED], ids=["decode", "mixed"])
def test_paged_attention_dispatches_on_cuda(batch: list[tuple[int, int]]) -> None:
    b = paged_batch(batch, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                    dtype=torch.bfloat16)  # fmt: skip
    out = paged_attention(b.q, b.k_cache, b.v_cache, b.meta, 0.1)
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, 0.1)
    torch.testing.assert_close(out, ref, **close(torch.bfloat16))


def test_prefill_in_a_graph_layout() -> None:
    """A mixed-step graph pads the batch with empty sequences and one last sequence, in a scratch
    block, that owns the padding tokens: the real rows come out as without the padding."""
    b = paged_batch(MIXED, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                    dtype=torch.float32)  # fmt: skip
    meta, real = b.meta, b.q.shape[0]
    used = {
        block
        for row, seq_len in zip(meta.block_tables.tolist(), meta.seq_lens.tolist(), strict=True)
        for block in row[: -(-seq_len // 16)]
    }
    scratch = next(i for i in range(b.k_cache.shape[0]) if i not in used)
    b.k_cache[scratch], b.v_cache[scratch] = 0.0, 0.0  # the padding tokens' keys land here
    pad, empty, width = 40, 3, meta.block_tables.shape[1]
    tables = torch.full((len(MIXED) + empty + 1, max(width, 3)), scratch, dtype=torch.int32)
    tables[: len(MIXED), :width] = meta.block_tables.cpu()
    ints = {"dtype": torch.int32, "device": DEVICE}
    starts = [*meta.query_start_loc.tolist(), *[real] * empty, real + pad]
    query_start = torch.tensor(starts, **ints)
    seq_lens = torch.tensor([*meta.seq_lens.tolist(), *[0] * empty, pad], **ints)
    q = torch.cat([b.q, torch.randn(pad, 8, 64, device=DEVICE)])
    out = paged_prefill_attention(
        q, b.k_cache, b.v_cache, tables.to(DEVICE), seq_lens, query_start, 0.1, out=nan_like(q)
    )
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta, 0.1)
    torch.testing.assert_close(out[:real], ref, **close(torch.float32))
    assert out[real:].isfinite().all()
