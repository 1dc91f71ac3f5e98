"""Mistral: Llama's layout without biases, with an optional sliding attention window."""

from __future__ import annotations

from app.engine.models.layers import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral; `sliding_window` from the config is honoured by the generic decoder."""
