"""Batched token sampling: logit processors, greedy/random choice, seeds and logprobs.

Runs in the GPU thread. Every transform is applied to the whole batch with per-row parameter
tensors; Python loops only run over rows (to gather their settings) and over seeded rows (one
noise draw each), never over the vocabulary.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from app.engine.config import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence's sampling state: its settings, history, generator and EOS ids."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    # Created, seeded and owned by the caller; sampling advances it by one draw of V values.
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]


@dataclass
class SamplerOutput:
    """Sampled token per row, with its logprob and top alternatives for rows that asked."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    device_ids: torch.Tensor | None = None  # token_ids, still on the device
    # Row -> why its logits processor failed: that row's token means nothing, the others stand.
    errors: dict[int, str] = field(default_factory=dict)


class Sampler:
    """Turns a batch of next-token logits into tokens, following each row's SamplingParams."""

    def __init__(self) -> None:
        # Prompt ids on the device, found by the prompt list's identity (see `_prompt_ids`).
        self._prompts: dict[int, tuple[Sequence[int], int, torch.Tensor]] = {}

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], allowed: torch.Tensor | None = None
    ) -> SamplerOutput:
        """`logits` in any float dtype: what is transformed is widened to float32 first, and a
        greedy row's argmax is the same in both (the widening is exact)."""
        return self.launch(logits, rows, allowed).result()

    def launch(
        self, logits: torch.Tensor, rows: list[SamplingRow], allowed: torch.Tensor | None = None
    ) -> PendingSample:
        """Queue the whole batch's sampling and its copies to the host; the result waits for
        them. Every read of `logits` is queued here, so a later step may overwrite them."""
        errors: dict[int, str] = {}
        processed = self._process(logits, rows, allowed, errors)
        token_ids = processed.argmax(dim=-1)
        sampled_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled_rows:
            index = _ints(sampled_rows, logits.device)
            token_ids[index] = _sample(processed[index].float(), [rows[i] for i in sampled_rows])
        return PendingSample.launch(logits, token_ids, rows, errors)

    def _process(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        allowed: torch.Tensor | None,
        errors: dict[int, str],
    ) -> torch.Tensor:
        """Bias, bans, penalties, logits processors and the grammar mask, in float32; `logits`
        itself comes back if none apply. A processor that raises or returns the wrong shape
        leaves its row's scores as they were and its reason in `errors`."""
        vocab = logits.shape[1]
        bias = [
            (i, tok, value)
            for i, row in enumerate(rows)
            for tok, value in row.params.logit_bias
            if 0 <= tok < vocab
        ]
        bans = [
            (i, tok) for i, row in enumerate(rows) for tok in _banned_ids(row) if 0 <= tok < vocab
        ]
        repetition = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
        additive = [
            i
            for i, row in enumerate(rows)
            if (row.params.presence_penalty or row.params.frequency_penalty) and row.output_ids
        ]
        custom = [i for i, row in enumerate(rows) if row.params.logits_processors]
        if not (bias or bans or repetition or additive or custom) and allowed is None:
            return logits

        out = logits.to(torch.float32, copy=True)
        device = logits.device
        if bias:
            i, tok, value = zip(*bias, strict=True)
            out.index_put_(
                (_ints(i, device), _ints(tok, device)),
                host_to_device(value, device, out.dtype),
                accumulate=True,
            )
        if bans:
            i, tok = zip(*bans, strict=True)
            out[_ints(i, device), _ints(tok, device)] = _NEG_INF
        if repetition:
            penalized = [rows[i] for i in repetition]
            prompts = self._prompt_ids(penalized, out.shape[1], device)
            _repetition_penalty(out, penalized, repetition, prompts)
        if additive:
            _additive_penalties(out, [rows[i] for i in additive], additive)
        for i in custom:  # the user's code, a row at a time
            row = rows[i]
            ids = _ints([*row.prompt_ids, *row.output_ids], device)
            try:
                for fn in row.params.logits_processors:
                    scores = fn(ids, out[i])
                    if not isinstance(scores, torch.Tensor) or scores.shape != out[i].shape:
                        got = _describe(scores)
                        errors[i] = f"a logits processor returned {got}, not [{vocab}] scores"
                        break
                    out[i] = scores
            except Exception as exc:  # the user's bug fails its own request only
                errors[i] = f"a logits processor raised {type(exc).__name__}: {exc}"
        if allowed is not None:
            out.masked_fill_(~allowed, _NEG_INF)

        # A row with nothing left to sample: the grammar mask outranks the soft bans, and a row the
        # mask empties entirely (a grammar error upstream) falls back to the raw logits.
        dead = torch.isneginf(out).all(dim=-1, keepdim=True)
        fallback = logits
        if allowed is not None:
            masked = logits.masked_fill(~allowed, _NEG_INF)
            fallback = torch.where(torch.isneginf(masked).all(dim=-1, keepdim=True), logits, masked)
        return torch.where(dead, fallback, out)

    def _prompt_ids(
        self, rows: list[SamplingRow], vocab: int, device: torch.device
    ) -> list[torch.Tensor]:
        """Each row's prompt ids on the device. Prompts do not change between steps and sending
        them again costs ~50 ns a token on the host, so they are kept, found by the identity of
        the caller's prompt list; only the prompts of the latest penalized batch stay."""
        kept: dict[int, tuple[Sequence[int], int, torch.Tensor]] = {}
        for row in rows:
            prompt = row.prompt_ids
            hit = self._prompts.get(id(prompt))
            if hit is None or hit[0] is not prompt or hit[1] != len(prompt):
                hit = (prompt, len(prompt), host_to_device(_host_ids([prompt], vocab), device))
            kept[id(prompt)] = hit
        self._prompts = kept
        return [kept[id(row.prompt_ids)][2] for row in rows]


