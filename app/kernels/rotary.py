"""Rotary position embedding of queries and keys, fused with the store of this step's keys and
values into the paged cache (quantized there, with a scale per token and kv head, for an int8
or int4 cache): one pass over q/k/v instead of three."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from app.kernels.attention import KVScales, write_kv_cache
from app.kernels.paged_tile import quant_bits, scale_args
from app.kernels.pdl import launch_options, wait_for_previous


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[T, heads, head_dim]` by half-split (GPT-NeoX) pairs, in x's dtype like HF."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales | None = None,
) -> None:
    """Rotate q `[T, H, hd]` and k `[T, kvh, hd]` in place by this step's (cos, sin)
    `[T, hd/2]` (float32), then store k and v at their slots of the `[N, bs, kvh, hd]` caches
    (`kv_scales` for a quantized cache). Triton on CUDA tensors, the torch reference elsewhere."""
    run = rotary_and_cache_triton if q.is_cuda else rotary_and_cache_ref
    run(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, kv_scales)


def rotary_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales | None = None,
) -> None:
    """Torch reference of `rotary_and_cache`."""
    q.copy_(apply_rotary(q, cos, sin))
    k.copy_(apply_rotary(k, cos, sin))
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, kv_scales)


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, cos, sin, NUM: tl.constexpr, NUM_PAD: tl.constexpr, HALF: tl.constexpr
):
    """Rotate one token's NUM heads in place; returns the rotated halves (float32)."""
    h = tl.arange(0, NUM_PAD)
    i = tl.arange(0, HALF)
    ok = (h < NUM)[:, None]
    first = x_ptr + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    # The reference rounds cos/sin to x's dtype before multiplying; so do we.
    c = cos.to(x1.dtype).to(tl.float32)[None, :]
    s = sin.to(x1.dtype).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    r1 = a * c - b * s
    r2 = b * c + a * s
    tl.store(first, r1.to(x1.dtype), mask=ok)
    tl.store(first + HALF, r2.to(x1.dtype), mask=ok)
    return r1, r2


@triton.jit
def _rotary_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    ks_ptr,
    vs_ptr,
    stride_sb,
    stride_ss,
    stride_sh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * stride_cos + i)
    sin = tl.load(sin_ptr + t * stride_sin + i)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_HEADS, HEADS_PAD, HALF)
    k1, k2 = _rotate_heads(
        k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF
    )

    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, KV_HEADS_PAD)
    ok = (h < NUM_KV_HEADS)[:, None]
    where = (slot // BLOCK_SIZE) * stride_kcb + (slot % BLOCK_SIZE) * stride_kcs
    kc = k_cache_ptr + where + h[:, None] * stride_kch + i[None, :]
    d = tl.arange(0, 2 * HALF)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
    where_v = (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs
    vc = v_cache_ptr + where_v + h[:, None] * stride_vch + d[None, :] * stride_vcd
    if QUANT:
        # The reference quantizes k as stored in the model's dtype: round there first.
        k1 = k1.to(k_ptr.dtype.element_ty).to(tl.float32)
        k2 = k2.to(k_ptr.dtype.element_ty).to(tl.float32)
        v = v.to(tl.float32)
        where_s = (slot // BLOCK_SIZE) * stride_sb + (slot % BLOCK_SIZE) * stride_ss
        head_ok = h < NUM_KV_HEADS
    if QUANT == 8:
        k_max = tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1))
        k_max = tl.maximum(k_max, 1e-6)
        v_max = tl.maximum(tl.max(tl.abs(v), 1), 1e-6)
        k_inv = (127.0 / k_max)[:, None]
        k1 = tl.clamp(tl.floor(k1 * k_inv + 0.5), -127.0, 127.0)
        k2 = tl.clamp(tl.floor(k2 * k_inv + 0.5), -127.0, 127.0)
        v = tl.clamp(tl.floor(v * (127.0 / v_max)[:, None] + 0.5), -127.0, 127.0)
        tl.store(ks_ptr + where_s + h * stride_sh, k_max / 127.0, mask=head_ok)
        tl.store(vs_ptr + where_s + h * stride_sh, v_max / 127.0, mask=head_ok)
    if QUANT == 4:
        # Byte i of a row holds dimension i in its low nibble and i + HALF in its high one.
        k_low = tl.minimum(tl.min(k1, 1), tl.min(k2, 1))
        k_span = tl.maximum(tl.maximum(tl.max(k1, 1), tl.max(k2, 1)) - k_low, 1e-6)
        v_low = tl.min(v, 1)
        v_span = tl.maximum(tl.max(v, 1) - v_low, 1e-6)
        k_inv = (15.0 / k_span)[:, None]
        k_packed = _nibbles(k1, k_low, k_inv) | (_nibbles(k2, k_low, k_inv) << 4)
        v_inv = (15.0 / v_span)[:, None]
        v_rows = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
        v1 = tl.load(v_rows, mask=ok).to(tl.float32)  # the halves of the v loaded above
        v2 = tl.load(v_rows + HALF, mask=ok).to(tl.float32)
        v_packed = _nibbles(v1, v_low, v_inv) | (_nibbles(v2, v_low, v_inv) << 4)
        tl.store(ks_ptr + where_s + h * stride_sh, k_span / 15.0, mask=head_ok)
        tl.store(ks_ptr + where_s + h * stride_sh + 1, k_low, mask=head_ok)
        tl.store(vs_ptr + where_s + h * stride_sh, v_span / 15.0, mask=head_ok)
        tl.store(vs_ptr + where_s + h * stride_sh + 1, v_low, mask=head_ok)
        tl.store(kc, k_packed, mask=ok)
        v_bytes = v_cache_ptr + where_v + h[:, None] * stride_vch + i[None, :] * stride_vcd
        tl.store(v_bytes, v_packed, mask=ok)
    else:
        tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(kc + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nibbles(x, low, inv):
    """`x` `[heads, n]` (float32) on the 0..15 grid from each row's `low`, rounded half up."""
    return tl.clamp(tl.floor((x - low[:, None]) * inv + 0.5), 0.0, 15.0).to(tl.uint8)


def rotary_and_cache_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales | None = None,
) -> None:
    """Triton `rotary_and_cache`: one program per token. q/k/v may be strided views (of the
    packed qkv projection) as long as each head's head_dim values are contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, k_cache)):
        raise ValueError("rotary_and_cache needs contiguous head_dim (last) dimensions")
    _rotary_cache_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *scale_args(kv_scales, k_cache),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        BLOCK_SIZE=block_size,
        QUANT=quant_bits(k_cache, kv_scales),
        num_warps=4,
        **launch_options(q.device),
    )  # fmt: skip
