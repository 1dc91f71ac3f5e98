"""CUDA-graph input staging (numpy, so it runs anywhere): decode batches get what a loop over
the sequences would write, other steps are refused; mixed steps get a padded layout whose
positions and cache slots come out right."""

from __future__ import annotations

import random

import numpy as np
import torch

from app.engine.config import SamplingParams
from app.engine.cuda_graphs import (
    bucket_sizes,
    fastest_buckets,
    stage_decode_rows,
    stage_mixed_rows,
)
from app.engine.scheduler import ScheduledSequence
from app.engine.sequence import Sequence
from app.kernels.attention import token_layout

BLOCK = 16


def decode_item(rng: random.Random, seq_id: int, params: SamplingParams) -> ScheduledSequence:
    context = rng.randrange(1, 200)
    seq = Sequence(seq_id, "r", 0, [rng.randrange(100) for _ in range(context)], params)
    seq.num_computed_tokens = context - 1
    seq.block_table = rng.sample(range(1000), -(-context // BLOCK))
    return ScheduledSequence.plan(seq, 1, 1)


def test_staging_matches_a_loop_over_sequences() -> None:
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=8)
    items = [decode_item(rng, i, params) for i in range(37)]
    rows = np.full((4, 64), -1, dtype=np.int64)
    tables = np.full((64, 16), -1, dtype=np.int32)
    assert stage_decode_rows(items, BLOCK, rows, tables)
    for i, item in enumerate(items):
        pos, table = item.start_pos, item.block_table
        assert rows[:, i].tolist() == [
            item.token_ids[0],
            pos,
            table[pos // BLOCK] * BLOCK + pos % BLOCK,
            pos + 1,
        ]
        assert tables[i, : len(table)].tolist() == list(table)
    assert (rows[:, len(items) :] == -1).all()  # rows past the batch are the caller's


def test_staging_refuses_other_steps() -> None:
    rng = random.Random(1)
    params = SamplingParams(max_new_tokens=8)
    rows = np.zeros((4, 8), dtype=np.int64)

    def staged(items: list[ScheduledSequence], width: int = 16) -> bool:
        return stage_decode_rows(items, BLOCK, rows, np.zeros((8, width), np.int32))

    chunk = decode_item(rng, 0, params)
    chunk.num_new_tokens = 3
    assert not staged([decode_item(rng, 1, params), chunk])
    assert not staged([decode_item(rng, 2, SamplingParams(max_new_tokens=8, prompt_logprobs=True))])
    for rows_asked in ({"output_last_hidden_state": "generation"}, {"output_logits": "all"}):
        assert not staged([decode_item(rng, 4, SamplingParams(max_new_tokens=8, **rows_asked))])
    wide = decode_item(rng, 3, params)
    assert not staged([wide], width=len(wide.block_table) - 1)
    assert (rows == 0).all()


def test_generated_tokens_logits_keep_the_graph() -> None:
    """A graph computes the sampling rows' logits, all that output_logits="generation" takes."""
    rng = random.Random(3)
    rows = np.zeros((4, 8), dtype=np.int64)
    params = SamplingParams(max_new_tokens=8, output_logits="generation")
    items = [decode_item(rng, 0, params), decode_item(rng, 1, SamplingParams(max_new_tokens=8))]
    assert stage_decode_rows(items, BLOCK, rows, np.zeros((8, 16), np.int32))


def test_mixed_staging_pads_with_empty_sequences_and_a_padding_owner() -> None:
    """A mixed step in a graph of 64 tokens and 6 sequence slots: the staged layout gives every
    real token its position and slot (token_layout, as inside the graph), the sampling rows are
    the chunks' last tokens, and the last slot owns the padding tokens in the scratch block."""
    rng = random.Random(2)
    params = SamplingParams(max_new_tokens=8)
    decode = decode_item(rng, 0, params)
    prompt = Sequence(1, "r", 0, list(range(40)), params)
    prompt.num_computed_tokens = 16
    prompt.block_table = [500, 501, 502]
    chunk = ScheduledSequence.plan(prompt, 20, 24)  # not the prompt's end: no sample
    items = [decode, chunk]
    bucket, slots, scratch = 64, 6, 999
    rows = np.full(bucket + 3 * slots + 1, -1, dtype=np.int64)
    tables = np.full((slots, 16), scratch, dtype=np.int32)
    assert stage_mixed_rows(items, bucket, rows, tables) == 3  # the widest table
    t = bucket
    query_start, seq_lens = rows[t : t + slots + 1], rows[t + slots + 1 : t + 2 * slots + 1]
    assert query_start.tolist() == [0, 1, 21, 21, 21, 21, 64]
    assert seq_lens.tolist() == [decode.start_pos + 1, 36, 0, 0, 0, 43]
    assert rows[t + 2 * slots + 1 :].tolist() == [0] * slots  # the decode's row 0 only
    assert rows[:21].tolist() == [*decode.token_ids, *range(16, 36)]
    positions, cache_slots = token_layout(
        torch.from_numpy(query_start), torch.from_numpy(seq_lens),
        torch.from_numpy(tables.astype(np.int64)), BLOCK, bucket,
    )  # fmt: skip
    pos = decode.start_pos
    assert positions.tolist() == [pos, *range(16, 36), *range(43)]
    want = [decode.block_table[pos // BLOCK] * BLOCK + pos % BLOCK]
    want += [prompt.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(16, 36)]
    want += [scratch * BLOCK + p % BLOCK for p in range(43)]
    assert cache_slots.tolist() == want


def test_bucket_ladder_holds_every_batch_with_little_padding() -> None:
    for cap in (1, 3, 16, 100, 256, 300, 512, 1024):
        ladder = bucket_sizes(cap)
        assert ladder == sorted(set(ladder)) and ladder[-1] == cap
        for n in range(1, cap + 1):
            bucket = next(b for b in ladder if b >= n)
            assert n > 512 or bucket - n < 16
            assert n <= 512 or (bucket - n) / bucket <= 0.11, (cap, n, bucket)
    assert len(bucket_sizes(1024)) == 44


def test_a_bucket_slower_than_a_larger_one_is_not_used() -> None:
    # Replay times shaped like the H200's matrix products by row count (BENCHMARKS, ninth
    # round): 448 rows slower than 480 (cuBLAS's kernel choice); 352 within 2% of 384 stays.
    replay_ms = {256: 6.6, 288: 7.7, 352: 8.5, 384: 8.6, 416: 10.2, 448: 13.8, 480: 10.7, 512: 11.0}
    assert fastest_buckets(replay_ms) == [256, 288, 352, 384, 416, 480, 512]
    assert fastest_buckets({1: 5.0, 2: 4.0, 4: 6.0}) == [2, 4]
    assert fastest_buckets({8: 1.0}) == [8]
    assert fastest_buckets({1: 1.0, 2: 1.0, 4: 1.0}) == [1, 2, 4]  # ties keep the smaller
