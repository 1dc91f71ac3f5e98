"""Where a benchmark's GPU time goes: torch.profiler over a run, kernels summed by kind (GEMMs,
each attention kernel, norms, ...) next to the run's wall time.

    with KernelProfile() as prof:
        run()
    prof.report(wall_seconds)
"""

from __future__ import annotations

import torch

# First match wins: (kind, substrings of the lower-cased kernel name).
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("decode attention", ("_decode_split", "_decode_reduce")),
    ("prefill attention", ("_prefill_kernel",)),
    ("gemv (batch 1)", ("_gemv",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("rope + kv write", ("rotary", "write_kv")),
    ("rmsnorm", ("rms_norm",)),
    ("silu", ("silu",)),
    ("sampling", ("sampl", "argmax", "topk", "softmax", "penalt", "bitmask", "sort")),
    ("copies", ("copy", "memcpy", "memset", "fill", "cat", "index", "gather", "scatter")),
]


def kind_of(name: str) -> str:
    """The KINDS entry a kernel name falls under, or "other"."""
    lowered = name.lower()
    for kind, parts in KINDS:
        if any(p in lowered for p in parts):
            return kind
    return "other"


class KernelProfile:
    """torch.profiler recording device kernels only; `report` prints and returns the sums."""

    def __init__(self) -> None:
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])

    def __enter__(self) -> KernelProfile:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)

    def totals(self) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
        """Per kind: device milliseconds and launches; and the ten costliest 'other' kernels."""
        ms: dict[str, float] = {}
        count: dict[str, int] = {}
        other: dict[str, float] = {}
        for event in self._prof.key_averages():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            total = event.self_device_time_total / 1e3
            kind = kind_of(event.key)
            ms[kind] = ms.get(kind, 0.0) + total
            count[kind] = count.get(kind, 0) + event.count
            if kind in ("other", "copies"):
                other[event.key[:90]] = other.get(event.key[:90], 0.0) + total
        top = dict(sorted(other.items(), key=lambda kv: -kv[1])[:10])
        return ms, count, top

    def report(self, wall_seconds: float, steps: int = 1) -> dict:
        """Print the sums against the wall time, and per step where `steps` says how many."""
        ms, count, top = self.totals()
        busy = sum(ms.values())
        wall = wall_seconds * 1e3
        print(f"\nGPU kernels: {busy:.0f} ms busy of {wall:.0f} ms wall ({busy / wall:.1%})")
        per_step = f" {'us/step':>9}" if steps > 1 else ""
        print(f"{'kind':<20} {'ms':>10} {'share':>7} {'launches':>9}{per_step}")
        for kind, value in sorted(ms.items(), key=lambda kv: -kv[1]):
            per_step = f" {value * 1e3 / steps:>9.1f}" if steps > 1 else ""
            print(f"{kind:<20} {value:>10.1f} {value / wall:>7.1%} {count[kind]:>9}{per_step}")
        for name, value in top.items():
            print(f"  {value:>9.1f} ms  {name}")
        return {"wall_ms": wall, "busy_ms": busy, "kinds_ms": ms, "launches": count, "top": top}
