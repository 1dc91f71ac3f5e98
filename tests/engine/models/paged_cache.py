"""Test-side stand-in for the block manager + model runner: allocates shuffled KV blocks per
sequence and builds the tensors and AttentionMetadata of one step."""

from __future__ import annotations

import math

import torch

from app.engine.models.registry import KVCacheSpec
from app.kernels.attention import AttentionMetadata


class PagedCache:
    """KV caches for every layer plus per-sequence block tables over a shuffled block pool."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int = 64,
        block_size: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # NaN-filled so that reading a slot nobody wrote shows up as NaN logits.
        self.kv_caches = [
            (
                torch.full(shape, float("nan"), dtype=dtype),
                torch.full(shape, float("nan"), dtype=dtype),
            )
            for _ in range(spec.num_layers)
        ]
        self.block_size = block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free = self.free.tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(
        self, chunks: list[tuple[int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids, positions and metadata for `(seq_id, new_token_ids)` chunks, in order."""
        ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq_id, tokens in chunks:
            start = self.lens.get(seq_id, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq_id, [])
            while len(table) < math.ceil(end / self.block_size):
                table.append(self.free.pop())
            for pos in range(start, end):
                slots.append(
                    table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lens[seq_id] = end
        tables = [self.tables[seq_id] for seq_id, _ in chunks]
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(
                [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32
            ),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32
            ),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions), meta
