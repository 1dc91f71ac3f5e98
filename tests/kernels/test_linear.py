"""The one-row Triton GEMV against `F.linear` (with and without bias, ragged N and K)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged_batch import DEVICE, close, needs_triton

from app.kernels.linear import gemv_triton, linear


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# Ragged rows and columns: part of one column tile, many programs, several tiles and a part.
@pytest.mark.parametrize(
    "shape", [(37, 1500), (5000, 96), (20, 8300)], ids=["ragged", "wide", "long"]
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_gemv_matches_linear(dtype: torch.dtype, shape: tuple[int, int], with_bias: bool) -> None:
    n, k = shape
    x = _randn(1, k, dtype=dtype, seed=1)
    w = _randn(n, k, dtype=dtype, seed=2) / k**0.5
    bias = _randn(n, dtype=dtype, seed=3) if with_bias else None
    got = gemv_triton(x, w, bias)
    want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert got.dtype == dtype and got.shape == (1, n)
    torch.testing.assert_close(got.float(), want, **close(dtype))


@needs_triton
def test_gemv_reads_a_strided_row() -> None:
    # A row of a wider buffer (as the model's views are) gives the same result as a copy.
    x = _randn(3, 200, dtype=torch.float32, seed=4)[1:2, :100]
    w = _randn(24, 100, dtype=torch.float32, seed=5)
    torch.testing.assert_close(gemv_triton(x, w), F.linear(x, w), **close(torch.float32))


def test_linear_leaves_batches_and_cpu_rows_to_torch() -> None:
    w = torch.randn(8, 16)
    for rows in (1, 5):
        x = torch.randn(rows, 16)
        assert torch.equal(linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match=r"shape \(1, 16\)"):
        gemv_triton(torch.randn(2, 16), w)
