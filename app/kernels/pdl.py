"""Programmatic dependent launch (Hopper and newer): a kernel's programs start while the kernel
before it drains and wait (`gdc_wait`) only before they touch memory that kernel may write.

Every kernel launched with `launch_options` must call `gdc_wait` in every program before its
first such load or store (a program that skipped it could let the next kernel run ahead of the
one before). `SPLITFUSE_PDL=0` launches them the ordinary way.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _supported(index: int) -> bool:
    if os.environ.get("SPLITFUSE_PDL", "1").lower() in ("0", "false", "off"):
        return False
    gdc = getattr(tl.extra.cuda, "gdc_wait", None)
    return gdc is not None and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependents (CUDA, compute 9.0+)."""
    if device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict[str, object]:
    """The `PDL` constexpr and launch option for a kernel that takes them, on `device`."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device) else {"PDL": False}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its writes are visible, then let the next
    kernel's programs launch; nothing without `PDL`."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
