"""Continuous batching with split-fuse: one token budget per step, decodes first.

Plain Python. Each sequence's `num_computed_tokens` catches up with `num_tokens`: running decodes
take one token each, then unfinished prefill chunks and waiting requests share what is left of
`max_prefill_token_num`. When blocks run out the latest arrival is preempted and recomputed later.
Every status transition happens here.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from app.engine.block_manager import BlockManager
from app.engine.sequence import FinishReason, Sequence, SequenceStatus
from app.engine.sessions import SessionManager


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step, with a snapshot of what the runner reads."""

    seq: Sequence
    num_new_tokens: int
    start_pos: int  # num_computed_tokens when scheduled
    token_ids: list[int]  # the tokens computed this step
    block_table: tuple[int, ...]  # a copy: an abort may free the sequence's table mid-step
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one

    @classmethod
    def plan(cls, seq: Sequence, num_new_tokens: int, remaining: int) -> ScheduledSequence:
        """`remaining`: the tokens `seq` has without KV (its next token is sampled once a
        chunk covers them all)."""
        start = seq.num_computed_tokens
        return cls(
            seq,
            num_new_tokens,
            start,
            seq.token_ids_slice(start, start + num_new_tokens),
            tuple(seq.block_table),
            num_new_tokens == remaining,
        )


