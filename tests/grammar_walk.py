"""A simulated model for grammar tests: Gaussian logits plus a bias, masked by the grammar's
bitmask, argmax, on the bundled SmolLM2's vocabulary."""

from __future__ import annotations

from typing import Any

import torch

from app.engine.grammar import (
    GrammarCompiler,
    GrammarMatcher,
    GrammarSpec,
    allocate_bitmask,
    bitmask_to_bool,
)

VOCAB = 49152


def closer_bias(tokenizer: Any) -> torch.Tensor:
    """3.0 on every token made only of characters that close strings, objects and arrays: a
    nudge that ends random generations in tens of tokens instead of thousands."""
    bias = torch.zeros(VOCAB)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and set(text) <= set('"]},'):
            bias[token_id] = 3.0
    return bias


def generate(
    compiler: GrammarCompiler, spec: GrammarSpec, bias: torch.Tensor, seed: int, limit: int
) -> list[int]:
    """The token ids the simulated model picks until the grammar terminates (its stop token
    left out); fails after `limit` tokens."""
    matcher = GrammarMatcher(compiler.compile_sync(spec))
    bitmask = allocate_bitmask(1, VOCAB)
    rng = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(limit):
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(VOCAB, generator=rng) + bias
        logits.masked_fill_(~bitmask_to_bool(bitmask, VOCAB)[0], float("-inf"))
        token_id = int(logits.argmax())
        assert matcher.accept_token(token_id)
        if matcher.is_terminated():
            return ids
        ids.append(token_id)
    raise AssertionError("generation did not terminate")
