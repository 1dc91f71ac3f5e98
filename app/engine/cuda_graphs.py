"""CUDA graphs: decode steps by batch-size bucket, mixed steps by token-count bucket.

Decode batches (one new token per sequence, each sampled) are padded to the next bucket and
replayed from static input buffers; padding rows attend to themselves in a scratch block that no
sequence owns. Mixed steps (prefill chunks beside decodes), which launch hundreds of kernels from
Python, replay a graph whose sequence slots and token count are padded: unused slots are empty
sequences and a last slot owns the padding tokens, in the scratch block. All graphs share one
memory pool, captured largest first so smaller graphs reuse it. A decode bucket that replays
slower than a larger one is not used: cuBLAS picks its kernels by shape, and an H200 ran the
gate_up product 1.5x slower at 448 rows than at 480.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from app.engine.scheduler import ScheduledSequence
from app.kernels.attention import AttentionMetadata, KVCache, token_layout

log = logging.getLogger("splitfuse.engine")


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to 512 and 64 beyond: past 256 rows the matrix products
    are bound by arithmetic, so padding costs its share of the step; buckets that do not pay
    for themselves are dropped by replay time after capture (`fastest_buckets`)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += range(16, min(max_batch_size, 512), 16)
    sizes += range(512, max_batch_size, 64)
    return [*sizes, max_batch_size]


def fastest_buckets(replay_ms: dict[int, float], margin: float = 0.02) -> list[int]:
    """The buckets worth replaying, smallest first: a bucket goes when a larger one replays at
    least `margin` faster, so that its batches pad up to that one instead."""
    kept, best = [], math.inf
    for size in sorted(replay_ms, reverse=True):
        if best >= replay_ms[size] * (1 - margin):
            kept.append(size)
        best = min(best, replay_ms[size])
    return kept[::-1]


def stage_decode_rows(
    items: list[ScheduledSequence], block_size: int, rows: np.ndarray, tables: np.ndarray
) -> bool:
    """Write a decode batch's token ids, positions, cache slots and context lengths into
    `rows[0:4, :n]` and its block tables into `tables[:n]` (entries past a table's end keep
    what they held); False, with nothing usable written, when the step is not a plain decode
    batch or a table is wider than `tables`. Whole-batch numpy work: at batch 256 a loop per
    sequence would cost the device a millisecond of idle time every step."""
    for item in items:
        if item.num_new_tokens != 1 or not item.sample or item.seq.params.needs_eager:
            return False
    n = len(items)
    block_tables = [item.block_table for item in items]
    lengths = np.array([len(table) for table in block_tables])
    width = int(lengths.max())
    if width > tables.shape[1]:
        return False
    positions = np.array([item.start_pos for item in items])
    rows[0, :n] = [item.token_ids[0] for item in items]
    rows[1, :n] = positions
    rows[3, :n] = positions + 1
    staged = _fill_tables(tables, block_tables, lengths)
    blocks = staged[np.arange(n), positions // block_size].astype(np.int64)
    rows[2, :n] = blocks * block_size + positions % block_size
    return True


def stage_mixed_rows(
    items: list[ScheduledSequence], bucket: int, rows: np.ndarray, tables: np.ndarray
) -> int:
    """Write a step's layout for a mixed graph of `bucket` tokens and `s` sequence slots:
    `rows` holds token ids [t], query starts [s+1], sequence lengths [s] and sampling rows [s]
    (t = len(rows) - 3s - 1); `tables[:n]` the block tables. Slots past the step's sequences
    are empty but the last, which owns the padding tokens (its table row is left to the caller:
    all scratch). Returns the widest table."""
    s = tables.shape[0]
    t = len(rows) - 3 * s - 1
    ids, query_start = rows[:t], rows[t : t + s + 1]
    seq_lens, sample_rows = rows[t + s + 1 : t + 2 * s + 1], rows[t + 2 * s + 1 :]
    n = len(items)
    counts = np.array([item.num_new_tokens for item in items], dtype=np.int64)
    ends = np.cumsum(counts)
    row = int(ends[-1]) if n else 0
    ids[:row] = list(itertools.chain.from_iterable(item.token_ids for item in items))
    ids[row:bucket] = 0
    query_start[0] = 0
    query_start[1 : n + 1] = ends
    query_start[n + 1 : s] = row  # empty sequences, then the padding sequence
    query_start[s] = bucket
    seq_lens[:n] = [item.start_pos + item.num_new_tokens for item in items]
    seq_lens[n : s - 1] = 0
    seq_lens[s - 1] = bucket - row
    sampled = ends[[item.sample for item in items]] - 1 if n else ends
    sample_rows[: len(sampled)] = sampled
    sample_rows[len(sampled) :] = 0
    if not n:
        return 0
    block_tables = [item.block_table for item in items]
    lengths = np.array([len(table) for table in block_tables])
    _fill_tables(tables, block_tables, lengths)
    return int(lengths.max())


def _fill_tables(
    tables: np.ndarray, block_tables: list[tuple[int, ...]], lengths: np.ndarray
) -> np.ndarray:
    """Each table at the start of its row of `tables` (the rest of a row keeps what it held);
    returns the filled `[n, widest]` view."""
    staged = tables[: len(block_tables), : int(lengths.max())]
    staged[np.arange(staged.shape[1]) < lengths[:, None]] = list(
        itertools.chain.from_iterable(block_tables)
    )
    return staged


class DecodeGraphs:
    """Captured decode forwards (+ logits) for a ladder of batch sizes."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[KVCache],
        max_batch_size: int,
        max_model_len: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = bucket_sizes(max_batch_size)
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        b = self.buckets[-1]
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full(
            (b,), scratch_block * block_size, dtype=torch.int64, device=device
        )
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (b, self.max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        # Host staging: one pinned buffer for the per-row scalars, one for the block tables,
        # written through numpy views and sent with one copy each.
        self._host_rows = torch.zeros((4, b), dtype=torch.int64, pin_memory=True)
        self._host_tables = torch.zeros((b, self.max_blocks), dtype=torch.int32, pin_memory=True)
        self._device_rows = torch.zeros((4, b), dtype=torch.int64, device=device)
        self._copied: torch.cuda.Event | None = None  # recorded after the last step's copies
        # Every graph writes its logits into rows of this one buffer: outputs kept per graph
        # would hold (sum of bucket sizes) x vocab floats, gigabytes at large batches.
        dtype = model.model.embed_tokens.weight.dtype
        self.logits = torch.empty((b, model.spec.vocab_size), dtype=dtype, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.max_model_len] * b,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b))
        return self.model.compute_logits(hidden, out=self.logits[:b])

    def capture(self, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        for b in reversed(self.buckets):
            self._graphs[b] = _capture(lambda b=b: self._forward(b), pool, stream)[1]
        replay_ms = dict.fromkeys(self.buckets, math.inf)
        for _ in range(2):  # the faster of two rounds: the clocks may still be rising in one
            for b in reversed(self.buckets):
                replay_ms[b] = min(replay_ms[b], _replay_ms(self._graphs[b]))
        self.buckets = fastest_buckets(replay_ms)
        slower = sorted(set(replay_ms) - set(self.buckets))
        log.info(
            "captured CUDA graphs for decode batch sizes %s (not used, slower than a larger "
            "one: %s)", self.buckets, slower or "none",
        )  # fmt: skip

    @torch.inference_mode()
    def run(
        self, items: list[ScheduledSequence], input_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Replay the smallest graph that holds a plain decode batch and return its logits
        rows; None (nothing replayed) for any other step. `input_ids` on the device, when
        given, replace the leading items' own (a step scheduled ahead of its tokens)."""
        n = len(items)
        b = next((size for size in self.buckets if size >= n), None)
        if b is None:
            return None
        # The step before may still be queued behind another: its copies out of these buffers
        # must be done before they are overwritten.
        if self._copied is not None:
            self._copied.synchronize()
        rows, tables = self._host_rows.numpy(), self._host_tables.numpy()
        if not stage_decode_rows(items, self.block_size, rows, tables):
            return None
        rows[0, n:b], rows[1, n:b], rows[3, n:b] = 0, 0, 1
        rows[2, n:b] = self.scratch_block * self.block_size
        tables[n:b] = self.scratch_block
        self._device_rows[:, :b].copy_(self._host_rows[:, :b], non_blocking=True)
        self.block_tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self.input_ids[:b].copy_(self._device_rows[0, :b])
        self.positions[:b].copy_(self._device_rows[1, :b])
        self.slot_mapping[:b].copy_(self._device_rows[2, :b])
        self.seq_lens[:b].copy_(self._device_rows[3, :b])
        if input_ids is not None:
            self.input_ids[: len(input_ids)].copy_(input_ids)
        self._graphs[b].replay()
        return self.logits[:n]


def mixed_buckets(max_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs: steps above the last run eagerly, where the device
    time of the step dwarfs its launches."""
    return [t for t in (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048) if t <= max_tokens]


class MixedGraphs:
    """Captured forwards of steps with prefill chunks, one per token-count bucket; each returns
    the hidden states of the step's sampling rows (logits are computed after the replay)."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[KVCache],
        max_batch_size: int,
        max_tokens: int,
        max_model_len: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        # The padding sequence's positions run up to the bucket size, inside its block table.
        self.buckets = mixed_buckets(min(max_tokens, self.max_blocks * block_size))
        self.max_seqs = max_batch_size
        slots = max_batch_size + 1  # the last slot is the padding sequence's
        self.num_slots = slots
        self.max_tokens = t = self.buckets[-1] if self.buckets else 0
        # One int64 staging row: token ids [t], query starts [slots+1], seq lens [slots],
        # sampling rows [slots]; sent with one copy.
        self._host = torch.zeros(t + 3 * slots + 1, dtype=torch.int64, pin_memory=True)
        self._rows = torch.zeros(t + 3 * slots + 1, dtype=torch.int64, device=device)
        self._host_tables = torch.zeros(
            (slots, self.max_blocks), dtype=torch.int32, pin_memory=True
        )
        self.block_tables = torch.full(
            (slots, self.max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        self._copied: torch.cuda.Event | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}

    def _views(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        t, s = self.max_tokens, self.num_slots
        rows = self._rows
        return (
            rows[:num_tokens],
            rows[t : t + s + 1],
            rows[t + s + 1 : t + 2 * s + 1],
            rows[t + 2 * s + 1 :],
        )

    def _forward(self, num_tokens: int) -> torch.Tensor:
        input_ids, query_start, seq_lens, sample_rows = self._views(num_tokens)
        positions, slots = token_layout(
            query_start, seq_lens, self.block_tables, self.block_size, num_tokens
        )
        meta = AttentionMetadata(
            query_start_loc=query_start.int(),
            seq_lens=seq_lens.int(),
            block_tables=self.block_tables,
            slot_mapping=slots,
            # Host copies are for the torch reference only; the kernels read the tensors. A
            # first query length above one sends every row to the prefill kernel.
            query_lens_cpu=[num_tokens] + [0] * (self.num_slots - 1),
            seq_lens_cpu=[num_tokens] + [0] * (self.num_slots - 1),
            max_query_len=num_tokens,
            max_seq_len=self.max_blocks * self.block_size,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return hidden[sample_rows]

    def capture(self, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        for t in reversed(self.buckets):
            self.stage([], t)  # every token the padding sequence's: a valid layout
            self._hidden[t], self._graphs[t] = _capture(lambda t=t: self._forward(t), pool, stream)
        log.info("captured CUDA graphs for mixed steps of up to %s tokens", self.buckets)

    def fits(self, num_seqs: int, num_tokens: int, max_blocks: int) -> bool:
        return (
            num_seqs <= self.max_seqs
            and num_tokens <= self.max_tokens
            and max_blocks <= self.max_blocks
        )

    def stage(self, items: list[ScheduledSequence], num_tokens: int) -> int:
        """Write the step's layout into the static inputs; return its bucket."""
        bucket = next(t for t in self.buckets if t >= num_tokens)
        if self._copied is not None:  # the last step's copy out of the host buffers is done
            self._copied.synchronize()  # (it may still be queued behind the step before it)
        width = stage_mixed_rows(items, bucket, self._host.numpy(), self._host_tables.numpy())
        self._rows.copy_(self._host, non_blocking=True)
        if width:
            self.block_tables[: len(items), :width].copy_(
                self._host_tables[: len(items), :width], non_blocking=True
            )
        self._copied = torch.cuda.Event()
        self._copied.record()
        return bucket

    def run(
        self,
        items: list[ScheduledSequence],
        num_tokens: int,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay the smallest graph that holds the step; the sampling rows' hidden states.
        `input_ids` on the device, when given, replace the leading items' own (decodes of a
        step scheduled ahead of their tokens, one row each)."""
        bucket = self.stage(items, num_tokens)
        if input_ids is not None:
            self._rows[: len(input_ids)].copy_(input_ids)
        self._graphs[bucket].replay()
        return self._hidden[bucket][: sum(item.sample for item in items)]


def capture_graphs(graphs: list[DecodeGraphs | MixedGraphs], device: torch.device) -> None:
    """Capture every graph on a side stream into one shared memory pool."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), torch.cuda.stream(stream):
        for group in graphs:
            group.capture(pool, stream)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)


def _replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 5) -> float:
    """Milliseconds per replay of a captured graph on the current stream, after one warm-up."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _capture(
    forward: Callable[[], torch.Tensor], pool: tuple[int, int], stream: torch.cuda.Stream
) -> tuple[torch.Tensor, torch.cuda.CUDAGraph]:
    forward()  # warm up: Triton compiles, the allocator settles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = forward()
    return out, graph