def costliest_rows(n: int, max_logprobs: int) -> list[SamplingRow]:
    """`n` rows that take every transform the sampler has (penalties, bans, top-k, top-p, min-p,
    logprobs): the start-up profiling pass samples them to size its memory for the worst step."""
    params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=50,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        bad_token_ids=(0,),
        logit_bias=((1, 1.0),),
        logprobs=max_logprobs,
    )
    return [SamplingRow(params, [1, 2, 3], [4, 5], None, ()) for _ in range(n)]


def _banned_ids(row: SamplingRow) -> list[int]:
    params = row.params
    banned = list(params.bad_token_ids)
    output = row.output_ids
    for word in params.bad_words_ids:
        prefix = word[:-1]
        if not prefix or (
            len(output) >= len(prefix) and tuple(output[len(output) - len(prefix) :]) == prefix
        ):
            banned.append(word[-1])
    if len(output) < params.min_new_tokens:
        banned.extend(row.eos_token_ids)
        banned.extend(params.stop_token_ids)
    return banned


def host_to_device(
    values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Host values on `device` without waiting for it, through pinned memory on CUDA. A plain
    `torch.tensor(values, device=...)` synchronizes with the stream: the GPU thread would stand
    still until every step queued before (a step launched ahead included) had run."""
    cuda = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        host = values.pin_memory() if cuda else values
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=True)


def _ints(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return host_to_device(values, device, torch.long)


def _host_ids(histories: list[Sequence[int]], vocab: int) -> torch.Tensor:
    """Histories concatenated into one CPU id tensor. Ids outside [0, vocab) become `vocab`, a
    column that gets dropped: an index past the logits' width would be a device-side assert,
    which kills the CUDA context."""
    flat = array("q")  # several times faster than torch.tensor on a list
    for history in histories:
        flat.extend(history)
    if not flat:
        return torch.empty(0, dtype=torch.long)
    ids = torch.frombuffer(flat, dtype=torch.long)
    return ids.masked_fill((ids < 0) | (ids >= vocab), vocab)


def _token_counts(
    histories: list[Sequence[int]],
    vocab: int,
    device: torch.device,
    extra: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """[R, V] float counts of each id in each row's history (plus its `extra` device ids)."""
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.float32, device=device)
    host = host_to_device(_host_ids(histories, vocab), device)
    _count_into(counts, host, [len(h) for h in histories])
    if extra:
        _count_into(counts, torch.cat(extra), [t.numel() for t in extra])
    return counts[:, :vocab]


