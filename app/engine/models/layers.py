"""Building blocks shared by the decoder-only families: norms, rotary embeddings, attention, MLP,
and the generic pre-norm decoder (`DecoderForCausalLM`) that each family file configures."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from app.kernels.activation import silu_and_mul
from app.kernels.attention import AttentionMetadata, KVCache, paged_attention, split_kv_cache
from app.kernels.linear import linear
from app.kernels.norm import fused_add_rms_norm, rms_norm
from app.kernels.rotary import rotary_and_cache

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of this step's positions


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Weights always come from a checkpoint, so random initialisation would only cost time.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """`y = x W^T + b`; `shards` names row ranges of W that separate checkpoint tensors fill."""

    def __init__(
        self,
        in_features: int,
        shards: dict[str, int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.shards: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shards[name] = (offset, size)
            offset += size
        self.weight = _empty((offset, in_features), dtype, device)
        self.bias = _empty((offset,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as the reference implementations do."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty((size,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(x + residual), x + residual)` in one pass over the residual stream."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary settings, normalised from `rope_parameters` (transformers 5) or `rope_scaling`."""

    rope_type: str
    theta: float
    max_position_embeddings: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


def rope_config(config: PretrainedConfig) -> RopeConfig:
    """Read rope settings from either config shape; unsupported rope types raise ValueError."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "linear", "dynamic", "llama3"):
        raise ValueError(
            f"rope type {rope_type!r} is not supported "
            "(supported: default, linear, dynamic, llama3)"
        )
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    max_pos = getattr(config, "max_position_embeddings", None) or 2048
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = {k: params[k] for k in keys if params.get(k) is not None}
    return RopeConfig(rope_type, float(theta), int(max_pos), **extra)


def _inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, the band between blends.
    old_len = rope.original_max_position_embeddings or rope.max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Maps token positions to the (cos, sin) tables `[T, head_dim / 2]` in float32."""

    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        self.register_buffer("inv_freq", _inv_freq(head_dim, rope).to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rope:
        pos = positions.float()
        if self.rope.rope_type == "dynamic":
            freqs = pos[:, None] * self._dynamic_inv_freq(pos)
        else:
            freqs = pos[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def _dynamic_inv_freq(self, pos: torch.Tensor) -> torch.Tensor:
        # Dynamic NTK grows the base with the context length. The base of each token is fixed by
        # its own position (the length when it was first seen, as in incremental decoding), so
        # cached keys never need re-rotating and every step is a pure function of positions.
        rope, dim = self.rope, self.head_dim
        length = torch.clamp(pos + 1, min=rope.max_position_embeddings)
        ratio = rope.factor * length / rope.max_position_embeddings - (rope.factor - 1)
        base = rope.theta * ratio ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.float, device=pos.device) / dim
        return 1.0 / base[:, None] ** exponent[None, :]


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the generic decoder needs, read from a family's HF config."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def decoder_spec(config: PretrainedConfig, **overrides: bool) -> DecoderSpec:
    """Read the standard (Llama-style) config names; families pass their bias/norm flags."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
    heads = config.num_attention_heads
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        windows: tuple[int | None, ...] = (None,) * layers
    elif layer_types is None:
        windows = (window,) * layers
    else:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return DecoderSpec(
        hidden_size=config.hidden_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope=rope_config(config),
        sliding_windows=windows,
        **overrides,
    )


class Attention(nn.Module):
    """Self-attention over the paged KV cache with a packed q/k/v projection."""

    def __init__(
        self, spec: DecoderSpec, layer: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.sliding_window = spec.sliding_windows[layer]
        self.qkv_proj = Linear(
            spec.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            spec.qkv_bias,
            dtype,
            device,
        )
        self.o_proj = Linear(self.q_size, {"": spec.hidden_size}, spec.o_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)

    def forward(
        self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, attn: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache, scales = split_kv_cache(kv_cache)
        rotary_and_cache(q, k, v, *rope, k_cache, v_cache, attn.slot_mapping, scales)  # in place
        out = paged_attention(
            q, k_cache, v_cache, attn, self.scale,
            sliding_window=self.sliding_window, kv_scales=scales,
        )  # fmt: skip
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with a packed gate/up projection."""

    def __init__(self, spec: DecoderSpec, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = Linear(
            spec.hidden_size, {"gate": size, "up": size}, spec.mlp_bias, dtype, device
        )
        self.down_proj = Linear(size, {"": spec.hidden_size}, spec.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream travels beside the block's output instead of being added to it, so
    each add fuses into the norm that follows it (in the next block or the final norm).
    """

    def __init__(
        self, spec: DecoderSpec, layer: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.self_attn = Attention(spec, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.mlp = MLP(spec, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_cache: KVCache,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mlp output, residual stream)`; their sum is the block's output. The first block
        gets residual None and x as the stream; later ones get the previous block's pair."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, rope, kv_cache, attn)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """Embedding, the layer stack and the final norm (HF's `model.` prefix)."""

    def __init__(self, spec: DecoderSpec, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()  # a bare holder keeps HF's `embed_tokens.weight` name
        self.embed_tokens.weight = _empty((spec.vocab_size, spec.hidden_size), dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, dtype, device) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)


# Checkpoint projections that live as row ranges of one packed parameter here.
_PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class DecoderForCausalLM(nn.Module):
    """A Llama-shaped causal LM over the paged KV cache; families override `decoder_spec` and,
    when their checkpoints use other names, `checkpoint_tensors`."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.spec = self.decoder_spec(config)
        self.model = DecoderModel(self.spec, dtype, device)
        self.rotary = RotaryEmbedding(self.spec.head_dim, self.spec.rope, device)
        self.lm_head = None
        if not self.spec.tie_word_embeddings:
            self.lm_head = Linear(
                self.spec.hidden_size, {"": self.spec.vocab_size}, False, dtype, device
            )

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        """The family's reading of its HF config."""
        return decoder_spec(config)

    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Translate one checkpoint tensor into HF-Llama-named tensors (identity for Llama)."""
        yield name, tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm; this step's K/V land in the cache."""
        x = F.embedding(input_ids, self.model.embed_tokens.weight)
        rope = self.rotary(positions)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, attn)
        assert residual is not None  # every model has layers
        return self.model.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[N, vocab]` of the selected hidden rows in the model's dtype (the sampler
        widens what it transforms), written into `out` when given."""
        head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        if out is None or hidden.shape[0] == 1:
            logits = linear(hidden, head)
            return logits if out is None else out.copy_(logits)
        return torch.mm(hidden, head.t(), out=out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (and cast) checkpoint tensors into the parameters; every parameter must be
        filled and every tensor used, else ValueError."""
        params = dict(self.named_parameters())
        pending = {(name, shard) for name in params for shard in self._shards(name)}
        for ckpt_name, ckpt_tensor in weights:
            for name, tensor in self.checkpoint_tensors(ckpt_name, ckpt_tensor):
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a cache some old checkpoints saved; recomputed here
                if name == "lm_head.weight" and self.lm_head is None:
                    continue  # tied checkpoints may still store the shared matrix twice
                target, shard = self._target(name)
                if target not in params:
                    raise ValueError(f"unexpected weight {ckpt_name!r} in checkpoint")
                self._copy(params[target], target, shard, tensor, ckpt_name)
                pending.discard((target, shard))
        if pending:
            missing = sorted(f"{n}[{s}]" if s else n for n, s in pending)
            raise ValueError(
                f"{len(missing)} weights missing from checkpoint: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )

    def _shards(self, param_name: str) -> list[str]:
        module = self.get_submodule(param_name.rsplit(".", 1)[0])
        return list(module.shards) if isinstance(module, Linear) else [""]

    @staticmethod
    def _target(name: str) -> tuple[str, str]:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _PACKED:
            packed, shard = _PACKED[parts[-2]]
            return ".".join([*parts[:-2], packed, parts[-1]]), shard
        return name, ""

    def _copy(
        self, param: nn.Parameter, target: str, shard: str, tensor: torch.Tensor, ckpt_name: str
    ) -> None:
        module = self.get_submodule(target.rsplit(".", 1)[0])
        dest = param.data
        if isinstance(module, Linear) and shard:
            start, size = module.shards[shard]
            dest = dest[start : start + size]
        if dest.shape != tensor.shape:
            raise ValueError(
                f"weight {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
