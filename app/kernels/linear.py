"""Linear layers' `y = x W^T + b`: cuBLAS, except a single-row input (batch-1 decode) on CUDA,
which a Triton GEMV streams through in one launch (cuBLAS adds split-K reduction launches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from app.kernels.pdl import launch_options, wait_for_previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for `[M, K] x [N, K]`; one-row CUDA inputs go through `gemv_triton`."""
    if x.is_cuda and x.shape[0] == 1:
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


# (rows per program, columns per load, warps, stages) for every weight: on two H100s, within
# 0.5 us of each Llama-3.1-8B shape's best of `bench/kernels.py --only gemv-sweep` (batch-1 decode
# 0.05-0.16 ms faster than the per-shape settings an H200's sweep had picked).
GEMV_TILES = (4, 2048, 8, 1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Each program owns BLOCK_N output features and reads their weight rows end to end.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    # The weights never change: the first tile is read while the kernel that writes x drains.
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    wait_for_previous(PDL)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`x W^T + b` for a one-row `x` `[1, K]` and a row-major `W` `[N, K]`, float32 accumulation;
    `tiles` overrides `GEMV_TILES`."""
    n, k = weight.shape
    if x.shape != (1, k):
        raise ValueError(f"gemv_triton takes x of shape (1, {k}), got {tuple(x.shape)}")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = tiles or GEMV_TILES
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else y, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages, **launch_options(x.device),
    )  # fmt: skip
    return y