def _count_into(counts: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> None:
    """Add rows of concatenated ids (row r holds lengths[r] of them) with one index_add."""
    if not ids.numel():
        return
    device = counts.device
    rows = torch.repeat_interleave(
        torch.arange(len(lengths), device=device),
        _ints(lengths, device),
        output_size=ids.numel(),
    )
    flat = counts.view(-1)
    flat.index_add_(0, rows * counts.shape[1] + ids, torch.ones(ids.shape, device=device))


def _repetition_penalty(
    logits: torch.Tensor, rows: list[SamplingRow], index: list[int], prompts: list[torch.Tensor]
) -> None:
    """HF semantics over prompt and output: seen tokens' logits > 0 divided, < 0 multiplied."""
    device, vocab = logits.device, logits.shape[1]
    seen = _token_counts([r.output_ids for r in rows], vocab, device, prompts) > 0
    penalty = host_to_device([r.params.repetition_penalty for r in rows], device)[:, None]
    idx = _ints(index, device)
    sub = logits[idx]
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[idx] = torch.where(seen, penalized, sub)


def _additive_penalties(logits: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> None:
    """OpenAI semantics over output tokens: presence * (count > 0) + frequency * count."""
    device, vocab = logits.device, logits.shape[1]
    counts = _token_counts([r.output_ids for r in rows], vocab, device)
    presence = host_to_device([r.params.presence_penalty for r in rows], device)[:, None]
    frequency = host_to_device([r.params.frequency_penalty for r in rows], device)[:, None]
    idx = _ints(index, device)
    logits[idx] -= presence * (counts > 0) + frequency * counts


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then an exponential race; returns token ids [R]."""
    device = logits.device
    temperature = host_to_device([r.params.temperature for r in rows], device)[:, None]
    # Subtracting the row max first keeps a tiny temperature from overflowing to inf - inf = NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature

    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        top = probs.max(dim=-1, keepdim=True).values
        threshold = host_to_device(min_p, device)[:, None] * top
        probs = probs.masked_fill(probs < threshold, 0.0)

    # argmax(p / E) with E ~ Exp(1) draws from p without normalising or a CPU sync.
    noise = torch.empty_like(probs)
    seeded = [(r, row.generator) for r, row in enumerate(rows) if row.generator is not None]
    if len(seeded) < len(rows):
        noise.exponential_()
    for r, generator in seeded:
        noise[r].exponential_(generator=generator)
    # exponential_ may return exactly 0 on some backends; 0/0 would be NaN, which argmax prefers.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """One descending sort serves both cuts; the top token always survives. Top-k alone needs
    no sort: the k-th largest value per row, from one topk, is the threshold."""
    device, vocab = logits.device, logits.shape[1]
    if all(p >= 1.0 for p in top_p) and all(0 < k < vocab for k in top_k):
        k = _ints(top_k, device)[:, None]
        largest = logits.topk(max(top_k), dim=-1).values
        threshold = largest.gather(1, k - 1)
        return logits.masked_fill(logits < threshold, _NEG_INF)
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    k = _ints([k if 0 < k < vocab else vocab for k in top_k], device)[:, None]
    cut = rank >= k
    ordered = ordered.masked_fill(cut, _NEG_INF)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = host_to_device(top_p, device, probs.dtype)[:, None]
    cut |= (mass_before > p) & (rank > 0)
    drop = torch.zeros_like(cut).scatter_(1, order, cut)
    return logits.masked_fill(drop, _NEG_INF)


class PendingSample:
    """A batch's sampled tokens (and logprobs) on their way to the host."""

    def __init__(
        self,
        device_ids: torch.Tensor,
        host: list[torch.Tensor],
        asked: list[tuple[int, int]],
        errors: dict[int, str],
    ):
        self.device_ids = device_ids
        self._host = host  # token ids, then the asked rows' chosen and top logprobs and ids
        self._asked = asked  # (row, how many top logprobs) of the rows that asked
        self._errors = errors
        self._copied: torch.cuda.Event | None = None
        if device_ids.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    @classmethod
    def launch(
        cls,
        raw: torch.Tensor,
        token_ids: torch.Tensor,
        rows: list[SamplingRow],
        errors: dict[int, str],
    ) -> PendingSample:
        """Logprobs come from the model's raw logits, before penalties and temperature (as
        vLLM)."""
        asked = [(i, n) for i, row in enumerate(rows) if (n := row.params.logprobs) is not None]
        tensors = [token_ids]
        if asked:
            idx = _ints([i for i, _ in asked], raw.device)
            log_probs = raw[idx].float().log_softmax(dim=-1)
            chosen = log_probs.gather(1, token_ids[idx][:, None])[:, 0]
            top_values, top_ids = log_probs.topk(max(n for _, n in asked), dim=-1)
            tensors += [chosen, top_values, top_ids]
        # Device to host without blocking lands in pinned memory; `result` waits for it.
        host = [t.to("cpu", non_blocking=True) for t in tensors]
        return cls(token_ids, host, asked, errors)

    def result(self) -> SamplerOutput:
        if self._copied is not None:
            self._copied.synchronize()
        tokens = self._host[0].tolist()
        logprobs: list[float | None] = [None] * len(tokens)
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * len(tokens)
        if self._asked:
            chosen, values, ids = (t.tolist() for t in self._host[1:])
            for j, (i, n) in enumerate(self._asked):
                logprobs[i] = chosen[j]
                top_logprobs[i] = list(zip(ids[j][:n], values[j][:n], strict=True))
        return SamplerOutput(tokens, logprobs, top_logprobs, self.device_ids, self._errors)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
