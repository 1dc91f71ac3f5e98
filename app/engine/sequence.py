"""One generated stream: its tokens, KV block table, progress counters and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from app.engine.config import SamplingParams


class SequenceStatus(enum.Enum):
    """WAITING -> RUNNING <-> PREEMPTED(waiting again) -> FINISHED; the scheduler moves them."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# The error code of a request whose grammar the vocabulary cannot continue.
UNSATISFIABLE_GRAMMAR = "unsatisfiable_grammar"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Sequence:
    """A request's sample: prompt + output tokens, how many have KV computed, and its blocks.

    `num_computed_tokens` catches up with `num_tokens` under the scheduler's token budget: a
    prefill chunk computes many tokens, a decode computes one. There is no prefill phase.
    """

    seq_id: int
    request_id: str
    index: int  # sample index within the request (n > 1)
    prompt_ids: list[int]
    params: SamplingParams
    session_id: int | None = None
    parent: Sequence | None = None  # n > 1: siblings wait for the first sample's prompt blocks
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    finish_message: str | None = None
    # An error the request itself caused (e.g. UNSATISFIABLE_GRAMMAR): a client error, not the
    # engine's.
    finish_code: str | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prompt_logprobs: list[float] = field(default_factory=list)
    # output_logits / output_last_hidden_state: float32 CPU tensors of consecutive positions'
    # rows from `rows_start` (0 for "all", else the last prompt position) up to `rows_end`.
    kept_logits: list[Any] = field(default_factory=list)
    kept_hidden: list[Any] = field(default_factory=list)
    rows_start: int | None = None
    rows_end: int = 0
    grammar: Any = None  # the sequence's grammar matcher, when its output is constrained
    # Token ids that end a reasoning section: the grammar applies only after they were sampled.
    grammar_gate: tuple[int, ...] | None = None
    # (open token, closing ids): the model may open a reasoning section with its first token;
    # until that token is sampled the first step allows it beside the grammar's tokens.
    reasoning_open: tuple[int, tuple[int, ...]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt_len]

    def keep_rows(self, first_pos: int, logits: Any, hidden: Any) -> None:
        """Keep a step's rows (positions `first_pos` on) of those not kept yet: a prefill that
        recomputes a preempted sequence repeats positions whose rows are already here."""
        if self.rows_start is None:
            start = 0 if self.params.all_rows else len(self.prompt_ids) - 1
            self.rows_start = self.rows_end = start
        count = (logits if logits is not None else hidden).shape[0]
        skip = self.rows_end - first_pos
        if skip < 0:
            raise RuntimeError(f"rows of positions {self.rows_end}..{first_pos - 1} never came")
        if skip >= count:
            return
        if logits is not None:
            self.kept_logits.append(logits[skip:])
        if hidden is not None:
            self.kept_hidden.append(hidden[skip:])
        self.rows_end = first_pos + count

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(
        self, reason: FinishReason, message: str | None = None, code: str | None = None
    ) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_message = message
        self.finish_code = code
