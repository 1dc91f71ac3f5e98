"""Every model family against transformers logits on tiny random checkpoints, through the paged
KV cache: whole prefill, token-by-token decode, chunked prefill and a mixed two-sequence batch."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from paged_cache import PagedCache
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from app.engine.loader import load_hf_config, load_model, resolve_model_dir
from app.engine.models.layers import RotaryEmbedding, rope_config
from app.engine.models.registry import (
    SUPPORTED_ARCHITECTURES,
    get_model_class,
    kv_cache_spec,
)

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}
ATOL = RTOL = 1e-4


@dataclass
class Family:
    """Our loaded model next to the transformers model holding the same weights."""

    ours: nn.Module
    reference: nn.Module
    config: PretrainedConfig


def _hf_model(config: PretrainedConfig) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # The default init (std 0.02) makes attention nearly uniform; larger weights make every
    # path (rotary, masks, biases) visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.1)
    return model.eval()


def _hf_checkpoint(config: PretrainedConfig, path: Path) -> nn.Module:
    model = _hf_model(config)
    model.save_pretrained(path)
    return model


def _internlm2_checkpoint(path: Path) -> nn.Module:
    """Rewrite a Llama checkpoint in InternLM2's names and grouped wqkv packing."""
    model = _hf_model(LlamaConfig(**TINY, attention_bias=True))
    heads, kv_heads = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    head_dim, group = TINY["hidden_size"] // heads, heads // kv_heads
    renames = [
        ("model.embed_tokens", "model.tok_embeddings"),
        ("lm_head", "output"),
        ("self_attn.o_proj", "attention.wo"),
        ("input_layernorm", "attention_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "feed_forward.w1"),
        ("mlp.up_proj", "feed_forward.w3"),
        ("mlp.down_proj", "feed_forward.w2"),
    ]
    state = model.state_dict()
    out = {}
    for name, tensor in state.items():
        if ".k_proj." in name or ".v_proj." in name:
            continue
        if ".q_proj." in name:
            rest = tensor.shape[1:]
            q = tensor.reshape(kv_heads, group, head_dim, *rest)
            k = state[name.replace("q_proj", "k_proj")].reshape(kv_heads, 1, head_dim, *rest)
            v = state[name.replace("q_proj", "v_proj")].reshape(kv_heads, 1, head_dim, *rest)
            out[name.replace("self_attn.q_proj", "attention.wqkv")] = (
                torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()
            )
            continue
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor.contiguous()
    save_file(out, str(path / "model.safetensors"))
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        **TINY,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "bias": True,
        "rope_theta": 10000.0,
        # Dynamic NTK leaves positions below max_position_embeddings untouched.
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return model


CASES: dict[str, Callable[[Path], nn.Module]] = {
    "llama": lambda p: _hf_checkpoint(LlamaConfig(**TINY, rms_norm_eps=1e-5), p),
    "llama3-rope": lambda p: _hf_checkpoint(LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE), p),
    "llama-tied-linear-rope": lambda p: _hf_checkpoint(
        LlamaConfig(
            **TINY,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        p,
    ),
    "mistral-sliding": lambda p: _hf_checkpoint(MistralConfig(**TINY, sliding_window=4), p),
    "qwen2": lambda p: _hf_checkpoint(Qwen2Config(**TINY), p),
    "qwen2-sliding-layer": lambda p: _hf_checkpoint(
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=1), p
    ),
    "qwen3": lambda p: _hf_checkpoint(Qwen3Config(**TINY, head_dim=32), p),
    "internlm2": _internlm2_checkpoint,
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    path = tmp_path_factory.mktemp(request.param)
    reference = CASES[request.param](path)
    model_dir = resolve_model_dir(path)
    config = load_hf_config(model_dir)
    ours = load_model(model_dir, config, torch.float32, torch.device("cpu"))
    return Family(ours, reference, config)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(
        0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


@torch.inference_mode()
def _reference_logits(family: Family, ids: list[int]) -> torch.Tensor:
    return family.reference(input_ids=torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def _step(
    family: Family, cache: PagedCache, chunks: list[tuple[int, list[int]]]
) -> list[torch.Tensor]:
    """Run one engine step and split its logits back per chunk."""
    input_ids, positions, meta = cache.step(chunks)
    hidden = family.ours(input_ids, positions, cache.kv_caches, meta)
    logits = family.ours.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return list(logits.split(meta.query_lens_cpu))


def _cache(family: Family) -> PagedCache:
    return PagedCache(kv_cache_spec(family.config), num_blocks=32, block_size=4)


def test_prefill(family: Family) -> None:
    ids = _tokens(10, seed=1)
    (logits,) = _step(family, _cache(family), [(0, ids)])
    torch.testing.assert_close(logits, _reference_logits(family, ids), atol=ATOL, rtol=RTOL)


def test_decode_one_token_at_a_time(family: Family) -> None:
    ids = _tokens(11, seed=2)
    expected = _reference_logits(family, ids)
    cache = _cache(family)
    _step(family, cache, [(0, ids[:5])])
    for pos in range(5, len(ids)):
        (logits,) = _step(family, cache, [(0, [ids[pos]])])
        torch.testing.assert_close(logits[0], expected[pos], atol=ATOL, rtol=RTOL)


def test_chunked_prefill(family: Family) -> None:
    ids = _tokens(10, seed=3)
    cache = _cache(family)
    (first,) = _step(family, cache, [(0, ids[:4])])
    (second,) = _step(family, cache, [(0, ids[4:])])
    torch.testing.assert_close(
        torch.cat([first, second]), _reference_logits(family, ids), atol=ATOL, rtol=RTOL
    )


def test_mixed_batch_of_two_sequences(family: Family) -> None:
    a, b = _tokens(11, seed=4), _tokens(7, seed=5)
    cache = _cache(family)
    a_prefill, b_chunk = _step(family, cache, [(0, a[:10]), (1, b[:3])])
    b_rest, a_decode = _step(family, cache, [(1, b[3:]), (0, a[10:])])
    expected_a, expected_b = _reference_logits(family, a), _reference_logits(family, b)
    torch.testing.assert_close(torch.cat([a_prefill, a_decode]), expected_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([b_chunk, b_rest]), expected_b, atol=ATOL, rtol=RTOL)


def test_unsupported_architecture_names_supported_ones() -> None:
    config = PretrainedConfig(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class(config)
    assert "InternLM2ForCausalLM" in SUPPORTED_ARCHITECTURES


def test_kv_cache_spec_honours_explicit_head_dim() -> None:
    config = Qwen3Config(**TINY, head_dim=32, architectures=["Qwen3ForCausalLM"])
    spec = kv_cache_spec(config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 32)


def test_rope_config_reads_legacy_and_v5_shapes() -> None:
    legacy = SimpleNamespace(
        rope_theta=1e6, max_position_embeddings=32, rope_scaling={"type": "linear", "factor": 4.0}
    )
    v5 = LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)
    assert rope_config(legacy).rope_type == "linear" and rope_config(legacy).theta == 1e6
    assert rope_config(v5).rope_type == "llama3" and rope_config(v5).factor == 8.0
    with pytest.raises(ValueError, match="yarn"):
        rope_config(SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))


def test_dynamic_rope_past_max_position_matches_hf_decode() -> None:
    # HF rescales the base from the longest position in the call; for a decode step that is the
    # token's own position, which is what the per-token table reproduces.
    config = LlamaConfig(
        **{**TINY, "max_position_embeddings": 16},
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    hf = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(16, rope_config(config), torch.device("cpu"))
    for pos in (3, 40):
        cos, sin = hf(torch.zeros(1, 1, 16), torch.tensor([[pos]]))
        our_cos, our_sin = ours(torch.tensor([pos]))
        torch.testing.assert_close(our_cos, cos[0, :, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(our_sin, sin[0, :, :8], atol=1e-5, rtol=1e-5)
