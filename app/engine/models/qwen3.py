"""Qwen3 (dense): per-head RMSNorm on queries and keys, and an explicit head_dim."""

from __future__ import annotations

from transformers import PretrainedConfig

from app.engine.models.layers import DecoderForCausalLM, DecoderSpec, decoder_spec


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: q_norm/k_norm before rotary; `attention_bias` covers q/k/v and o."""

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return decoder_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=True)
