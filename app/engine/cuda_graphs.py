"""CUDA graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

Decode batches (one new token per sequence, each sampled) are padded to the next bucket and
replayed from static input buffers; padding rows attend to themselves in a scratch block that no
sequence owns. Buckets are captured largest first so smaller graphs reuse the pool.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from app.kernels.attention import AttentionMetadata

log = logging.getLogger("splitfuse.engine")


def bucket_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


class DecodeGraphs:
    """Captured decode forwards (+ logits) for a ladder of batch sizes."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
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
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

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
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._forward(b)  # warm up: Triton compiles, allocator settles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._logits[b] = self._forward(b)
                self._graphs[b] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def fits(self, batch_size: int, max_blocks: int) -> bool:
        return batch_size <= self.buckets[-1] and max_blocks <= self.max_blocks

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[tuple[int, ...]],
    ) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; return its logits rows."""
        n = len(input_ids)
        b = next(size for size in self.buckets if size >= n)
        # The previous step synchronized on its results, so its copies out of these buffers are
        # done and they can be overwritten.
        rows = self._host_rows.numpy()
        rows[0, :n], rows[0, n:b] = input_ids, 0
        rows[1, :n], rows[1, n:b] = positions, 0
        rows[2, :n], rows[2, n:b] = slots, self.scratch_block * self.block_size
        rows[3, :n], rows[3, n:b] = seq_lens, 1
        tables = self._host_tables.numpy()
        tables[:b] = self.scratch_block
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = table
        self._device_rows[:, :b].copy_(self._host_rows[:, :b], non_blocking=True)
        self.block_tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        self.input_ids[:b].copy_(self._device_rows[0, :b])
        self.positions[:b].copy_(self._device_rows[1, :b])
        self.slot_mapping[:b].copy_(self._device_rows[2, :b])
        self.seq_lens[:b].copy_(self._device_rows[3, :b])
        self._graphs[b].replay()
        return self._logits[b][:n]
