"""paged_attention_ref against dense per-sequence causal attention on random mixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from app.kernels.attention import (
    AttentionMetadata,
    dequantize_kv,
    kv_bytes_per_token,
    new_kv_cache,
    paged_attention,
    paged_attention_ref,
    quantize_kv,
    quantize_kv_int4,
    token_layout,
    write_kv_cache,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
# (context length after this step, new tokens this step): decode, full prefill, a mid-sequence
# chunk, a first-token decode and a chunk that ends exactly on a block edge.
MIXED_BATCH = [(9, 1), (7, 7), (13, 5), (1, 1), (16, 3)]


def _metadata(
    batch: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator
) -> tuple[AttentionMetadata, list[list[int]]]:
    """Give each sequence blocks drawn from a shuffled pool so tables are non-contiguous."""
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for seq_len, _ in batch:
        need = math.ceil(seq_len / block_size)
        tables.append([pool.pop() for _ in range(need)])
    width = max(len(t) for t in tables)
    slots = []
    for (seq_len, query_len), table in zip(batch, tables, strict=True):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    query_lens = [q for _, q in batch]
    seq_lens = [s for s, _ in batch]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(
            [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32
        ),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return meta, tables


def _dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """Attention of the last q.shape[0] positions of one sequence over its full k/v."""
    seq_len, query_len = k.shape[0], q.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _run(
    batch: list[tuple[int, int]],
    block_size: int,
    dtype: torch.dtype,
    num_kv_heads: int = NUM_KV_HEADS,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(block_size * 1000 + len(batch))
    num_blocks = sum(math.ceil(s / block_size) for s, _ in batch) + 3
    meta, tables = _metadata(batch, block_size, num_blocks, gen)
    # Unwritten slots hold NaN: the kernel must never let them reach a real query's output.
    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    scale = HEAD_DIM**-0.5

    qs, expected = [], []
    for (seq_len, query_len), table in zip(batch, tables, strict=True):
        k = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        q = torch.randn(query_len, NUM_HEADS, HEAD_DIM, generator=gen)
        pos = torch.arange(seq_len)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        write_kv_cache(k.to(dtype), v.to(dtype), k_cache, v_cache, slots)
        qs.append(q)
        ref_k, ref_v = k.to(dtype).float(), v.to(dtype).float()
        expected.append(_dense_reference(q.to(dtype).float(), ref_k, ref_v, scale, window))

    out = paged_attention(
        torch.cat(qs).to(dtype), k_cache, v_cache, meta, scale, sliding_window=window
    )
    assert out.dtype == dtype
    return out, torch.cat(expected)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads", [NUM_KV_HEADS, NUM_HEADS], ids=["gqa", "mha"])
def test_mixed_batch_matches_dense(block_size: int, num_kv_heads: int) -> None:
    out, expected = _run(MIXED_BATCH, block_size, torch.float32, num_kv_heads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "batch", [[(12, 1)], [(5, 5)], [(30, 6)]], ids=["decode", "prefill", "chunk"]
)
def test_single_sequence_kinds(batch: list[tuple[int, int]]) -> None:
    out, expected = _run(batch, 4, torch.float32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window() -> None:
    out, expected = _run(MIXED_BATCH, 4, torch.float32, window=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    out, expected = _run(MIXED_BATCH, 16, dtype)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def test_write_kv_cache_places_tokens_at_slots() -> None:
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([9, 2]))
    torch.testing.assert_close(k_cache[2, 1], k[0])
    torch.testing.assert_close(v_cache[0, 2], v[1])
    assert k_cache.count_nonzero() == k[0].count_nonzero() + k[1].count_nonzero()


def test_quantize_kv_rounds_within_half_a_step() -> None:
    x = torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(5)) * 4
    x[0, 0] = 0.0  # an all-zero row must not divide by zero
    values, scale = quantize_kv(x)
    assert values.dtype == torch.int8 and scale.shape == (6, 3)
    assert values.abs().amax(-1)[1:].eq(127).all()  # each row's largest value maps to 127
    error = (values.float() * scale[..., None] - x).abs()
    assert (error <= scale[..., None] / 2 + 1e-6).all()
    assert values[0, 0].eq(0).all()


def test_write_kv_cache_int8_stores_values_and_scales() -> None:
    k_cache, v_cache, *scales = new_kv_cache(3, 4, 2, 8, torch.float32, "cpu", 8, fill=math.nan)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([9, 2]), (scales[0], scales[1]))
    for x, cache, scale in ((k, k_cache, scales[0]), (v, v_cache, scales[1])):
        values, expected = quantize_kv(x)
        assert cache.dtype == torch.int8
        assert torch.equal(cache[2, 1], values[0]) and torch.equal(cache[0, 2], values[1])
        torch.testing.assert_close(scale[2, 1], expected[0])
        assert scale.isnan().sum() == 3 * 4 * 2 - 2 * 2  # every other slot's scale untouched
    assert kv_bytes_per_token(2, 8, torch.bfloat16, 8) == 2 * 2 * (8 + 4)
    assert kv_bytes_per_token(2, 8, torch.bfloat16) == 2 * 2 * 8 * 2


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_quantized_values_are_stored_slot_fastest(quant_policy: int) -> None:
    # A key tile's values of one dimension lie side by side; keys stay row-major.
    k_cache, v_cache, *_ = new_kv_cache(3, 4, 2, 8, torch.float32, "cpu", quant_policy)
    assert v_cache.shape == k_cache.shape and v_cache.stride(1) == 1 and k_cache.stride(-1) == 1
    assert v_cache.permute(0, 2, 3, 1).is_contiguous()  # [N, kvh, hd', block_size] underneath


def test_quantize_kv_int4_rounds_within_half_a_step() -> None:
    x = torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(5)) * 4 + 1
    x[0, 0] = 2.5  # a constant row must not divide by zero, and comes back exactly
    packed, scales = quantize_kv_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 3, 16) and scales.shape == (6, 3, 2)
    nibbles = torch.cat((packed & 15, packed >> 4), -1)
    assert nibbles[1:].amin(-1).eq(0).all() and nibbles[1:].amax(-1).eq(15).all()
    torch.testing.assert_close(scales[..., 1], x.amin(-1))  # the zero point is the row's minimum
    error = (dequantize_kv(packed, scales) - x).abs()
    assert (error <= scales[..., :1] / 2 + 1e-6).all()
    assert error[0, 0].eq(0).all()


def test_write_kv_cache_int4_packs_values_with_scales_and_zeros() -> None:
    k_cache, v_cache, *scales = new_kv_cache(3, 4, 2, 8, torch.float32, "cpu", 4, fill=math.nan)
    assert k_cache.shape == (3, 4, 2, 4) and scales[0].shape == (3, 4, 2, 2)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([9, 2]), (scales[0], scales[1]))
    for x, cache, scale in ((k, k_cache, scales[0]), (v, v_cache, scales[1])):
        packed, expected = quantize_kv_int4(x)
        assert torch.equal(cache[2, 1], packed[0]) and torch.equal(cache[0, 2], packed[1])
        torch.testing.assert_close(scale[2, 1], expected[0])
        assert scale.isnan().sum() == 3 * 4 * 2 * 2 - 2 * 2 * 2  # every other slot untouched
    assert kv_bytes_per_token(2, 8, torch.bfloat16, 4) == 2 * 2 * (4 + 8)


@pytest.mark.parametrize(("quant_policy", "tolerance"), [(8, 0.02), (4, 0.12)])
def test_quantized_cache_attention_close_to_full_precision(
    quant_policy: int, tolerance: float
) -> None:
    """The same keys and values through an int8 or int4 cache: the attention moves by a small
    share of its scale (int4's 16 steps a row more than int8's 255)."""
    gen = torch.Generator().manual_seed(6)
    block_size, num_blocks = 4, 32
    meta, _ = _metadata(MIXED_BATCH, block_size, num_blocks, gen)
    full = new_kv_cache(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    quantized = new_kv_cache(
        num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, torch.float32, "cpu", quant_policy
    )
    slots = torch.cat([
        meta.block_tables[b, torch.arange(s) // block_size].long() * block_size
        + torch.arange(s) % block_size
        for b, s in enumerate(meta.seq_lens_cpu)
    ])  # fmt: skip
    k = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    write_kv_cache(k, v, full[0], full[1], slots)
    write_kv_cache(k, v, quantized[0], quantized[1], slots, (quantized[2], quantized[3]))
    q = torch.randn(sum(meta.query_lens_cpu), NUM_HEADS, HEAD_DIM, generator=gen)
    expected = paged_attention_ref(q, full[0], full[1], meta, HEAD_DIM**-0.5)
    out = paged_attention_ref(
        q, quantized[0], quantized[1], meta, HEAD_DIM**-0.5, kv_scales=quantized[2:]
    )
    error = (out - expected).abs().max().item()
    assert 0 < error < tolerance * expected.abs().max().item()


def test_token_layout_derives_positions_and_slots() -> None:
    """Positions and slots from the per-sequence layout, as the host would list them, also for
    a graph's padded layout: empty sequences, then one owning the padding tokens."""
    gen = torch.Generator().manual_seed(3)
    block_size = 4
    meta, tables = _metadata(MIXED_BATCH, block_size, 32, gen)
    real = sum(q for _, q in MIXED_BATCH)
    pad, scratch = 6, 31
    query_start = [*meta.query_start_loc.tolist(), real, real + pad]
    seq_lens = [*meta.seq_lens.tolist(), 0, pad]
    width = max(len(t) for t in tables)
    block_tables = [[*t, *[0] * (width - len(t))] for t in tables] + [[scratch] * width] * 2
    positions, slots = token_layout(
        torch.tensor(query_start), torch.tensor(seq_lens), torch.tensor(block_tables),
        block_size, real + pad,
    )  # fmt: skip
    want = [p for s, q in MIXED_BATCH for p in range(s - q, s)] + list(range(pad))
    assert positions.tolist() == want
    want_slots = [*meta.slot_mapping.tolist(), *(scratch * block_size + p % 4 for p in range(pad))]
    assert slots.tolist() == want_slots