@dataclass
class SchedulerOutput:
    """Which sequences run this step and how many tokens each computes; no tensors."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    released_seq_ids: list[int] = field(default_factory=list)  # finished since the last step
    # A step scheduled ahead (`Scheduler.schedule_ahead`): the input token of its leading
    # decode i is the one the previous step sampled in its row ahead_rows[i], on the device.
    ahead_rows: list[int] | None = None
    # Scheduled ahead with budget and a batch slot to spare: a request arriving before the step
    # starts would have joined it (the engine then withdraws the step and schedules it again).
    admits_arrivals: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class StepOutput:
    """What the runner sampled, one entry per scheduled sequence with `sample` set (in order)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> chunk's
    # seq_id -> (first position, logits, hidden states): rows kept for output_logits and
    # output_last_hidden_state, float32 on the host.
    rows: dict[int, tuple[int, Any, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # seq_id -> why its sampling failed


@dataclass(slots=True)
class SequenceUpdate:
    seq: Sequence
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0  # prefill work actually done (prefix-cache hits excluded)
    generation_tokens: int = 0


class Scheduler:
    """Moves sequences between the waiting and running queues under a per-step token budget."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        sessions: SessionManager,
    ):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sessions = sessions
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        self._released: list[int] = []

    # ------------------------------------------------------------------ queues
    def add(self, seqs: list[Sequence]) -> None:
        self.waiting.extend(seqs)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        message: str | None = None,
        code: str | None = None,
    ) -> None:
        """End `seq`: free its blocks, or hand them to its session. `code` names an error the
        request caused (a client error)."""
        if seq.is_finished:
            # The detokenizer found a stop string in the token that reached the length limit:
            # the request stopped there.
            if reason is FinishReason.STOP and seq.finish_reason is FinishReason.LENGTH:
                seq.finish_reason = reason
            return
        was_running = seq.status is SequenceStatus.RUNNING
        seq.finish(reason, message, code)
        if was_running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._released.append(seq.seq_id)
        session = self.sessions.get(seq.session_id) if seq.session_id is not None else None
        if session is not None and session.busy_request == seq.request_id and seq.index == 0:
            if seq.first_scheduled_time is None:
                # The turn never ran (refused or cancelled while queued): the session is as
                # it was, its history and its KV blocks included.
                self.block_manager.free(seq)
                self.sessions.end_turn(
                    session,
                    session.history,
                    session.num_computed_tokens,
                    session.block_table,
                    session.block_hashes,
                )
            elif reason is FinishReason.ERROR:
                self.block_manager.free(seq)
                self.sessions.end_turn(session, session.history, 0, [], [])
            else:
                blocks, hashes = self.block_manager.detach(seq)
                self.sessions.end_turn(
                    session, seq.all_token_ids, seq.num_computed_tokens, blocks, hashes
                )
        else:
            self.block_manager.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    def fail_all(self, message: str) -> list[Sequence]:
        seqs = [*self.running, *self.waiting]
        for seq in seqs:
            self.finish(seq, FinishReason.ERROR, message)
        return seqs

    def fail_sampled(self, out: SchedulerOutput, errors: dict[int, str]) -> list[Sequence]:
        """End the sequences of `out` whose sampling failed (seq_id -> why); `update` then
        skips them, as it skips sequences aborted while the step ran."""
        seqs = [i.seq for i in out.scheduled if i.seq.seq_id in errors and not i.seq.is_finished]
        for seq in seqs:
            self.finish(seq, FinishReason.ERROR, errors[seq.seq_id])
        return seqs

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(released_seq_ids=self._released)
        self._released = []
        budget = self.max_num_batched_tokens
        preempted = False
        planned: dict[int, ScheduledSequence] = {}
        # Decodes first, then unfinished prefill chunks, each group in arrival order.
        decodes: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            (decodes if remaining <= 1 else chunks).append((seq, remaining))
        bs = self.block_manager.block_size
        for seq, remaining in itertools.chain(decodes, chunks):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted a moment ago
                continue
            n = min(remaining, budget)
            if (seq.num_computed_tokens + n + bs - 1) // bs <= len(seq.block_table):
                # Most decodes: the last block still has room, nothing to allocate.
                planned[seq.seq_id] = ScheduledSequence.plan(seq, n, remaining)
                budget -= n
                continue
            while not self.block_manager.can_allocate(seq, n):
                if self.sessions.release_idle_lru():
                    continue
                victim = self.running[-1]
                preempted = True
                self._preempt(victim)
                if victim is seq:
                    break
                if victim.seq_id in planned:
                    budget += planned.pop(victim.seq_id).num_new_tokens
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, n)
            planned[seq.seq_id] = ScheduledSequence.plan(seq, n, remaining)
            budget -= n

        if not preempted:
            budget = self._admit_waiting(planned, budget)
        out.scheduled = list(planned.values())
        return out

    def schedule_ahead(self, out: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `out`, scheduled while `out` still runs, before its tokens are known,
        as `schedule` would make it: each sequence that `out` samples decodes the token being
        sampled now (it reaches the step on the device: `ahead_rows`), prompt chunks that `out`
        leaves unfinished go on, and waiting requests join with what is left of the budget.

        Only when `out` carries every running sequence, no sampling depends on `out`'s token
        (grammar, penalties, bad words, min_tokens, sessions), the blocks are there without
        preempting anyone, and the head of the queue needs no running step's KV (a sibling
        sample, a session turn); otherwise None, and the next step is scheduled once the
        tokens arrive. A sequence that `out` ends by length is left out; one that `out` ends
        otherwise (eos, a stop) computes one token too many, which `update` drops."""
        items = out.scheduled
        if not items or len(items) != len(self.running):
            return None
        decodes: list[tuple[ScheduledSequence, int]] = []  # (item, its sampling row in `out`)
        chunks: list[ScheduledSequence] = []
        leaving = 0
        sample_rows = itertools.count()
        for item in items:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                return None  # aborted or finished while `out` runs
            if not item.sample:
                chunks.append(item)
                continue
            row = next(sample_rows)
            if not _independent(seq):
                return None
            if (
                seq.num_output_tokens + 1 < seq.params.max_new_tokens
                and seq.num_tokens + 1 < self.max_model_len
            ):
                decodes.append((item, row))
            else:
                leaving += 1
        # (sequence, first position, its tokens, sample) of the decodes, then of the chunks; a
        # decode's token is a placeholder for the one on the device.
        plans = [(it.seq, it.start_pos + it.num_new_tokens, [0], True) for it, _ in decodes]
        budget = self.max_num_batched_tokens - len(plans)
        for item in chunks:
            if budget == 0:
                break
            start = item.start_pos + item.num_new_tokens
            remaining = item.seq.num_tokens - start
            n = min(remaining, budget)
            plans.append(
                (item.seq, start, item.seq.token_ids_slice(start, start + n), n == remaining)
            )
            budget -= n
        head = self.waiting[0] if self.waiting else None
        slots = self.max_batch_size - len(self.running) + leaving
        if head is not None and budget > 0 and slots > 0 and not _plain(head):
            return None
        bm = self.block_manager
        needed = sum(
            max(0, bm.blocks_needed(start + len(tokens)) - len(seq.block_table))
            for seq, start, tokens, _ in plans
        )
        if needed > bm.num_free_blocks:
            return None
        planned: dict[int, ScheduledSequence] = {}
        for seq, start, tokens, sample in plans:
            n = len(tokens)
            bm.allocate(seq, start + n - seq.num_computed_tokens)
            planned[seq.seq_id] = ScheduledSequence(
                seq, n, start, tokens, tuple(seq.block_table), sample
            )
        budget = self._admit_waiting(planned, budget, leaving=leaving, ahead=True)
        if not planned:
            return None
        ahead = SchedulerOutput(
            list(planned.values()), self._released, [row for _, row in decodes] or None
        )
        ahead.admits_arrivals = (
            not self.waiting and budget > 0 and len(self.running) - leaving < self.max_batch_size
        )
        self._released = []
        return ahead

    def withdraw_ahead(self, ahead: SchedulerOutput) -> None:
        """Forget a step from `schedule_ahead` that will not run: the sequences it would have
        released are released by the next step instead. The blocks it allocated stay with their
        sequences, which fill them in the next steps; the requests it admitted stay running, and
        the next step takes up their prompts."""
        self._released[:0] = ahead.released_seq_ids

    @property
    def could_admit(self) -> bool:
        """Whether a waiting request might join the running batch now."""
        return bool(self.waiting) and len(self.running) < self.max_batch_size

    def _admit_waiting(
        self,
        planned: dict[int, ScheduledSequence],
        budget: int,
        leaving: int = 0,
        ahead: bool = False,
    ) -> int:
        """Move waiting sequences into `planned` while the budget and the batch allow; return
        the budget left. `leaving`: running sequences that end before the step runs. `ahead`
        (a step scheduled ahead of the running one): stop at a sequence that is not `_plain`."""
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) - leaving < self.max_batch_size:
            seq = self.waiting[0]
            if ahead and not _plain(seq):
                break
            self.waiting.popleft()
            parent = seq.parent
            if (
                parent is not None
                and not parent.is_finished
                and parent.num_computed_tokens < parent.num_prompt_tokens - 1
            ):
                skipped.append(seq)  # wait for the first sample to compute the shared prompt
                continue
            if not seq.block_table and seq.num_computed_tokens == 0:
                self._reuse_computed_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            while not self.block_manager.can_allocate(seq, n):
                if not self.sessions.release_idle_lru():
                    break
            if not self.block_manager.can_allocate(seq, n):
                # Hold nothing while waiting: reused blocks stay cached and are found again.
                self.block_manager.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                self.waiting.appendleft(seq)
                break
            self.block_manager.allocate(seq, n)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned[seq.seq_id] = ScheduledSequence.plan(seq, n, remaining)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _reuse_computed_prefix(self, seq: Sequence) -> None:
        """Start from KV that already exists: a sibling's, the session's, or the prefix cache's."""
        bm = self.block_manager
        session = self.sessions.get(seq.session_id) if seq.session_id is not None else None
        if seq.parent is not None and seq.parent.block_table:
            bm.fork(seq.parent, seq)
        elif session is not None and session.block_table:
            blocks, hashes, computed = self.sessions.take_blocks(session)
            bm.adopt(seq, blocks, hashes, computed)
        elif not seq.params.every_position:
            bm.match_prefix(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    # ----------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, step: StepOutput) -> list[SequenceUpdate]:
        """Advance counters, append sampled tokens, apply token-level stops."""
        updates: list[SequenceUpdate] = []
        commit = self.block_manager.commit
        prompt_logprobs = step.prompt_logprobs
        row = 0
        for item in out.scheduled:
            seq = item.seq
            if item.sample:
                sampled = (step.token_ids[row], step.logprobs[row], step.top_logprobs[row])
                row += 1
            if seq.status is SequenceStatus.FINISHED:  # aborted while the step ran
                continue
            num_prompt = len(seq.prompt_ids)
            if seq.num_computed_tokens < num_prompt:
                self.stats.prompt_tokens_computed += min(
                    item.num_new_tokens, num_prompt - seq.num_computed_tokens
                )
            seq.num_computed_tokens += item.num_new_tokens
            commit(seq)
            if prompt_logprobs:
                chunk_logprobs = prompt_logprobs.get(seq.seq_id)
                if chunk_logprobs is not None and len(seq.prompt_logprobs) == item.start_pos:
                    seq.prompt_logprobs.extend(chunk_logprobs)  # not again when recomputing
            kept = step.rows.get(seq.seq_id) if step.rows else None
            if kept is not None:
                seq.keep_rows(*kept)
            if not item.sample:
                continue
            token_id, logprob, top = sampled
            seq.output_ids.append(token_id)
            updates.append(SequenceUpdate(seq, token_id, logprob, top))
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
        self.stats.generation_tokens += len(updates)
        return updates

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        num_output = len(seq.output_ids)
        if num_output >= params.min_new_tokens and (
            token_id in params.stop_token_ids
            or (not params.ignore_eos and token_id in self.eos_token_ids)
        ):
            return FinishReason.STOP
        if num_output >= params.max_new_tokens or len(seq.prompt_ids) + num_output >= (
            self.max_model_len
        ):
            return FinishReason.LENGTH
        return None


def _plain(seq: Sequence) -> bool:
    """Whether `seq` can be admitted into a step scheduled ahead: it starts from nothing that a
    running step computes (a sibling's prompt, a session's history)."""
    return seq.parent is None and seq.session_id is None


def _independent(seq: Sequence) -> bool:
    """Whether `seq`'s next sampling needs nothing from the token sampled before it."""
    params = seq.params
    return (
        seq.grammar is None
        and seq.session_id is None
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
        and not params.bad_words_ids
        and not params.logits_processors
        and seq.num_output_tokens >= params.min_new_tokens
    )
