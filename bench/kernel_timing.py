"""Checking and timing for `bench/kernels.py`: a kernel's outputs against its reference, median
times (CUDA graphs for short kernels), the result rows and sweep summaries."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.testing

from bench.kernel_cases import Shapes

TOLERANCE = 1e-2  # relative L2 error; bf16 rounding alone gives a few 1e-3
Outputs = Callable[[], list[torch.Tensor]]  # one call of a kernel or reference: its outputs


@dataclass
class Row:
    kernel: str
    case: str
    ms: float
    ref_ms: float
    work: float  # bytes moved or FLOPs per call
    unit: str  # "GB/s" or "TFLOP/s"
    rel_err: float
    ok: bool

    @property
    def rate(self) -> float:
        return self.work / self.ms / (1e6 if self.unit == "GB/s" else 1e9)

    def line(self) -> str:
        return (
            f"{self.kernel:<16} {self.case:<28} {self.ms:>9.4f} {self.rate:>9.1f} {self.unit:<7} "
            f"{self.ref_ms:>9.4f} {self.ref_ms / self.ms:>7.1f}x {self.rel_err:>9.2e} "
            f"{'ok' if self.ok else 'FAIL'}"
        )


HEADER = (
    f"{'kernel':<16} {'case':<28} {'ms':>9} {'rate':>9} {'':<7} {'torch ms':>9} {'speedup':>8} "
    f"{'rel err':>9} check"
)


def bench_time(fn: Callable[[], object]) -> float:
    """Median milliseconds per call: do_bench on a GPU, a few wall-clock runs elsewhere."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def graph_time(fn: Callable[[], object]) -> float:
    """Like bench_time, but replayed from a CUDA graph on a GPU: for kernels of a few
    microseconds, whose launch from Python would otherwise be timed too."""
    if torch.cuda.is_available():
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return bench_time(fn)


def compiled_resources(fn: triton.JITFunction) -> set[str]:
    """Registers and shared memory of each variant `fn` has compiled on the GPU: what decides
    how many of its programs an SM holds at once."""
    found = set()
    for cache in getattr(fn, "device_caches", {}).values():
        for kernel in cache[0].values():
            regs, shared = getattr(kernel, "n_regs", None), kernel.metadata.shared
            warps = kernel.metadata.num_warps
            found.add(f"compiled: {warps} warps, {regs} registers/thread, {shared} B shared")
    return found


def timed_setting(timed: list[tuple[float, tuple]], ms: float, setting: tuple) -> None:
    """Keep one sweep timing, and print it at once: a call cut short still shows what it
    timed (the summary comes at the end)."""
    timed.append((ms, setting))
    print(f"  timed {setting}: {ms * 1e3:.1f} us", flush=True)


def kv_label(quant_policy: int) -> str:
    """A case name's suffix for a quantized KV cache."""
    return f" int{quant_policy} KV" if quant_policy else ""


def compare(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, bool]:
    """Relative L2 error over all outputs together, and whether it passes (NaN fails)."""
    pairs = zip(outs, refs, strict=True)
    err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in pairs)
    norm = sum(float(r.double().pow(2).sum()) for r in refs)
    rel = math.sqrt(err / norm)
    return rel, not any(bool(o.isnan().any()) for o in outs) and rel < TOLERANCE


class KernelBench:
    """Random inputs on one device, and the rows of the cases checked and timed so far."""

    def __init__(self, shapes: Shapes, dtype: torch.dtype, device: str) -> None:
        self.s, self.dtype, self.device = shapes, dtype, device
        self.rows: list[Row] = []
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.host_gen = torch.Generator().manual_seed(0)  # block-table shuffles

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device).to(self.dtype)

    def nan(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype or self.dtype, device=self.device)

    def record(
        self, kernel: str, case: str, run: Outputs, ref: Outputs, work: float, unit: str
    ) -> None:
        """Check the first call of `run` against `ref`, then time both."""
        rel, ok = compare(run(), ref())
        row = Row(kernel, case, bench_time(run), bench_time(ref), work, unit, rel, ok)
        self.rows.append(row)
        print(row.line(), flush=True)

    @staticmethod
    def print_sweep(
        title: str, rule: str, chosen: tuple, timed: list[tuple[float, tuple]], work: float,
        top: int = 5, unit: str = "GB/s",
    ) -> None:  # fmt: skip
        """The rule's current setting and the `top` fastest, with their rate of `work` (bytes
        for GB/s, operations for TFLOP/s)."""
        per_ms = {"GB/s": 1e6, "TFLOP/s": 1e9}[unit]
        timed.sort()
        now = next((t for t, setting in timed if setting == chosen), float("nan"))
        print(f"{title}: {rule} {chosen} {now * 1e3:.1f} us; best:", flush=True)
        for t, setting in timed[:top]:
            print(f"  {t * 1e3:8.1f} us {work / t / per_ms:7.0f} {unit}  {setting}", flush=True)
