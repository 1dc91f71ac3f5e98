"""Engine and generation settings, with lmdeploy-compatible names.

`EngineConfig` holds how the engine runs; `GenerationConfig` is what a user asks of one generation
(the pipeline's name); `SamplingParams` is the engine's immutable, validated token-level form.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DType = Literal["auto", "float32", "float16", "bfloat16"]
RowOutput = Literal["all", "generation"]


# A token id written as text (logit_bias keys): ASCII digits, where str.isdigit() would also
# take "²" and "١".
TOKEN_ID_TEXT = re.compile(r"-?[0-9]+")


def all_ints(values: Sequence[object]) -> bool:
    """Whether every value is an int (a bool is none), without a Python-level loop: token-id
    checks of whole prompts, which a 1000-prompt pipeline call makes before its first step."""
    return all(map(isinstance, values, itertools.repeat(int))) and not any(
        map(isinstance, values, itertools.repeat(bool))
    )


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise ValueError naming the first id that is not an int in [0, vocab_size)."""
    if not (all_ints(ids) and min(ids) >= 0 and max(ids) < vocab_size):
        bad = next(t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size)
        raise ValueError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class EngineConfig:
    """How the engine runs; every default is documented in config/default.toml."""

    dtype: DType = "auto"
    device: str = "auto"
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int = 0  # 0: chosen for the device (see builder.default_max_batch_size)
    block_size: int = 64
    cache_max_entry_count: float = 0.8
    quant_policy: int = 0  # 8: int8 KV cache, 4: int4
    num_gpu_blocks: int = 0
    cpu_kv_cache_gib: float = 1.0
    max_prefill_token_num: int = 8192
    enable_prefix_caching: bool = True
    eager_mode: bool = False
    async_scheduling: bool = True
    session_ttl: float = 600.0
    max_sessions: int = 4096
    max_logprobs: int = 20
    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    seed: int = 0
    trust_remote_code: bool = False
    chat_template: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        if self.tp != 1:
            raise ValueError(f"tp={self.tp}: this build runs on one device; use tp=1")
        _check(
            self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
            f"block_size must be a power of two, got {self.block_size}",
        )
        _check(self.max_batch_size >= 0, f"max_batch_size must be >= 0, got {self.max_batch_size}")
        _check(
            0.0 < self.cache_max_entry_count <= 1.0,
            f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}",
        )
        _check(
            self.quant_policy in (0, 4, 8),
            f"quant_policy must be 0 (KV cache in the model's dtype), 8 (int8 KV cache) or "
            f"4 (int4 KV cache), got {self.quant_policy}",
        )
        _check(self.num_gpu_blocks >= 0, f"num_gpu_blocks must be >= 0, got {self.num_gpu_blocks}")
        _check(
            self.max_prefill_token_num >= 1,
            f"max_prefill_token_num must be >= 1, got {self.max_prefill_token_num}",
        )
        _check(
            self.session_len is None or self.session_len >= 2,
            f"session_len must be >= 2, got {self.session_len}",
        )
        _check(self.session_ttl > 0, f"session_ttl must be > 0, got {self.session_ttl}")
        _check(
            0.0 < self.cpu_kv_cache_gib < math.inf,
            f"cpu_kv_cache_gib must be a finite number > 0, got {self.cpu_kv_cache_gib}",
        )
        for name, low in (
            ("max_sessions", 1),
            ("max_logprobs", 0),
            ("max_n", 1),
            ("max_stop_strings", 0),
            ("max_stop_string_len", 1),
        ):
            value = getattr(self, name)
            _check(value >= low, f"{name} must be >= {low}, got {value}")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


