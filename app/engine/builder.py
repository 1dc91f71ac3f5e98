"""Engine start-up: pick the device and dtype, load model and tokenizer, size the KV pool."""

from __future__ import annotations

import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.engine.config import EngineConfig
from app.engine.loader import (
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)
from app.engine.model_runner import ModelRunner
from app.engine.models.registry import KVCacheSpec, get_model_class, kv_cache_spec
from app.engine.sampler import Sampler, costliest_rows
from app.kernels.attention import AttentionMetadata, kv_bytes_per_token, new_kv_cache

log = logging.getLogger("splitfuse.engine")


@dataclass
class ModelInfo:
    """What the rest of the engine needs to know about the loaded model."""

    name: str  # what /v1/models reports unless model_name overrides it
    model_dir: Path
    hf_config: Any
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_model_len: int
    num_blocks: int
    max_batch_size: int
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


# Default batch caps by a word of the GPU's name: large-memory, high-bandwidth parts run big
# batches, where weight reads are shared by more tokens and the GEMMs use the whole chip.
_BATCH_BY_DEVICE = {"h100": 512, "h200": 512, "gh200": 512, "h800": 512, "h20": 512}
_BATCH_BY_DEVICE |= {"a100": 256, "a800": 256}


def default_max_batch_size(device: torch.device) -> int:
    """The batch cap when the config leaves it to the device (max_batch_size = 0)."""
    if device.type == "cuda":
        words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
        for word in words:
            if word in _BATCH_BY_DEVICE:
                return _BATCH_BY_DEVICE[word]
    return 128


def eos_token_ids(model_dir: Path, hf_config: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    candidates: list[Any] = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        import json

        candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in candidates:
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def display_name(model: str | os.PathLike | None, model_dir: Path) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    if path.suffix == ".gguf":
        return path.stem
    return model_dir.name


def kv_bytes_per_block(
    spec: KVCacheSpec, block_size: int, dtype: torch.dtype, quant_policy: int = 0
) -> int:
    per_token = kv_bytes_per_token(spec.num_kv_heads, spec.head_dim, dtype, quant_policy)
    return spec.num_layers * block_size * per_token


@torch.inference_mode()
def activation_peak_bytes(
    model: Any, spec: KVCacheSpec, config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """Peak memory of the largest step: a full token budget forward, then a batch of logits
    sampled with every transform (sorting and penalties hold several `[batch, vocab]` tensors).

    The step is a mixed one (decodes, then one prompt), so every kernel a serving step uses is
    compiled here, before the first request, rather than while requests wait."""
    tokens = config.max_prefill_token_num
    decodes = max(0, min(config.max_batch_size, tokens) - 1)
    prompt = tokens - decodes
    query_lens = [1] * decodes + [prompt]
    shape = (1, config.block_size, spec.num_kv_heads, spec.head_dim)
    kv = [new_kv_cache(*shape, dtype, device, config.quant_policy) for _ in range(spec.num_layers)]
    # Every position reads and writes block 0: the values are irrelevant, the shapes are not.
    width = -(-prompt // config.block_size)
    ints = {"dtype": torch.int32, "device": device}
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], **ints),
        seq_lens=torch.tensor(query_lens, **ints),
        block_tables=torch.zeros(len(query_lens), width, **ints),
        slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=device),
        query_lens_cpu=query_lens,
        seq_lens_cpu=query_lens,
        max_query_len=prompt,
        max_seq_len=prompt,
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids = torch.ones(tokens, dtype=torch.int64, device=device)
    hidden = model(ids, torch.zeros_like(ids), kv, meta)
    logits = model.compute_logits(hidden[: config.max_batch_size])
    Sampler()(logits, costliest_rows(logits.shape[0], config.max_logprobs))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, hidden, logits
    torch.cuda.empty_cache()
    return peak


def num_kv_blocks(
    config: EngineConfig,
    spec: KVCacheSpec,
    dtype: torch.dtype,
    device: torch.device,
    activation_bytes: int = 0,
) -> int:
    if config.num_gpu_blocks:
        return config.num_gpu_blocks
    per_block = kv_bytes_per_block(spec, config.block_size, dtype, config.quant_policy)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = max(0, free - activation_bytes) * config.cache_max_entry_count
    else:
        budget = config.cpu_kv_cache_gib * 2**30
    return max(1, int(budget // per_block))


def build(model: str | os.PathLike | None, config: EngineConfig) -> tuple[ModelInfo, ModelRunner]:
    """Load everything; call on the engine's GPU thread so it owns the device context."""
    device = resolve_device(config.device)
    if not config.max_batch_size:
        config = config.replace(max_batch_size=default_max_batch_size(device))
    model_dir = resolve_model_dir(model)
    hf_config = load_hf_config(model_dir, trust_remote_code=config.trust_remote_code)
    get_model_class(hf_config)  # an unsupported architecture fails before the slow parts
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config.trust_remote_code)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    model_obj = load_model(model_dir, hf_config, dtype, device)
    spec = kv_cache_spec(hf_config)
    peak = 0
    if device.type == "cuda":  # also the kernels' warm-up, so with num_gpu_blocks too
        peak = activation_peak_bytes(model_obj, spec, config, dtype, device)
    num_blocks = num_kv_blocks(config, spec, dtype, device, peak)
    context = config.session_len or getattr(hf_config, "max_position_embeddings", None) or 4096
    max_model_len = min(context, num_blocks * config.block_size)
    eos = eos_token_ids(model_dir, hf_config, tokenizer)
    runner = ModelRunner(
        model_obj, spec, num_blocks, config.block_size, dtype, device, eos, config.quant_policy
    )
    if device.type == "cuda" and not config.eager_mode:
        runner.capture_cuda_graphs(
            config.max_batch_size, max_model_len, config.max_prefill_token_num
        )
    log.info(
        "model %s on %s (%s): %d KV blocks of %d tokens (%d tokens%s), context %d, batch %d",
        model_dir.name,
        device,
        str(dtype).removeprefix("torch."),
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        f", int{config.quant_policy}" if config.quant_policy else "",
        max_model_len,
        config.max_batch_size,
    )
    info = ModelInfo(
        display_name(model, model_dir),
        model_dir,
        hf_config,
        tokenizer,
        eos,
        hf_config.vocab_size,
        max_model_len,
        num_blocks,
        config.max_batch_size,
        device,
        dtype,
    )
    return info, runner
