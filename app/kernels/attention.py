"""Paged attention over the block-table KV cache: the batch layout, the cache (model dtype, int8
with a float32 scale per token and kv head, or int4 with a scale and a zero point), its write,
and a torch reference that handles decode, prefill and mid-sequence chunks in one mixed batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from app.kernels.decode_attention import longest_first, paged_decode_attention
from app.kernels.prefill_attention import paged_prefill_attention

# One layer's cache: (k, v) `[N, block_size, kvh, hd]`, then (k_scale, v_scale) `[N, block_size,
# kvh]` float32 when k and v hold int8 (LMDeploy's quant_policy=8). With quant_policy=4, k and v
# are uint8 `[N, block_size, kvh, hd / 2]`, byte i holding dimension i in its low nibble and
# i + hd / 2 in its high one, and the scales `[N, block_size, kvh, 2]`: (scale, zero point).
# A quantized cache stores its values slot-fastest (`[N, kvh, hd', block_size]` viewed in the
# shape above), so the kernels load one dimension of a tile's keys as a vector: P x V sums over
# the keys, and bytes strided along them would reach the tensor cores one load each.
KVCache = tuple[torch.Tensor, ...]
KVScales = tuple[torch.Tensor, torch.Tensor]


def new_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    quant_policy: int = 0,
    fill: float = 0.0,
) -> KVCache:
    """One layer's cache; `fill` for the values (NaN in tests, to catch reads of unwritten
    slots; a quantized cache takes it in its scales)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if not quant_policy:
        return tuple(torch.full(shape, fill, dtype=dtype, device=device) for _ in range(2))
    if quant_policy == 4:
        shape, values_dtype, per_slot = (*shape[:3], head_dim // 2), torch.uint8, (2,)
    else:
        values_dtype, per_slot = torch.int8, ()
    k_values = torch.zeros(shape, dtype=values_dtype, device=device)
    v_values = torch.zeros(
        (num_blocks, num_kv_heads, shape[3], block_size), dtype=values_dtype, device=device
    )
    values = (k_values, v_values.permute(0, 3, 1, 2))
    # Scales are stored head-major within a block, so that the kernels' tile of one head's
    # scales is contiguous: `[N, bs, kvh]` views of `[N, kvh, bs]` tensors.
    scales = tuple(
        torch.full((num_blocks, num_kv_heads, block_size, *per_slot), fill, device=device)
        .transpose(1, 2)
        for _ in range(2)
    )  # fmt: skip
    return values + scales


def kv_bytes_per_token(
    num_kv_heads: int, head_dim: int, dtype: torch.dtype, quant_policy: int = 0
) -> int:
    """Bytes one token takes in one layer's cache (keys and values)."""
    if quant_policy == 4:
        return 2 * num_kv_heads * (head_dim // 2 + 8)  # two values a byte, a scale and a zero
    if quant_policy:
        return 2 * num_kv_heads * (head_dim + 4)  # int8 values and a float32 scale per head
    return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def split_kv_cache(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, KVScales | None]:
    """(k_cache, v_cache, kv_scales or None)."""
    if len(cache) == 2:
        return cache[0], cache[1], None
    k_cache, v_cache, k_scale, v_scale = cache
    return k_cache, v_cache, (k_scale, v_scale)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 `[..., hd]` with one float32 scale per row (absmax / 127), rounded half
    up; the Triton cache write computes the same values."""
    x = x.float()
    absmax = x.abs().amax(-1).clamp_min(1e-6)
    values = torch.floor(x * (127.0 / absmax)[..., None] + 0.5).clamp_(-127, 127)
    return values.to(torch.int8), absmax / 127.0


def quantize_kv_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit `[..., hd]` (LMDeploy's quant_policy=4): each row's values mapped onto
    0..15 between its minimum (the zero point) and maximum, rounded half up, two to a byte
    (dimensions i and i + hd / 2 in byte i). Returns (uint8 `[..., hd / 2]`, float32 `[..., 2]`
    (scale, zero point)); the Triton cache write computes the same values."""
    x = x.float()
    low = x.amin(-1)
    span = (x.amax(-1) - low).clamp_min(1e-6)
    values = torch.floor((x - low[..., None]) * (15.0 / span)[..., None] + 0.5).clamp_(0, 15)
    first, second = values.to(torch.uint8).chunk(2, dim=-1)
    packed = first | (second << 4)
    return packed, torch.stack((span / 15.0, low), -1)


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 keys or values from a quantized cache's rows and their scales (`[..., 2]` scale
    and zero point for int4, `[...]` for int8)."""
    if values.dtype == torch.uint8:
        unpacked = torch.cat((values & 15, values >> 4), -1).float()
        return unpacked * scales[..., :1] + scales[..., 1:]
    return values.float() * scales[..., None]


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
    num_decodes: int = field(init=False)  # leading sequences with one new token each

    _parts: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = field(
        default=None, init=False, repr=False
    )
    _decode_order: torch.Tensor | None = field(default=None, init=False, repr=False)
    _ref_layouts: dict[tuple[int, int | None], RefLayout] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        n = 0
        for query_len in self.query_lens_cpu:
            if query_len != 1:
                break
            n += 1
        self.num_decodes = n

    def decode_order(self) -> torch.Tensor | None:
        """The leading decodes longest first: the order the decode kernel starts their programs
        in, made once per step (None for a single decode)."""
        if self._decode_order is None and self.num_decodes > 1:
            d = self.num_decodes
            seq_lens = self.seq_lens if d == len(self.seq_lens_cpu) else self.split_parts()[0][1]
            self._decode_order = longest_first(seq_lens)
        return self._decode_order

    def split_parts(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(block_tables, seq_lens) of the leading decodes and (block_tables, seq_lens,
        query_start_loc) of the rest, made once per step. Fresh tensors rather than views: a
        view's unaligned address would make Triton compile another kernel variant mid-serving."""
        if self._parts is None:
            d = self.num_decodes
            self._parts = (
                (self.block_tables[:d].clone(), self.seq_lens[:d].clone()),
                (
                    self.block_tables[d:].clone(),
                    self.seq_lens[d:].clone(),
                    self.query_start_loc[d:] - d,
                ),
            )
        return self._parts


@dataclass(frozen=True)
class RefLayout:
    """What the torch reference derives from a step's layout alone, the same for every layer."""

    key_valid: torch.Tensor  # bool [B, S, 1, 1]: the position holds one of the sequence's keys
    padded_row: torch.Tensor  # int64 [T]: row of each new token in the padded [B * Q] batch
    mask: torch.Tensor  # bool [B, 1, Q, S]: which keys each padded query row sees
    block_slot: tuple[torch.Tensor, torch.Tensor]  # (block [B, S], offset [S]) of every key


def ref_layout(
    meta: AttentionMetadata, block_size: int, sliding_window: int | None, device: torch.device
) -> RefLayout:
    """The reference's layout tensors for `meta`, made once per step (and window) and kept on
    it: on the CPU, where the reference is the attention, they would cost a dozen small ops in
    every layer."""
    key = (block_size, sliding_window)
    layout = meta._ref_layouts.get(key)
    if layout is not None:
        return layout
    num_seqs = len(meta.seq_lens_cpu)
    max_q, max_s = meta.max_query_len, meta.max_seq_len
    # Positions past a sequence's end still index a real block (a padding entry of the table)
    # and are masked out.
    key_pos = torch.arange(max_s, device=device)
    blocks = meta.block_tables[:, key_pos // block_size].long()
    offsets = key_pos % block_size
    seq_lens = meta.seq_lens.to(device=device, dtype=torch.long)
    key_valid = key_pos[None, :] < seq_lens[:, None]  # [B, S]

    # Row of the padded [B * max_q] query batch that each flattened new token occupies.
    query_lens = torch.tensor(meta.query_lens_cpu, device=device)
    seq_index = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
    starts = meta.query_start_loc[:-1].to(device=device, dtype=torch.long)
    num_tokens = sum(meta.query_lens_cpu)
    offset_in_seq = torch.arange(num_tokens, device=device) - starts[seq_index]
    padded_row = seq_index * max_q + offset_in_seq

    # Absolute position of each padded query row. Rows past a sequence's query length are
    # padding: whatever they attend to is dropped by the final gather.
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, Q, S]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
    layout = RefLayout(
        key_valid[:, :, None, None], padded_row, mask[:, None, :, :], (blocks, offsets)
    )
    meta._ref_layouts[key] = layout
    return layout


def token_layout(
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each new token's position and KV-cache slot `[T]` (int64), derived on the device from the
    per-sequence layout (query_start [B+1], seq_lens [B], block_tables [B, width]): no host work
    per token and no synchronization, so it also runs inside a CUDA graph. The layout must
    account for all `num_tokens` (zero-length sequences are fine)."""
    device = query_start.device
    query_lens = query_start.diff()
    token = torch.arange(num_tokens, device=device)
    # Sequence b owns tokens query_start[b] .. query_start[b+1]-1.
    owner = torch.searchsorted(query_start[1:], token, right=True)
    positions = (seq_lens - query_lens)[owner] + token - query_start[owner]
    slots = block_tables[owner, positions // block_size].long() * block_size
    return positions, slots + positions % block_size


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales | None = None,
) -> None:
    """Store this step's keys/values `[T, kvh, hd]` at their slots in `[N, bs, kvh, hd]` caches
    (quantized, with their scales, for an int8 or int4 cache)."""
    block_slot = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    quantize = quantize_kv_int4 if k_cache.dtype == torch.uint8 else quantize_kv
    for x, cache, scales in zip((k, v), (k_cache, v_cache), kv_scales or (None, None), strict=True):
        if scales is not None:
            x, scale = quantize(x)
            scales[block_slot] = scale
        cache[block_slot] = x.to(cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
    kv_scales: KVScales | None = None,
) -> torch.Tensor:
    """Causal attention of new queries `[T, H, hd]` over each sequence's cached keys/values:
    the Triton kernels on CUDA, the torch reference elsewhere."""
    run = paged_attention_triton if q.is_cuda else paged_attention_ref
    return run(q, k_cache, v_cache, meta, scale, sliding_window=sliding_window, kv_scales=kv_scales)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
    kv_scales: KVScales | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The leading decodes (one query each) take the flash-decoding kernel, which splits long
    contexts across programs; the prefill chunks after them take the prefill kernel, whose
    query tiles would be nearly empty for a decode row. Written into `out` when given."""
    d = meta.num_decodes
    opts = {"sliding_window": sliding_window, "kv_scales": kv_scales}
    if d == q.shape[0]:
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, **opts,
            order=meta.decode_order(), out=out,
        )  # fmt: skip
    if d == 0:
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            **opts, out=out,
        )  # fmt: skip
    if out is None:
        out = torch.empty_like(q)
    decode, prefill = meta.split_parts()
    paged_decode_attention(
        q[:d], k_cache, v_cache, *decode, scale, **opts, order=meta.decode_order(), out=out[:d]
    )
    paged_prefill_attention(q[d:], k_cache, v_cache, *prefill, scale, **opts, out=out[d:])
    return out


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
    kv_scales: KVScales | None = None,
) -> torch.Tensor:
    """Torch reference: gather each sequence's context into a padded batch and run one SDPA.

    A key at position p is visible to a query at position t when p <= t (and, with a sliding
    window w, when t - p < w).
    """
    num_seqs, max_q = len(meta.seq_lens_cpu), meta.max_query_len
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    layout = ref_layout(meta, block_size, sliding_window, q.device)

    # Stale or never-written cache rows may hold NaN/inf, which would poison a softmax even when
    # masked, so invalid keys/values are zeroed rather than only masked.
    compute_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    k = k_cache[layout.block_slot]  # [B, S, kvh, hd] (hd / 2 bytes for int4)
    v = v_cache[layout.block_slot]
    if kv_scales is not None:  # quantized values back to float32
        k = dequantize_kv(k, kv_scales[0][layout.block_slot])
        v = dequantize_kv(v, kv_scales[1][layout.block_slot])
    k, v = k.to(compute_dtype), v.to(compute_dtype)
    k = torch.where(layout.key_valid, k, 0.0)
    v = torch.where(layout.key_valid, v, 0.0)

    q_pad = q.new_zeros(num_seqs * max_q, num_heads, head_dim, dtype=compute_dtype)
    q_pad[layout.padded_row] = q.to(compute_dtype)
    q_pad = q_pad.view(num_seqs, max_q, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=layout.mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, Q, hd]
    out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)
    return out[layout.padded_row].to(q.dtype)