# LMDeploy's PytorchEngineConfig fields that mean nothing to this engine: accepted at any value
# (a script written for LMDeploy runs unchanged), or only at their default, with the reason.
_NO_EFFECT = ("prefill_interval", "thread_safe", "num_cpu_blocks")  # split-fuse steps; no swap
_UNSUPPORTED = {
    "adapters": "LoRA adapters are not supported",
    "custom_module_map": "custom model modules are not supported",
    "download_dir": "models are never downloaded: pass a local directory or .gguf file",
    "revision": "models are never downloaded: pass a local directory or .gguf file",
}


def PytorchEngineConfig(**fields: Any) -> EngineConfig:  # LMDeploy's class name
    """LMDeploy's `PytorchEngineConfig(...)` as an EngineConfig: the same names where they
    exist, `max_batch_size=None` for the device's choice, `device_type='cuda'`; its fields that
    mean nothing here are accepted (prefill_interval, thread_safe, num_cpu_blocks) or refused
    with the reason unless left at None (adapters, custom_module_map, download_dir, revision)."""
    for name, reason in _UNSUPPORTED.items():
        if fields.pop(name, None) is not None:
            raise ValueError(f"{name}: {reason}")
    for name in _NO_EFFECT:
        fields.pop(name, None)
    device_type = fields.pop("device_type", None)
    if device_type not in (None, "cuda"):
        raise ValueError(f"device_type must be 'cuda', got {device_type!r}")
    if device_type and "device" not in fields:
        fields["device"] = "cuda"
    if fields.get("max_batch_size", 0) is None:
        fields["max_batch_size"] = 0
    return EngineConfig(**fields)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _listed(value: Any, name: str, kind: type) -> tuple[Any, ...]:
    """A GenerationConfig list field as a tuple: one value alone counts as a list of one."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, kind) for v in items):
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings in token form; validated once, immutable afterwards."""

    n: int = 1
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    bad_token_ids: tuple[int, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # multi-token sequences that must not appear
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and top-k alternatives
    prompt_logprobs: bool = False
    # "generation": the logits (or final hidden states) of each sampled token's step; "all":
    # of every position, the prompt's included (RequestOutput carries them on its last delta).
    output_logits: RowOutput | None = None
    output_last_hidden_state: RowOutput | None = None
    # Called in turn on each step's logits, `fn(token_ids, scores) -> scores`: the sequence's
    # ids so far (1-D int64) and its float32 scores [vocab] after bias and penalties.
    logits_processors: tuple[Callable[[Any, Any], Any], ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @functools.cached_property
    def all_rows(self) -> bool:
        """Whether logits or hidden states are asked for at every position ("all")."""
        return "all" in (self.output_logits, self.output_last_hidden_state)

    @functools.cached_property
    def every_position(self) -> bool:
        """Whether each prompt position needs its own output row, so none may come from the
        prefix cache."""
        return self.prompt_logprobs or self.all_rows

    @functools.cached_property
    def needs_eager(self) -> bool:
        """Whether the request takes rows a CUDA graph does not give (a graph computes only the
        sampling rows' logits): its steps run eagerly."""
        return self.every_position or self.output_last_hidden_state is not None

    def validate(
        self,
        vocab_size: int,
        max_n: int = 16,
        max_logprobs: int = 20,
        max_stop_strings: int = 16,
        max_stop_string_len: int = 256,
    ) -> None:
        """Raise ValueError naming the first field of the wrong type or out of range."""
        for name in ("n", "max_new_tokens", "min_new_tokens", "top_k"):
            _check(_is_int(getattr(self, name)), f"{name} must be an integer")
        for name in ("logprobs", "seed"):
            value = getattr(self, name)
            _check(value is None or _is_int(value), f"{name} must be an integer or None")
        for name in (
            "ignore_eos",
            "prompt_logprobs",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False")
        # torch.Generator.manual_seed's range, as the HTTP routes check it.
        _check(
            self.seed is None or -(2**63) <= self.seed < 2**64,
            f"seed must be in [-2**63, 2**64), got {self.seed}",
        )
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        _check(1 <= self.n <= max_n, f"n must be between 1 and {max_n}, got {self.n}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
            f"({self.max_new_tokens})",
        )
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            self.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            all(callable(fn) for fn in self.logits_processors),
            "logits_processors must be callables fn(token_ids, scores) -> scores",
        )
        for name in ("output_logits", "output_last_hidden_state"):
            value = getattr(self, name)
            _check(
                value in (None, "all", "generation"),
                f"{name} must be 'all', 'generation' or None, got {value!r}",
            )
        _check(
            self.n == 1 or not self.all_rows,
            "output_logits / output_last_hidden_state 'all' needs n == 1",
        )
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= max_logprobs,
                f"logprobs must be between 0 and {max_logprobs}, got {self.logprobs}",
            )
        _check(
            len(self.stop_strings) <= max_stop_strings,
            f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop_strings)}",
        )
        for stop in self.stop_strings:
            _check(isinstance(stop, str), f"stop strings must be strings, got {stop!r}")
            _check(
                0 < len(stop) <= max_stop_string_len,
                f"stop strings must be 1 to {max_stop_string_len} characters long",
            )
        for token_id, bias in self.logit_bias:
            _check(
                _is_int(token_id) and 0 <= token_id < vocab_size,
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})",
            )
            _check(
                _is_number(bias) and math.isfinite(bias) and -100.0 <= bias <= 100.0,
                f"logit_bias values must be in [-100, 100], got {bias}",
            )
        for label, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("bad_token_ids", self.bad_token_ids),
            *(("bad_words", words) for words in self.bad_words_ids),
        ):
            for token_id in ids:
                _check(
                    isinstance(token_id, int) and 0 <= token_id < vocab_size,
                    f"{label} contains {token_id!r}, outside the vocabulary (0..{vocab_size - 1})",
                )


