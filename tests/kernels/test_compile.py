"""The attention and cache-write kernels compile for a Hopper GPU (sm_90) here, on the CPU, in
every cache variant, through this machine's Triton: the interpreter only runs their Python, and
accepts code that no compiler takes."""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from app.kernels.decode_attention import _decode_reduce_kernel, _decode_split_kernel
from app.kernels.prefill_attention import _prefill_kernel
from app.kernels.rotary import _rotary_cache_kernel

HOPPER = GPUTarget("cuda", 90, 32)
CACHE = {0: "*bf16", 8: "*i8", 4: "*u8"}  # quant_policy -> the cache's element type
SCALARS = {"scale_log2": "fp32"}  # every other non-pointer argument is an int32


def _signature(fn: triton.JITFunction, pointers: dict[str, str], constants: dict) -> dict:
    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers.get(name, "*bf16")
        return SCALARS.get(name, "i32")

    return {name: kind(name) for name in fn.arg_names}


def _compile(fn: triton.JITFunction, pointers: dict[str, str], constants: dict) -> None:
    source = ASTSource(fn=fn, signature=_signature(fn, pointers, constants), constexprs=constants)
    assert triton.compile(source, target=HOPPER).asm["cubin"]


def _cache_pointers(quant_policy: int) -> dict[str, str]:
    return {
        "k_cache_ptr": CACHE[quant_policy],
        "v_cache_ptr": CACHE[quant_policy],
        "ks_ptr": "*fp32",
        "vs_ptr": "*fp32",
        "block_tables_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "query_start_ptr": "*i32",
        "order_ptr": "*i64",
        "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "cos_ptr": "*fp32",
        "sin_ptr": "*fp32",
        "slot_ptr": "*i64",
    }


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("single_split", [True, False])
def test_decode_kernels_compile(quant_policy: int, single_split: bool) -> None:
    constants = {
        "NUM_HEADS": 32, "GROUP": 4, "BLOCK_H": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 64,
        "BLOCK_N": 128, "SINGLE_SPLIT": single_split, "DOT_PRECISION": "tf32",
        "QUANT": quant_policy, "ORDERED": True,
    }  # fmt: skip
    _compile(_decode_split_kernel, _cache_pointers(quant_policy), constants)
    if not single_split:
        reduce = {"NUM_HEADS": 32, "HEAD_DIM": 128, "SPLITS_PAD": 8}
        _compile(_decode_reduce_kernel, _cache_pointers(quant_policy), reduce)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_prefill_kernel_compiles(quant_policy: int) -> None:
    constants = {
        "GROUP": 4, "GROUP_PAD": 4, "BLOCK_Q": 32, "HEAD_DIM": 128, "BLOCK_SIZE": 64,
        "BLOCK_N": 32, "DOT_PRECISION": "tf32", "QUANT": quant_policy,
    }  # fmt: skip
    _compile(_prefill_kernel, _cache_pointers(quant_policy), constants)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_rotary_cache_write_compiles(quant_policy: int) -> None:
    constants = {
        "NUM_HEADS": 32, "NUM_KV_HEADS": 8, "HEADS_PAD": 32, "KV_HEADS_PAD": 8, "HALF": 64,
        "BLOCK_SIZE": 64, "QUANT": quant_policy,
    }  # fmt: skip
    _compile(_rotary_cache_kernel, _cache_pointers(quant_policy), constants)
