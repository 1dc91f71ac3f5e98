"""The decode-step ops under CUDA graphs (GPU only): no host synchronisation while they run, and a
captured decode attention replays correctly after its inputs change in place."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paged_batch import PagedBatch, close, paged_batch

from app.kernels import (
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rotary_and_cache,
    silu_and_mul,
)
from app.kernels.attention import paged_attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

DECODES = [(40, 1), (300, 1), (1000, 1), (7, 1)]


def _batch() -> PagedBatch:
    return paged_batch(
        DECODES, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16
    )


def test_decode_step_ops_never_sync_with_the_host() -> None:
    b = _batch()
    tokens, hidden = b.q.shape[0], 256
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(tokens, 64, device="cuda")
    k = torch.randn(tokens, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rms_norm(x, weight, 1e-5)
        fused_add_rms_norm(x, x, weight, 1e-5)
        silu_and_mul(x)
        rotary_and_cache(
            b.q, k, v, angles.cos(), angles.sin(), b.k_cache, b.v_cache, b.meta.slot_mapping
        )
        paged_attention(b.q, b.k_cache, b.v_cache, b.meta, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_captured_decode_attention_follows_its_inputs() -> None:
    b = _batch()
    scale = 128**-0.5
    paged_attention(b.q, b.k_cache, b.v_cache, b.meta, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(b.q, b.k_cache, b.v_cache, b.meta, scale)

    # New queries and shorter contexts, written into the captured tensors.
    b.q.copy_(torch.randn_like(b.q))
    shorter = [max(1, n // 3) for n, _ in DECODES]
    b.meta.seq_lens.copy_(torch.tensor(shorter, dtype=torch.int32))
    graph.replay()
    meta = dataclasses.replace(b.meta, seq_lens_cpu=shorter, max_seq_len=max(shorter))
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, meta, scale)
    torch.testing.assert_close(out, ref, **close(torch.bfloat16))
