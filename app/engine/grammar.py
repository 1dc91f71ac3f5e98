"""Structured output: grammar specs, a bounded compile cache and per-sequence matchers (xgrammar).

Everything xgrammar-specific lives here. Compilation runs in worker threads (xgrammar releases the
GIL); cheap pure-Python pre-checks run first so pathological inputs never reach the compiler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from app.engine.grammar_spec import (
    DEFAULT_LIMITS,
    GrammarError,
    GrammarLimits,
    GrammarSpec,
    precheck,
    schema_patterns,
)


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A spec compiled for one tokenizer; shared by every matcher of that spec."""

    spec: GrammarSpec
    memory_bytes: int
    _compiled: xgr.CompiledGrammar = field(repr=False)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


@dataclass
class _Job:
    future: concurrent.futures.Future[CompiledGrammar]
    waiters: int = 0


class GrammarCompiler:
    """One per tokenizer: compiles GrammarSpecs, caching results in an LRU bounded by memory."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        limits: GrammarLimits = DEFAULT_LIMITS,
        max_threads: int = 2,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
        )
        self.vocab_size = vocab_size
        self.limits = limits
        # xgrammar's own cache is off: ours hands back the same object on a hit and is the one
        # place memory is counted.
        self._xgr = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="grammar-compile"
        )
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._jobs: dict[bytes, _Job] = {}

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    async def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile off the event loop; waits at most limits.compile_timeout_s."""
        job = self._lookup_or_submit(spec)
        if isinstance(job, CompiledGrammar):
            return job
        # shield: a timed-out or cancelled waiter must not cancel a job others share.
        waiting = asyncio.shield(asyncio.wrap_future(job.future))
        try:
            return await asyncio.wait_for(waiting, self.limits.compile_timeout_s)
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            self._release(spec.key, job)

    def compile_sync(self, spec: GrammarSpec) -> CompiledGrammar:
        """Same as compile(), blocking the calling thread."""
        job = self._lookup_or_submit(spec)
        if isinstance(job, CompiledGrammar):
            return job
        try:
            return job.future.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._timeout_error() from None
        finally:
            self._release(spec.key, job)

    def close(self) -> None:
        """Stop the worker threads (a compile already running finishes in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _timeout_error(self) -> GrammarError:
        return GrammarError(
            f"grammar compilation timed out after {self.limits.compile_timeout_s:g}s"
        )

    def _lookup_or_submit(self, spec: GrammarSpec) -> CompiledGrammar | _Job:
        """The cached grammar, or the (maybe shared) job compiling it, counting one more waiter."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            job = self._jobs.get(key)
            if job is None:
                precheck(spec, self.limits)
                job = _Job(self._pool.submit(self._run, spec))
                self._jobs[key] = job
            job.waiters += 1
            return job

    def _release(self, key: bytes, job: _Job) -> None:
        with self._lock:
            job.waiters -= 1
            # A queued job nobody waits for any more is dropped; a running one cannot be stopped
            # (xgrammar runs in C++), so it finishes and its result is cached for a retry.
            if job.waiters == 0 and job.future.cancel():
                self._jobs.pop(key, None)

    def _run(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            raw = self._compile_raw(spec)
            compiled = CompiledGrammar(spec, int(raw.memory_size_bytes), raw)
            with self._lock:
                self._store(spec.key, compiled)
            return compiled
        finally:
            with self._lock:
                self._jobs.pop(spec.key, None)

    def _store(self, key: bytes, compiled: CompiledGrammar) -> None:
        self._cache[key] = compiled
        self._cache_bytes += compiled.memory_bytes
        while self._cache and self._cache_bytes > self.limits.cache_max_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.memory_bytes

    def _compile_raw(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                # Non-strict: a bare {"type": "object"} in strict mode would only allow "{}".
                return self._xgr.compile_json_schema(
                    '{"type":"object"}', any_whitespace=False, strict_mode=False
                )
            if spec.kind == "json_schema":
                _checkschema_patterns(json.loads(spec.source))
                # Compact, fixed separators: no runaway whitespace from small models.
                return self._xgr.compile_json_schema(
                    spec.source, any_whitespace=False, strict_mode=True
                )
            if spec.kind == "regex":
                return self._xgr.compile_regex(spec.source)
            if spec.kind == "choice":
                choices = json.loads(spec.source)
                ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
                return self._xgr.compile_grammar(ebnf)
            return self._xgr.compile_grammar(spec.source)
        except GrammarError:
            raise
        except Exception as exc:
            raise GrammarError(f"{_LABELS[spec.kind]}: {_clean_message(exc)}") from None


class GrammarMatcher:
    """Per-sequence matcher state."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled._compiled)
        self._stop_ids = list(self._matcher.stop_token_ids)
        self._vocab_size = compiled._compiled.tokenizer_info.vocab_size

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Replay tokens all-or-nothing (e.g. after preemption); on False the state is unchanged."""
        for done, token_id in enumerate(token_ids):
            if not self._matcher.accept_token(token_id):
                if done:
                    self._matcher.rollback(done)
                return False
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]`; once terminated only stop tokens."""
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for token_id in self._stop_ids:
                bitmask[row, token_id // 32] |= _bit(token_id % 32)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def allows_nothing(self) -> bool:
        """Whether no token of the vocabulary may come next although the grammar is not done:
        a grammar this vocabulary cannot continue (xgrammar finds no token for some rare code
        points, e.g. unassigned ones in a regex)."""
        if self._matcher.is_terminated():
            return False
        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
        self._matcher.fill_next_token_bitmask(bitmask, 0)
        return not bool(bitmask.any())

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """True when the text so far is a complete match (a stop token may come next)."""
        return bool(self._matcher.is_completed())

    def reset(self) -> None:
        self._matcher.reset()


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """An int32 [batch, ceil(vocab/32)] bitmask on the CPU, every token allowed."""
    return xgr.allocate_token_bitmask(batch_size, vocab_size)


def reset_bitmask(bitmask: torch.Tensor) -> None:
    """Allow every token in every row (rows without a grammar stay like this)."""
    bitmask.fill_(-1)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack a packed bitmask (bit i of word j = token 32*j + i) into a [B, vocab] bool mask."""
    # Byte by byte through a 256-entry table: one gather, faster than shifting 32 ways. The int32
    # words are little-endian on every platform torch and xgrammar run on, so byte k of the row
    # holds tokens 8k..8k+7.
    device = bitmask.device
    table = (
        (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    ).bool()
    rows = bitmask.contiguous().view(torch.uint8)
    bits = table.index_select(0, rows.flatten().int())
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size]


def json_schema_ebnf(
    schema: dict[str, Any] | bool,
    rule_prefix: str,
    limits: GrammarLimits = DEFAULT_LIMITS,
) -> str:
    """EBNF rules for `schema` (compact JSON, as a json_schema spec compiles), every rule name
    prefixed with `rule_prefix` so several schemas can share one grammar; the schema's start rule
    is `{rule_prefix}root`. Pre-checked like a spec; problems raise GrammarError."""
    spec = GrammarSpec.for_json_schema(schema)
    precheck(spec, limits)
    _checkschema_patterns(json.loads(spec.source))
    try:
        grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, strict_mode=True)
    except Exception as exc:
        raise GrammarError(f"{_LABELS['json_schema']}: {_clean_message(exc)}") from None
    text = str(grammar)
    names = set(_RULE_NAME.findall(text))
    return _EBNF_TOKEN.sub(lambda m: rule_prefix + m[0] if m[0] in names else m[0], text)


_RULE_NAME = re.compile(r"^(\S+) ::=", re.MULTILINE)
# String literals and character classes pass through untouched; other words may be rule names.
_EBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z_][\w.-]*')


_LABELS: dict[str, str] = {
    "json_object": "JSON object grammar",
    "json_schema": "invalid JSON schema",
    "regex": "invalid regex",
    "choice": "invalid choice",
    "ebnf": "invalid EBNF grammar",
}


def _bit(index: int) -> int:
    # Bit 31 set is a negative int32.
    return -(2**31) if index == 31 else 1 << index


def _checkschema_patterns(schema: Any) -> None:
    # JSON-schema patterns go through a lenient path in xgrammar that drops what it cannot do
    # (lookahead, ...): parsing each as a plain regex first turns that into an error.
    for pattern in schema_patterns(schema):
        try:
            xgr.Grammar.from_regex(pattern)
        except Exception as exc:
            message = f"invalid 'pattern' {pattern[:100]!r} in JSON schema: {_clean_message(exc)}"
            raise GrammarError(message) from None


_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _clean_message(exc: BaseException) -> str:
    """xgrammar's error text without its timestamp, C++ source location or echoed input."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _XGR_PREFIX.sub("", text)
    text = text.split(" The JSON string is:")[0]
    return text[:300]
