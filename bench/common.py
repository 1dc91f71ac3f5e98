"""Shared benchmark helpers: random-weight models of known shapes, device description."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch

# Shapes only: benchmarks on these use random weights (speed depends on shapes, not values).
MODEL_SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
}


def build_model_dir(model: str | None, shape: str | None) -> Path:
    """A model directory: the given one, a random-weight one of a known shape, or the bundled."""
    from app.engine.loader import resolve_model_dir

    if shape is None:
        return resolve_model_dir(model)
    if shape not in MODEL_SHAPES:
        raise SystemExit(f"unknown --model-config {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    root = Path(os.environ.get("SPLITFUSE_BENCH_DIR", tempfile.gettempdir())) / f"random-{shape}"
    if (root / "config.json").exists():
        return root
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODEL_SHAPES[shape], bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: half the memory and time
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(root, safe_serialization=True)
    write_word_tokenizer(root, config.vocab_size)
    return root


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` made-up words: benchmarks send token ids, so any
    tokenizer of the right size will do, and this one needs no download or bundled model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


def describe_device() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{os.cpu_count()} (torch {torch.__version__})"
