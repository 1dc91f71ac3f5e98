"""Triton kernels behind one signature per op: CUDA tensors run the kernel, any other device
the plain-torch reference (`*_ref`), so CPU results never depend on Triton.

- `paged_attention` (attention.py): decode and split-fuse prefill over the paged KV cache.
- `rotary_and_cache` (rotary.py): RoPE on q/k in place, plus the K/V store into the cache.
- `rms_norm`, `fused_add_rms_norm` (norm.py).
- `silu_and_mul` (activation.py).
"""

from app.kernels.activation import silu_and_mul
from app.kernels.attention import AttentionMetadata, paged_attention
from app.kernels.norm import fused_add_rms_norm, rms_norm
from app.kernels.rotary import rotary_and_cache

__all__ = [
    "AttentionMetadata",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_and_cache",
    "silu_and_mul",
]
