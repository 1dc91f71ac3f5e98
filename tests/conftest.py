"""Session-wide fixtures shared by the test tree."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine.loader import resolve_model_dir


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2 GGUF converted to an HF directory, once per session; an existing
    SPLITFUSE_CACHE_DIR is reused (CI keeps one), otherwise a session temp cache is used."""
    if os.environ.get("SPLITFUSE_CACHE_DIR"):
        return resolve_model_dir(None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("splitfuse-cache")))
        return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama that speaks SmolLM2's tokenizer: engine mechanics in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in smollm2_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, out / name.name)
    return out


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> Any:
    """The bundled SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> Iterator[Any]:
    """A GrammarCompiler for SmolLM2's tokenizer, one per test module (its cache starts empty)."""
    from app.engine.grammar import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    yield compiler
    compiler.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