@dataclass
class GenerationConfig:
    """What a pipeline user asks of a generation (lmdeploy's GenerationConfig names)."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    include_stop_str_in_output: bool = False
    output_logits: RowOutput | None = None
    output_last_hidden_state: RowOutput | None = None
    logits_processors: list[Callable[[Any, Any], Any]] | None = None

    def to_sampling_params(self, tokenizer: Any = None) -> SamplingParams:
        """Resolve words into token ids with `tokenizer` (needed for bad_words only)."""
        bad_words_ids: list[tuple[int, ...]] = []
        for word in _listed(self.bad_words, "bad_words", str):
            if tokenizer is None:
                raise ValueError("bad_words needs a tokenizer to resolve them into token ids")
            ids = tuple(tokenizer.encode(word, add_special_tokens=False))
            if ids:
                bad_words_ids.append(ids)
        return SamplingParams(
            n=self.n,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens or 0,
            temperature=self.temperature,
            top_p=self.top_p,
            # lmdeploy: do_sample=False means greedy search whatever the other knobs say.
            top_k=self.top_k if self.do_sample else 1,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=_bias_pairs(self.logit_bias),
            bad_token_ids=_listed(self.bad_token_ids, "bad_token_ids", int),
            bad_words_ids=tuple(bad_words_ids),
            stop_token_ids=_listed(self.stop_token_ids, "stop_token_ids", int),
            stop_strings=_listed(self.stop_words, "stop_words", str),
            ignore_eos=self.ignore_eos,
            seed=self.random_seed,
            logprobs=self.logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_logits=self.output_logits,
            output_last_hidden_state=self.output_last_hidden_state,
            logits_processors=(
                (self.logits_processors,)
                if callable(self.logits_processors)
                else tuple(self.logits_processors or ())
            ),
        )


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs; keys may be ids or their decimal strings."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
    pairs = []
    for key, value in bias.items():
        if isinstance(key, str) and TOKEN_ID_TEXT.fullmatch(key):
            key = int(key)
        if not _is_int(key):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if not _is_number(value):
            raise ValueError(f"logit_bias values must be numbers, got {value!r}")
        pairs.append((key, float(value)))
    return tuple(pairs)
