"""Llama 2, 3, 3.1 (llama3 rope scaling) and 3.2 (tied embeddings); also SmolLM2."""

from __future__ import annotations

from transformers import PretrainedConfig

from app.engine.models.layers import DecoderForCausalLM, DecoderSpec, decoder_spec


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: optional biases on all attention projections (`attention_bias`) and MLP."""

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return decoder_spec(
            config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
        )
