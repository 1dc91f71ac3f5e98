"""Programmatic dependent launch (Hopper and later): a kernel launched with it is scheduled while
the kernel before it drains, and waits inside (`pdl_wait`, before touching any memory) until that
kernel's writes are visible. This hides the launch gap between the small kernels of a decode step.

Kernels take a `PDL` constexpr and call `pdl_wait(PDL)` first and `pdl_release(PDL)` once their
main loop is done; their launchers pass `PDL=pdl` and `launch_pdl=pdl` with `pdl = use_pdl(t)`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None

ENV = "SPLITFUSE_PDL"  # "0" turns it off


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether kernels on this tensor's device launch with PDL."""
    return tensor.is_cuda and _enabled(tensor.device.index or 0)


@functools.cache
def _enabled(index: int) -> bool:
    if gdc_wait is None or os.environ.get(ENV, "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel's writes are visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel be scheduled (it still waits for this one to finish)."""
    if PDL:
        gdc_launch_dependents()
