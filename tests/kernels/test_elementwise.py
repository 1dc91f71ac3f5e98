"""The Triton RoPE+cache write, RMSNorm (plain and fused with the residual add) and SiLU-and-mul
kernels against their torch references on random inputs."""

from __future__ import annotations

import pytest
import torch
from paged_batch import DEVICE, close, nan_like, needs_triton

from app.kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from app.kernels.attention import dequantize_kv, new_kv_cache
from app.kernels.norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)
from app.kernels.rotary import rotary_and_cache_ref, rotary_and_cache_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2, 32), (3, 3, 16)], ids=["gqa", "odd-heads"])
def test_rotary_and_cache_matches_reference(
    dtype: torch.dtype, heads: tuple[int, int, int]
) -> None:
    num_heads, num_kv_heads, head_dim = heads
    tokens, num_blocks, block_size = 5, 4, 16
    qkv = _randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=1)
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(2)) * 50
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    slots = torch.tensor([3, 40, 17, 63, 0], device=DEVICE)

    results = []
    for run in (rotary_and_cache_ref, rotary_and_cache_triton):
        # q/k/v as strided views of one packed projection, as the model produces them.
        packed = qkv.clone()
        q, k, v = packed.split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], -1)
        k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE)
        v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE)
        kv_heads = (tokens, num_kv_heads, head_dim)
        run(
            q.view(tokens, num_heads, head_dim), k.view(kv_heads), v.view(kv_heads), cos, sin,
            k_cache, v_cache, slots,
        )  # fmt: skip
        results.append((packed, k_cache, v_cache))
    (packed_ref, kc_ref, vc_ref), (packed_out, kc_out, vc_out) = results
    torch.testing.assert_close(packed_out, packed_ref, **close(dtype))  # q, k rotated; v as is
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    flat = (-1, num_kv_heads, head_dim)
    for out, ref in ((kc_out, kc_ref), (vc_out, vc_ref)):
        torch.testing.assert_close(out.view(flat)[written], ref.view(flat)[written], **close(dtype))
        assert out.view(flat)[~written].isnan().all()  # nothing but the slots was touched


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_policy", [8, 4])
def test_rotary_and_cache_quantized_matches_reference(
    dtype: torch.dtype, quant_policy: int
) -> None:
    """The int8 / int4 cache write: scales (and zero points) as the reference's, every stored
    key within half a step of the rotated key (its rotation rounds differently from the
    reference's in half types), and values, which are not rotated, on the reference's grid points
    but at rounding ties."""
    tokens, num_heads, num_kv_heads, head_dim, block_size = 6, 4, 3, 32, 8
    qkv = _randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=4) * 3
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(5)) * 50
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    slots = torch.tensor([3, 39, 17, 31, 0, 8], device=DEVICE)
    results = []
    for run in (rotary_and_cache_ref, rotary_and_cache_triton):
        packed = qkv.clone()
        q, k, v = packed.split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], -1)
        k_cache, v_cache, *scales = new_kv_cache(
            5, block_size, num_kv_heads, head_dim, dtype, DEVICE, quant_policy, fill=float("nan")
        )
        kv_heads = (tokens, num_kv_heads, head_dim)
        run(
            q.view(tokens, num_heads, head_dim), k.view(kv_heads), v.view(kv_heads), cos, sin,
            k_cache, v_cache, slots, (scales[0], scales[1]),
        )  # fmt: skip
        results.append((packed, k_cache, v_cache, *scales))
    (packed_ref, *cache_ref), (packed_out, *cache_out) = results
    torch.testing.assert_close(packed_out, packed_ref, **close(dtype))
    written = torch.zeros(5 * block_size, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    _, vc_ref, ks_ref, vs_ref = cache_ref
    kc_out, vc_out, ks_out, vs_out = cache_out
    per_slot = (-1, num_kv_heads, *ks_out.shape[3:])  # int4: (scale, zero point) per head
    for out, ref in ((ks_out, ks_ref), (vs_out, vs_ref)):
        flat = out.reshape(per_slot)
        torch.testing.assert_close(flat[written], ref.reshape(per_slot)[written], **close(dtype))
        assert flat[~written].isnan().all()  # no other slot's scale was touched
    k_rotated = packed_out[:, num_heads * head_dim :][:, : num_kv_heads * head_dim].float()
    width = kc_out.shape[-1]
    stored_scales = ks_out.reshape(per_slot)[slots]
    k_stored = dequantize_kv(kc_out.view(-1, num_kv_heads, width)[slots], stored_scales)
    half_step = (stored_scales[..., :1] if quant_policy == 4 else stored_scales[..., None]) / 2
    error = (k_stored - k_rotated.view(tokens, num_kv_heads, head_dim)).abs()
    assert (error <= half_step * 1.001 + 1e-6).all()
    assert kc_out.view(-1, num_kv_heads, width)[~written].eq(0).all()
    # Values are not rotated: each is on the reference's grid point, but for one step where the
    # reference's position is a rounding tie (a GPU's fused multiply-add rounds once, torch twice).
    v = packed_out[:, -num_kv_heads * head_dim :].double().view(tokens, num_kv_heads, head_dim)
    v_scales = vs_ref.reshape(per_slot)[slots].double()
    if quant_policy == 4:
        position = (v - v_scales[..., 1:]) / v_scales[..., :1]
    else:
        position = v / v_scales[..., None]
    tie = (position - position.floor() - 0.5).abs() < 1e-3
    rows = (-1, num_kv_heads, width)
    got, want = (_grid(cache.reshape(rows)[slots]) for cache in (vc_out, vc_ref))
    assert ((got == want) | (tie & (got - want).abs().eq(1))).all()
    assert vc_out.reshape(rows)[~written].eq(0).all()


def _grid(values: torch.Tensor) -> torch.Tensor:
    """Quantized rows as grid points in dimension order: int8 as is, int4 unpacked."""
    if values.dtype == torch.uint8:
        return torch.cat((values & 15, values >> 4), -1).int()
    return values.int()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [64, 96])
