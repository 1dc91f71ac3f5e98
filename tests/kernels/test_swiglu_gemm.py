"""The gate|up GEMM with its SwiGLU epilogue against `silu_and_mul(F.linear(x, W))`, with
pointer loads and with tensor descriptors: row, column and K tails, tile settings, strided
inputs."""

from __future__ import annotations

import pytest
import torch
from paged_batch import DEVICE, HALF_DTYPES, close, nan_like, needs_triton

from app.kernels.swiglu_gemm import gemm_swiglu_ref, gemm_swiglu_triton

pytestmark = needs_triton


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _check(
    m: int, n: int, k: int, dtype: torch.dtype, tiles: tuple[int, ...], tma: bool = False
) -> None:
    x = _randn(m, k, dtype=dtype, seed=1)
    w = _randn(2 * n, k, dtype=dtype, seed=2) / k**0.5
    out = nan_like(torch.empty(m, n, dtype=dtype, device=DEVICE))
    got = gemm_swiglu_triton(x, w, tiles=tiles, tma=tma, out=out)
    want = gemm_swiglu_ref(x.float(), w.float())
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    torch.testing.assert_close(got.float(), want, **close(dtype))


# (M, N, K): whole tiles; ragged rows and columns (a last gate tile running into up's rows);
# K not a multiple of BLOCK_K; one row. Rows of a multiple of 16 bytes, as descriptors need.
SHAPES = [(32, 32, 64), (37, 45, 64), (20, 16, 104), (1, 40, 48)]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("shape", SHAPES, ids=["whole", "ragged", "ragged-k", "one-row"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_gemm_swiglu_matches_reference(
    shape: tuple[int, int, int], dtype: torch.dtype, tma: bool
) -> None:
    _check(*shape, dtype, (16, 16, 16, 4, 1), tma)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("tiles", [(32, 16, 32, 4, 2), (16, 32, 16, 2, 1)])
def test_gemm_swiglu_tile_settings(tiles: tuple[int, ...], tma: bool) -> None:
    # More row tiles than GROUP_M (8) with a short last group exercises the launch order.
    _check(300, 48, 64, torch.float32, tiles, tma)


def test_gemm_swiglu_strided_input_and_bad_weight() -> None:
    x = _randn(10, 128, dtype=torch.float32, seed=3)[:, :64]
    w = _randn(64, 64, dtype=torch.float32, seed=4)
    torch.testing.assert_close(
        gemm_swiglu_triton(x, w, tiles=(16, 16, 16, 4, 1)), gemm_swiglu_ref(x, w),
        **close(torch.float32),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"does not pack gate\|up"):
        gemm_swiglu_triton(x, w[:, :32])
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        gemm_swiglu_triton(x[:, :10].contiguous(), w[:, :10].contiguous(), tma=True)
