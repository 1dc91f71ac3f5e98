"""Grammar constraints inside the engine loop: which sampling rows a step constrains, their
token masks, and what each sampled token does to its sequence's matcher and reasoning gate."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from app.engine.scheduler import Scheduler, SchedulerOutput
from app.engine.sequence import UNSATISFIABLE_GRAMMAR, FinishReason, Sequence


def grammar_rows(out: SchedulerOutput) -> list[Sequence | None]:
    """Each sampling row's constrained sequence (None where unconstrained now), or [] if no
    row is constrained."""
    rows = [
        item.seq if item.seq.grammar is not None and item.seq.grammar_gate is None else None
        for item in out.scheduled
        if item.sample
    ]
    return rows if any(seq is not None for seq in rows) else []


def fill_masks(rows: list[Sequence | None], allowed: Future[Any], vocab_size: int) -> None:
    """Resolve `allowed` to the rows' bool masks `[rows, vocab]` (or to the error)."""
    from app.engine.grammar import allocate_bitmask, bitmask_to_bool

    try:
        bitmask = allocate_bitmask(len(rows), vocab_size)
        for row, seq in enumerate(rows):
            if seq is not None:
                seq.grammar.fill_bitmask(bitmask, row)
        mask = bitmask_to_bool(bitmask, vocab_size)
        for row, seq in enumerate(rows):
            if seq is not None and seq.reasoning_open is not None:
                mask[row, seq.reasoning_open[0]] = True
        allowed.set_result(mask)
    except Exception as exc:
        allowed.set_exception(exc)


def accept_token(scheduler: Scheduler, seq: Sequence, token_id: int) -> None:
    """Advance `seq`'s matcher (or its reasoning gate) by a sampled token; a rejected token
    fails the sequence, a completed grammar stops it."""
    if seq.grammar is None or seq.is_finished:
        return
    if seq.reasoning_open is not None:  # the first token: does the model open a section?
        opener, closing = seq.reasoning_open
        seq.reasoning_open = None
        if token_id == opener:
            seq.grammar_gate = closing
            return
    gate = seq.grammar_gate
    if gate is not None:  # still reasoning: the grammar starts after the closing tag
        if tuple(seq.output_ids[-len(gate) :]) == gate:
            seq.grammar_gate = None
        return
    if not seq.grammar.accept_token(token_id):
        if seq.grammar.allows_nothing():  # the request's grammar, not the engine, is at fault
            message = (
                "the grammar cannot be continued after the output so far: no token of this "
                "model's vocabulary matches what it requires next"
            )
            scheduler.finish(seq, FinishReason.ERROR, message, code=UNSATISFIABLE_GRAMMAR)
        else:
            scheduler.finish(seq, FinishReason.ERROR, "the grammar rejected a token")
    elif seq.grammar.is_terminated():
        scheduler.finish(seq, FinishReason.STOP)
