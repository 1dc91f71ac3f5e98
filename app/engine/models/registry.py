"""Which model class serves which HF architecture, and the KV cache shape a config implies."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from app.engine.models.internlm2 import InternLM2ForCausalLM
from app.engine.models.layers import DecoderForCausalLM
from app.engine.models.llama import LlamaForCausalLM
from app.engine.models.mistral import MistralForCausalLM
from app.engine.models.qwen2 import Qwen2ForCausalLM
from app.engine.models.qwen3 import Qwen3ForCausalLM

_MODELS: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer KV cache shape: each layer holds `[blocks, block_size, num_kv_heads, head_dim]`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    """The class for the config's first supported architecture; ValueError when none is."""
    return _decoder_class(hf_config)


def _decoder_class(hf_config: PretrainedConfig) -> type[DecoderForCausalLM]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config)'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def kv_cache_spec(hf_config: PretrainedConfig) -> KVCacheSpec:
    """Layers, KV heads and head size as the model class reads them from the config."""
    spec = _decoder_class(hf_config).decoder_spec(hf_config)
    return KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim)
