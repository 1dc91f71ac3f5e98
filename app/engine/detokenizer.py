"""Incremental, UTF-8-safe detokenization with stop strings, one instance per sequence.

Each step decodes a small window of tokens twice — the already-released context alone and the
context plus the new tokens — and releases the difference (the vLLM prefix/read-offset scheme).
Decoding with context keeps tokenizers that drop a fragment's leading space (sentencepiece)
exact; holding text that ends in U+FFFD keeps characters split across tokens whole.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first output token, as vLLM does
_TRIM_AT = 256  # drop released tokens from the window list once this many pile up
_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas; holds back partial characters and
    anything that could begin a stop string."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        facts = _tokenizer_facts(tokenizer)
        self._special_ids, self._backend_decode = facts.special_ids, facts.backend_decode
        # Slow tokenizers join special tokens and the text between them with spaces; fast ones
        # ignore the flag, so the runs between special tokens are decoded separately here.
        self._segmented = not skip_special_tokens and spaces_between_special_tokens
        self._ids = self._initial_context(prompt_ids)
        self._prefix = 0  # window start: context tokens decoded only to be subtracted
        self._read = len(self._ids)  # tokens before this were released
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached
        self._run_has_text = False  # segmented: the current run between specials released text
        self._any_segment = False  # segmented: something was released, so a separator is due
        self._stops = tuple(stop_strings)
        self._stop_starts = frozenset(stop[0] for stop in self._stops)
        self._max_stop = max((len(stop) for stop in self._stops), default=0)
        self._include_stop = include_stop_str_in_output
        # As vLLM's min_tokens: stop strings count only from the step that brings the output to
        # this many tokens; text released before then is never taken back.
        self._tokens_before_stops = min_tokens
        self._held = ""  # decoded text withheld because it could begin a stop string
        self._text = ""
        self._stopped = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text

    def step(self, new_token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed new tokens; returns (text released now, whether a stop string appeared)."""
        if self._stopped:
            return "", True
        self._tokens_before_stops -= len(new_token_ids)
        pieces: list[str] = []
        for token_id in new_token_ids:
            if token_id not in self._special_ids:
                self._ids.append(token_id)
            elif self._segmented:
                pieces.append(self._end_run())
                separator = " " if self._any_segment else ""
                pieces.append(separator + str(self._tokenizer.convert_ids_to_tokens(token_id)))
                self._any_segment = True
            elif not self._skip_special:
                self._ids.append(token_id)
        pieces.append(self._advance())
        return self._release("".join(pieces), final=False)

    def flush(self) -> str:
        """Release everything still held back; call once when the sequence finishes otherwise
        than by a stop string."""
        if self._stopped:
            return ""
        text, _ = self._release(self._end_run(), final=True)
        return text

    def _initial_context(self, prompt_ids: Sequence[int]) -> list[int]:
        tail = list(prompt_ids[-4 * _CONTEXT_TOKENS :])
        if self._skip_special:
            tail = [t for t in tail if t not in self._special_ids]
        elif self._segmented:
            # A run of text starts after the prompt's last special token.
            last = max((i for i, t in enumerate(tail) if t in self._special_ids), default=-1)
            tail = tail[last + 1 :]
        tail = tail[-_CONTEXT_TOKENS:]
        # A prompt ending inside a character must not lend its bytes to the output's first token.
        while tail and self._decode(tail).endswith(_REPLACEMENT):
            tail.pop()
        return tail

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _advance(self) -> str:
        """Text of the unreleased tokens, unless it ends in a character still being assembled."""
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        return self._mark_released(full[len(self._prefix_text) :])

    def _end_run(self) -> str:
        """All unreleased text of the window, partial characters included, then a fresh window."""
        text = ""
        if self._read < len(self._ids):
            prefix_text = self._prefix_text
            if prefix_text is None:
                prefix_text = self._decode(self._ids[self._prefix : self._read])
            text = self._mark_released(self._decode(self._ids[self._prefix :])[len(prefix_text) :])
        if self._segmented:
            self._ids, self._prefix, self._read = [], 0, 0
            self._prefix_text = ""
            self._run_has_text = False
        return text

    def _mark_released(self, delta: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._prefix, self._read = 0, self._read - self._prefix
        if self._segmented and delta and not self._run_has_text:
            self._run_has_text = True
            if self._any_segment:
                delta = " " + delta
            self._any_segment = True
        return delta

    def _release(self, delta: str, final: bool) -> tuple[str, bool]:
        pending = self._held + delta
        keep = 0
        if self._stops and self._tokens_before_stops <= 0:
            hit = self._find_stop(pending)
            if hit is not None:
                start, stop = hit
                out = pending[: start + len(stop) if self._include_stop else start]
                self._held, self._stopped = "", True
                self._text += out
                return out, True
            if not final:
                keep = self._partial_stop_len(pending)
        out = pending[: len(pending) - keep]
        self._held = pending[len(pending) - keep :]
        self._text += out
        return out, False

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that ends first in `text` (of those ending together, the longest), so
        the answer does not depend on how tokens were grouped into steps."""
        hits = [(at + len(stop), at, stop) for stop in self._stops if (at := text.find(stop)) >= 0]
        if not hits:
            return None
        _, at, stop = min(hits)
        return at, stop

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for j in range(max(0, len(text) - self._max_stop + 1), len(text)):
            if text[j] in self._stop_starts:
                suffix = text[j:]
                if any(stop.startswith(suffix) for stop in self._stops):
                    return len(text) - j
        return 0


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


@dataclass(frozen=True)
class _Facts:
    """What decoding and listings look up per token, worked out once per tokenizer."""

    special_ids: frozenset[int]
    backend_decode: Callable[..., str] | None
    added_ids: frozenset[int]  # `added_tokens_decoder` builds a dict on every access
    byte_level: bool


_FACTS: weakref.WeakKeyDictionary[Any, _Facts] = weakref.WeakKeyDictionary()


def _tokenizer_facts(tokenizer: PreTrainedTokenizerBase) -> _Facts:
    """The special ids (listing them walks every added token: milliseconds) and, for a fast
    tokenizer that does not override decoding, its Rust decoder: `decode(...,
    clean_up_tokenization_spaces=False)` is exactly that call behind a generic conversion of the
    ids, which cost as much as the decoding itself. Kept per tokenizer."""
    facts = _FACTS.get(tokenizer)
    if facts is None:
        plain = (
            isinstance(tokenizer, PreTrainedTokenizerFast)
            and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        facts = _Facts(
            special_ids=special_token_ids(tokenizer),
            backend_decode=backend.decode if plain else None,
            added_ids=frozenset(tokenizer.added_tokens_decoder),
            byte_level=backend is not None and "ByteLevel" in str(backend.decoder),
        )
        _FACTS[tokenizer] = facts
    return facts


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The bytes one token stands for: byte-level BPE and sentencepiece byte fallback undone."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return b""
    facts = _tokenizer_facts(tokenizer)
    if token_id in facts.added_ids:
        return piece.encode()
    byte = _BYTE_FALLBACK.fullmatch(piece)
    if byte is not None:
        return bytes([int(byte[1], 16)])
    if facts.byte_level and all(char in _UNICODE_TO_BYTE for char in piece):
        return bytes(_UNICODE_TO_BYTE[char] for char in piece)
    if "\u2581" in piece:  # sentencepiece's visible space
        return piece.replace("\u2581", " ").encode()
    return tokenizer.decode([token_id], skip_special_tokens=False).encode()


def token_listing(tokenizer: PreTrainedTokenizerBase, token_id: int) -> tuple[str, bytes]:
    """One token's text for logprob listings, and the bytes it stands for; a token that is not
    whole UTF-8 shows its bytes as `bytes:\\xe4\\xbd` (OpenAI's form). Never raises."""
    try:
        data = token_bytes(tokenizer, token_id)
    except Exception:  # a listing must not fail a request over one odd token
        return f"token_id:{token_id}", b""
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the rest are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    for n, b in enumerate(sorted(set(range(256)) - set(printable))):
        table[chr(256 + n)] = b
    return table


_UNICODE_TO_BYTE = _byte_level_alphabet()
