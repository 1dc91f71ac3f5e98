"""Decode-graph input staging: the whole-batch numpy version writes what a loop over the
sequences would, and refuses steps that are not plain decode batches."""

from __future__ import annotations

import random

import numpy as np

from app.engine.config import SamplingParams
from app.engine.cuda_graphs import stage_decode_rows
from app.engine.scheduler import ScheduledSequence
from app.engine.sequence import Sequence

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
    wide = decode_item(rng, 3, params)
    assert not staged([wide], width=len(wide.block_table) - 1)
    assert (rows == 0).all()
