"""RMSNorm, alone and fused with the residual add that precedes it in a pre-norm decoder.

Both normalise over the last dimension in float32 and round to the input dtype before the
weight multiply, as the HF reference implementations do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from app.kernels.pdl import launch_options, wait_for_previous


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / rms(x)` over the last dimension; Triton on CUDA, the reference elsewhere."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`: the normed sum and the new residual stream."""
    if x.is_cuda:
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of `rms_norm`."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `fused_add_rms_norm`."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n,
    eps,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    wait_for_previous(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
        # Rounded to the stream's dtype before normalising, like the unfused `x + residual`.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=ok)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / n + eps)
    out = w * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton `rms_norm`, optionally into a given contiguous `out`."""
    if out is None:
        dtype = torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _launch(x, x, weight, eps, out, out, add_residual=False)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `fused_add_rms_norm`, optionally into given contiguous outputs."""
    if out is None:
        dtype = torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out, add_residual=True)
    return out, residual_out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`[rows, n]` with unit column stride (copying a view that has none, e.g. q of packed qkv)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor,
    *,
    add_residual: bool,
) -> None:
    """One program per row; without `add_residual` the residual arguments are never read."""
    n = x.shape[-1]
    rows = _rows(x)
    res = _rows(residual) if add_residual else rows
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res, weight, out, residual_out,
        rows.stride(0), res.stride(0), n, n, n, eps,
        BLOCK=block,
        ADD_RESIDUAL=add_residual,
        num_warps=min(16, max(1, block // 512)),
        **launch_options(x.device),
    )  # fmt: skip
