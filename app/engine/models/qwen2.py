"""Qwen2 and Qwen2.5: Llama's layout with biases on the q/k/v projections."""

from __future__ import annotations

from transformers import PretrainedConfig

from app.engine.models.layers import DecoderForCausalLM, DecoderSpec, decoder_spec


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2: q/k/v always carry a bias, the output projection never does."""

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        return decoder_spec(config, qkv_bias=True)
