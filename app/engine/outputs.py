"""What the engine streams back per request: deltas of text, tokens and logprobs."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.sequence import FinishReason, Sequence


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely first


@dataclass
class RequestOutput:
    """One delta of one sample (`index`) of a request; `finish_reason` is set on its last delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int  # tokens of this turn's input (a session's history excluded)
    completion_tokens: int  # cumulative
    cached_tokens: int  # prompt tokens whose KV was reused (prefix cache, sibling or session)
    history_tokens: int = 0  # a session's tokens before this turn
    prompt_logprobs: list[float] | None = None  # on a sample's first delta, when asked for
    # output_logits / output_last_hidden_state, on the last delta: float32 [rows, vocab or
    # hidden], one row per generated token ("generation") or per position ("all").
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    error: str | None = None  # the reason, when finish_reason is "error"
    error_code: str | None = None  # set when the request itself caused the error
    queue_seconds: float | None = None  # on the last delta: arrival to first schedule

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by the same sample's next one, as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = [*(self.logprobs or ()), *(later.logprobs or ())]
        return dataclasses.replace(
            later,
            text=self.text + later.text,
            token_ids=[*self.token_ids, *later.token_ids],
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
        )


@dataclass
class SampleState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    done: bool = False
    started: bool = False  # a delta was sent
    undecoded: list[int] = field(default_factory=list)  # sampled, not yet turned into text
    # Without streaming, the whole answer is gathered here and sent once, at the end.
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestState:
    """A request's samples and the queue its caller reads deltas from."""

    request_id: str
    samples: list[SampleState]
    history_len: int = 0
    stream: bool = True  # False: one output per sample, when it finishes
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples)

    def emit(
        self,
        sample: SampleState,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
    ) -> None:
        seq = sample.seq
        finish = seq.finish_reason.value if seq.finish_reason is not None else None
        if not self.stream:
            sample.text.append(text)
            sample.token_ids.extend(token_ids)
            sample.logprobs.extend(logprobs or ())
            if finish is None:
                return
            text, token_ids = "".join(sample.text), sample.token_ids
            logprobs = sample.logprobs if seq.params.logprobs is not None else None
        if finish is not None:
            sample.done = True
        elif not text and not token_ids:
            return
        started, sample.started = sample.started, True
        self.queue.put_nowait(
            RequestOutput(
                request_id=self.request_id,
                index=seq.index,
                text=text,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=finish,
                prompt_tokens=seq.num_prompt_tokens - self.history_len,
                completion_tokens=seq.num_output_tokens,
                cached_tokens=seq.num_cached_tokens,
                history_tokens=self.history_len,
                # Complete once the first token is sampled; siblings share the first sample's.
                prompt_logprobs=(seq.parent or seq).prompt_logprobs
                if seq.params.prompt_logprobs and not started
                else None,
                logits=_kept(seq, seq.kept_logits, seq.params.output_logits) if finish else None,
                last_hidden_state=(
                    _kept(seq, seq.kept_hidden, seq.params.output_last_hidden_state)
                    if finish
                    else None
                ),
                error=seq.finish_message if seq.finish_reason is FinishReason.ERROR else None,
                error_code=seq.finish_code if seq.finish_reason is FinishReason.ERROR else None,
                queue_seconds=(
                    seq.first_scheduled_time - seq.arrival_time
                    if finish and seq.first_scheduled_time is not None
                    else None
                ),
            )
        )


def _kept(seq: Sequence, rows: list[torch.Tensor], mode: str | None) -> torch.Tensor | None:
    """A finished sequence's kept rows as one tensor: every position's for "all", those of the
    generated tokens (the last prompt position's on) for "generation"."""
    if mode is None:
        return None
    if not rows:
        return torch.empty(0)
    kept = torch.cat(rows)
    if mode == "generation" and seq.rows_start is not None:
        kept = kept[len(seq.prompt_ids) - 1 - seq.rows_start :]
    return kept
