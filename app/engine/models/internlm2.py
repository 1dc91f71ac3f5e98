"""InternLM2 / 2.5: a Llama-shaped model whose checkpoints use their own names and pack q/k/v
into one `wqkv` matrix grouped per KV head."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PretrainedConfig

from app.engine.models.layers import DecoderForCausalLM, DecoderSpec, decoder_spec

# InternLM2 name fragment -> HF Llama name fragment (matched on whole dotted components).
_RENAMES = {
    "tok_embeddings": "embed_tokens",
    "output": "lm_head",
    "attention": "self_attn",
    "wo": "o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward": "mlp",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}


class InternLM2ForCausalLM(DecoderForCausalLM):
    """InternLM2; `bias` covers wqkv and wo. Its config loads without remote code."""

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        bias = bool(getattr(config, "bias", False))
        return decoder_spec(config, qkv_bias=bias, o_bias=bias)

    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        parts = [_RENAMES.get(part, part) for part in name.split(".")]
        if "wqkv" not in parts:
            yield ".".join(parts), tensor
            return
        # wqkv rows are laid out per KV head as [its `group` query heads, its key, its value].
        spec = self.spec
        group = spec.num_heads // spec.num_kv_heads
        grouped = tensor.reshape(spec.num_kv_heads, group + 2, spec.head_dim, *tensor.shape[1:])
        rest = tensor.shape[1:]
        prefix = ".".join(parts[: parts.index("wqkv")])
        suffix = parts[-1]
        yield f"{prefix}.q_proj.{suffix}", grouped[:, :group].reshape(-1, *rest)
        yield f"{prefix}.k_proj.{suffix}", grouped[:, group].reshape(-1, *rest)
        yield f"{prefix}.v_proj.{suffix}", grouped[:, group + 1].reshape(-1, *rest)