def test_rms_norm_matches_reference(dtype: torch.dtype, size: int) -> None:
    x = _randn(7, size, dtype=dtype, seed=3) * 3
    weight = _randn(size, dtype=dtype, seed=4)
    out = rms_norm_triton(x, weight, 1e-6, out=nan_like(x))
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), **close(dtype))


@needs_triton
def test_rms_norm_of_strided_heads() -> None:
    """Qwen3 normalises q per head: `[T, H, hd]` views of the packed projection."""
    packed = _randn(5, 3 * 64, dtype=torch.float32, seed=5)
    q = packed[:, :128].view(5, 2, 64)
    weight = _randn(64, dtype=torch.float32, seed=6)
    out = rms_norm_triton(q, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(q, weight, 1e-6), **close(torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    x = _randn(6, 80, dtype=dtype, seed=7)
    residual = _randn(6, 80, dtype=dtype, seed=8) * 4
    weight = _randn(80, dtype=dtype, seed=9)
    out, new_residual = fused_add_rms_norm_triton(
        x, residual, weight, 1e-5, out=nan_like(x), residual_out=nan_like(x)
    )
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(new_residual, ref_residual, **close(dtype))
    torch.testing.assert_close(out, ref_out, **close(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [48, 1500])  # one partial block; two blocks per row
def test_silu_and_mul_matches_reference(dtype: torch.dtype, size: int) -> None:
    x = _randn(3, 2 * size, dtype=dtype, seed=10) * 3
    out = silu_and_mul_triton(x, out=nan_like(x[:, :size]).contiguous())
    torch.testing.assert_close(out, silu_and_mul_ref(x), **close(dtype))


def test_dispatch_keeps_cpu_on_the_reference() -> None:
    """CPU tensors must give the reference bit for bit: the model tests compare against HF."""
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    residual = torch.randn(4, 32, dtype=torch.bfloat16)
    weight = torch.randn(32, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
    for got, want in zip(
        fused_add_rms_norm(x, residual, weight, 1e-6),
        fused_add_rms_norm_ref(x, residual, weight, 1e-6),
        strict=True,
    ):
        assert torch.equal(got, want)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
