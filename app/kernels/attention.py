"""Paged attention over the block-table KV cache: the batch layout, the cache write and a torch
reference that handles decode, prefill and mid-sequence chunks in one mixed batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.kernels.decode_attention import paged_decode_attention
from app.kernels.prefill_attention import paged_prefill_attention


@dataclass
class AttentionMetadata:
    """One step's batch layout: B sequences, T = total new tokens, flattened in sequence order."""

    query_start_loc: torch.Tensor  # int32 [B+1], cumulative new-token counts (0, q0, q0+q1, ...)
    seq_lens: torch.Tensor  # int32 [B], context length INCLUDING this step's new tokens
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor  # int64 [T], cache slot each new token's K/V is written to
    query_lens_cpu: list[int]  # the same as python lists, for host-side loops/shapes
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values `[T, kvh, hd]` at their slots in `[N, bs, kvh, hd]` caches."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of new queries `[T, H, hd]` over each sequence's cached keys/values.

    On CUDA a batch of pure decodes takes the flash-decoding kernel, which splits long contexts
    across programs; any batch with a longer query (prefill chunks, mixed with decodes or not)
    takes the prefill kernel, which also handles its decode rows. Elsewhere: the reference.
    """
    if not q.is_cuda:
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window=sliding_window)
    if meta.max_query_len == 1:
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
            sliding_window=sliding_window,
        )  # fmt: skip
    return paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
        sliding_window=sliding_window,
    )  # fmt: skip


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Torch reference: gather each sequence's context into a padded batch and run one SDPA.

    A key at position p is visible to a query at position t when p <= t (and, with a sliding
    window w, when t - p < w).
    """
    device = q.device
    num_seqs = len(meta.seq_lens_cpu)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_q, max_s = meta.max_query_len, meta.max_seq_len

    # Cache slot of every (sequence, key position); positions past a sequence's end still index a
    # real block (a padding entry of the table) and are masked out below.
    key_pos = torch.arange(max_s, device=device)
    blocks = meta.block_tables[:, key_pos // block_size].long()
    slots = blocks * block_size + key_pos % block_size
    seq_lens = meta.seq_lens.to(device=device, dtype=torch.long)
    key_valid = key_pos[None, :] < seq_lens[:, None]  # [B, S]

    # Stale or never-written cache rows may hold NaN/inf, which would poison a softmax even when
    # masked, so invalid keys/values are zeroed rather than only masked.
    compute_dtype = q.dtype
    if device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    valid = key_valid[:, :, None, None]
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].to(compute_dtype)  # [B, S, kvh, hd]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].to(compute_dtype)
    k = torch.where(valid, k, 0.0)
    v = torch.where(valid, v, 0.0)

    # Row of the padded [B * max_q] query batch that each flattened new token occupies.
    query_lens = torch.tensor(meta.query_lens_cpu, device=device)
    seq_index = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
    starts = meta.query_start_loc[:-1].to(device=device, dtype=torch.long)
    offset_in_seq = torch.arange(q.shape[0], device=device) - starts[seq_index]
    padded_row = seq_index * max_q + offset_in_seq

    q_pad = q.new_zeros(num_seqs * max_q, num_heads, head_dim, dtype=compute_dtype)
    q_pad[padded_row] = q.to(compute_dtype)
    q_pad = q_pad.view(num_seqs, max_q, num_heads, head_dim)

    # Absolute position of each padded query row. Rows past a sequence's query length are
    # padding: whatever they attend to is dropped by the final gather.
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, Q, S]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window

    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, :, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, Q, hd]
    out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)
    return out[padded_row].to(q.dtype)
