"""The decode step's kernels compile for a Hopper GPU (sm_90) here, on the CPU, in every cache
variant and as programmatic dependents (PDL), through this machine's Triton: the interpreter only
runs their Python, and accepts code that no compiler takes. The compiling runs in a child process
without TRITON_INTERPRET, under which `triton.jit` would hand back interpreted functions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = {0: "*bf16", 8: "*i8", 4: "*u8"}  # quant_policy -> the cache's element type
POINTERS = {
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
}  # any other pointer: bf16 (q, k, v, out)


def _variants() -> list[tuple[str, int, dict]]:
    """(kernel, quant_policy, constexprs) for every variant the engine launches on an 8B shape."""
    decode = {
        "NUM_HEADS": 32, "GROUP": 4, "BLOCK_H": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 64,
        "BLOCK_N": 128, "DOT_PRECISION": "tf32", "ORDERED": True,
    }  # fmt: skip
    prefill = {
        "GROUP": 4, "GROUP_PAD": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 64, "DOT_PRECISION": "tf32",
    }  # fmt: skip
    rotary = {
        "NUM_HEADS": 32, "NUM_KV_HEADS": 8, "HEADS_PAD": 32, "KV_HEADS_PAD": 8, "HALF": 64,
        "BLOCK_SIZE": 64,
    }  # fmt: skip
    pdl = {"PDL": True}
    variants = [
        ("_decode_reduce_kernel", 0, {"NUM_HEADS": 32, "HEAD_DIM": 128, "SPLITS_PAD": 8} | pdl),
        ("_gemv_kernel", 0, {"HAS_BIAS": False, "BLOCK_N": 8, "BLOCK_K": 1024} | pdl),
        ("_gemv_kernel", 0, {"HAS_BIAS": True, "BLOCK_N": 16, "BLOCK_K": 512, "PDL": False}),
        ("_rms_norm_kernel", 0, {"BLOCK": 4096, "ADD_RESIDUAL": True} | pdl),
        ("_silu_and_mul_kernel", 0, {"BLOCK": 1024} | pdl),
    ]
    for quant in CACHE:
        for single in (True, False):  # and aligned tiles with one split, unaligned (a window)
            split = decode | {"SINGLE_SPLIT": single, "QUANT": quant, "ALIGNED": single} | pdl
            variants.append(("_decode_split_kernel", quant, split))
        tiles = {"BLOCK_Q": 32, "BLOCK_N": 32} if quant else {"BLOCK_Q": 64, "BLOCK_N": 64}
        variants.append(
            ("_prefill_kernel", quant, prefill | tiles | {"QUANT": quant, "ALIGNED": True})
        )
        variants.append(("_rotary_cache_kernel", quant, rotary | {"QUANT": quant} | pdl))
    return variants


def compile_all() -> None:
    """Compile every variant to a cubin (run without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from app.kernels import activation, decode_attention, linear, norm, prefill_attention, rotary

    modules = (activation, decode_attention, linear, norm, prefill_attention, rotary)
    for name, quant, constants in _variants():
        fn = next(getattr(m, name) for m in modules if hasattr(m, name))
        pointers = POINTERS | {"k_cache_ptr": CACHE[quant], "v_cache_ptr": CACHE[quant]}
        signature = {
            arg: "constexpr"
            if arg in constants
            else pointers.get(arg, "*bf16")
            if arg.endswith("_ptr")
            else "fp32"
            if arg in ("scale_log2", "eps")
            else "i32"
            for arg in fn.arg_names
        }
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name
        # A programmatic dependent waits for the kernel before it; an ordinary launch needs no wait.
        waits = "griddepcontrol.wait" in compiled.asm["ptx"]
        assert waits == constants.get("PDL", False), f"{name}: griddepcontrol.wait {waits}"
        print(f"compiled {name} quant_policy={quant}", flush=True)


@pytest.mark.timeout(300)
def test_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == len(_variants())


if __name__ == "__main__":
    compile_all()
