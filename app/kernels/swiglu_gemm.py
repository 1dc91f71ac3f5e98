"""SwiGLU's gate|up projection and activation in one Triton GEMM: each program multiplies a row
tile by the matching gate and up weight columns and writes `silu(gate) * up`, so the packed
`[T, 2I]` product never reaches memory. Not yet used by the models: `bench/kernels.py --only
gemm-swiglu` times it against cuBLAS followed by `silu_and_mul`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from app.kernels.activation import silu_and_mul_ref
from app.kernels.paged_tile import dot_precision


def gemm_swiglu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch reference: `silu_and_mul(x W^T)` for `W` `[2I, K]` packed as gate | up."""
    return silu_and_mul_ref(F.linear(x, weight))


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in grouped order: GROUP_M row tiles in a row take
    each column tile's weights while they are still in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + pid % per_group % group_rows, pid % per_group // group_rows


@triton.jit
def _store_swiglu(acc_gate, acc_up, out_ptr, rows, cols, M, N, stride_om):
    # Rounded as the unfused path rounds: both products to the output dtype, then silu.
    dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    out = act * acc_up.to(dtype).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _gemm_swiglu_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    # Weight tiles read as [BLOCK_K, BLOCK_N] views of row-major [2N, K]: up rows follow gate's.
    gate_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    up_ptrs = w_ptr + (cols[None, :] + N).to(tl.int64) * stride_wn + ks[:, None]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w_gate = tl.load(gate_ptrs, mask=col_ok[None, :], other=0.0)
            w_up = tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            w_up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    _store_swiglu(acc_gate, acc_up, out_ptr, rows, cols, M, N, stride_om)


@triton.jit
def _gemm_swiglu_tma_kernel(
    x_desc, w_desc, out_ptr, M, N, K, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # The same product with tiles brought in by the tensor-memory accelerator (Hopper), which
    # fills reads past the edges with zeros. A last gate tile that runs past N reads up rows
    # into columns that are never stored.
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([m0, k0])
        acc_gate = tl.dot(x, w_desc.load([n0, k0]).T, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_desc.load([N + n0, k0]).T, acc_up, input_precision=DOT_PRECISION)
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    _store_swiglu(acc_gate, acc_up, out_ptr, rows, cols, M, N, stride_om)


def gemm_swiglu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    tiles: tuple[int, int, int, int, int] | None = None,
    tma: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`silu(x Wg^T) * (x Wu^T)` `[M, N]` for `x` `[M, K]` and the packed row-major `W` `[2N,
    K]` (gate rows, then up rows); `tiles` is (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), by
    default a setting not yet tuned on a GPU. `tma` loads tiles through tensor descriptors
    (rows of a multiple of 16 bytes)."""
    m, k = x.shape
    two_n, k_w = weight.shape
    if k_w != k or two_n % 2:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not pack gate|up for x {tuple(x.shape)}"
        )
    n = two_n // 2
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = tiles or (128, 64, 64, 8, 3)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    launch = {"num_warps": warps, "num_stages": stages}
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    precision = dot_precision(x.dtype)
    if not tma:
        _gemm_swiglu_kernel[grid](
            x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), **blocks,
            EVEN_K=k % block_k == 0, DOT_PRECISION=precision, **launch,
        )  # fmt: skip
        return out
    if any(t.stride(0) * t.element_size() % 16 for t in (x, weight)):
        raise ValueError("tensor descriptors need rows of a multiple of 16 bytes")
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    _gemm_swiglu_tma_kernel[grid](
        x_desc, w_desc, out, m, n, k, out.stride(0), **blocks, DOT_PRECISION=precision, **launch
    )
    return out
