"""SwiGLU's activation: `silu(gate) * up` over the packed gate|up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from app.kernels.pdl import launch_options, wait_for_previous

BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`[T, 2I]` laid out as gate | up (each half contiguous) -> `silu(gate) * up` `[T, I]`;
    Triton on CUDA, the reference elsewhere."""
    if x.is_cuda:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, size, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    # Rounded to x's dtype between silu and the product, as the unfused reference is.
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul_triton(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `silu_and_mul` over a 2-D input, optionally into a given contiguous `out`."""
    num_tokens, size = x.shape[0], x.shape[1] // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(num_tokens, size, dtype=x.dtype, device=x.device)
    grid = (num_tokens, triton.cdiv(size, BLOCK))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), out.stride(0), size,
        BLOCK=BLOCK, num_warps=4, **launch_options(x.device),
    )  # fmt: skip
    return out
