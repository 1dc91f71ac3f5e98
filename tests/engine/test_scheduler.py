"""Scheduler and block manager, driven by hand-built runner outputs (no torch, no model)."""

from __future__ import annotations

import itertools

import pytest

from app.engine.block_manager import BlockManager
from app.engine.config import SamplingParams
from app.engine.scheduler import Scheduler, SchedulerOutput, StepOutput
from app.engine.sequence import FinishReason, Sequence, SequenceStatus
from app.engine.sessions import SessionBusyError, SessionManager

EOS = 0
_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 16,
    max_batch: int = 8,
    prefix: bool = True,
    max_len: int = 256,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(
        bm,
        max_batch_size=max_batch,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        eos_token_ids=(EOS,),
        sessions=SessionManager(bm, ttl=60.0, max_sessions=4),
    )


def make_seq(
    prompt: list[int], max_new: int = 4, request_id: str | None = None, **params: object
) -> Sequence:
    rid = request_id or f"r{next(_ids)}"
    return Sequence(
        next(_ids),
        rid,
        0,
        list(prompt),
        SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params),
    )


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One engine step with a fake runner that samples `token` for every sampling row."""
    out = sched.schedule()
    n = sum(1 for s in out.scheduled if s.sample)
    sched.update(out, StepOutput([token] * n, [None] * n, [None] * n))
    return out


def run_to_end(sched: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while sched.has_work:
        step(sched)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    return steps


def test_split_fuse_budget_decodes_first() -> None:
    sched = make_scheduler(budget=8)
    a = make_seq(list(range(1, 5)), max_new=10)
    sched.add([a])
    step(sched)  # a prefilled in one chunk and sampled
    assert a.num_output_tokens == 1
    b = make_seq(list(range(10, 30)))  # 20 tokens: needs three steps at budget 8
    sched.add([b])
    chunks = []
    for _ in range(3):
        out = step(sched)
        by_seq = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
        assert by_seq[a.seq_id] == 1  # the decode is never stalled by the prefill
        assert out.num_tokens <= 8
        chunks.append(by_seq.get(b.seq_id, 0))
    assert chunks == [7, 7, 6]
    assert b.num_output_tokens == 1 and b.num_computed_tokens == 20


def test_prefix_cache_hit_capped_and_token_checked() -> None:
    sched = make_scheduler(block_size=4)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    a = make_seq(prompt, max_new=1)
    sched.add([a])
    run_to_end(sched)
    b = make_seq(prompt, max_new=1)
    sched.add([b])
    out = sched.schedule()
    assert b.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 1
    # Same length, different second block: only the first block matches.
    sched.update(out, StepOutput([5], [None], [None]))
    c = make_seq([*prompt[:4], 99, *prompt[5:]], max_new=1)
    sched.add([c])
    sched.schedule()
    assert c.num_cached_tokens == 4
    # Whole prompt cached: one token is still computed for its logits.
    d = make_seq(prompt[:12], max_new=1)
    sched.add([d])
    out = sched.schedule()
    assert d.num_cached_tokens == 8 and out.scheduled[-1].num_new_tokens == 4


def test_prefix_caching_off_never_hits() -> None:
    sched = make_scheduler(prefix=False)
    for _ in range(2):
        seq = make_seq(list(range(1, 14)), max_new=1)
        sched.add([seq])
        run_to_end(sched)
        assert seq.num_cached_tokens == 0
    assert sched.block_manager.stats.hits == 0


def test_preemption_recomputes_and_frees_everything() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    seqs = [make_seq([i + 1] * 5, max_new=8) for i in range(3)]
    sched.add(seqs)
    run_to_end(sched)
    assert sched.stats.num_preemptions > 0
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 8 for s in seqs)
    assert sched.block_manager.num_free_blocks == 6


def test_lru_eviction_keeps_recent_prefixes() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    old = make_seq([1] * 9, max_new=1)
    sched.add([old])
    run_to_end(sched)
    new = make_seq([2] * 9, max_new=1)
    sched.add([new])
    run_to_end(sched)
    again = make_seq([2] * 9, max_new=1)
    sched.add([again])
    sched.schedule()
    assert again.num_cached_tokens == 8


def test_abort_frees_blocks_and_skips_update() -> None:
    sched = make_scheduler()
    seq = make_seq(list(range(1, 10)), max_new=50, request_id="x")
    sched.add([seq])
    step(sched)
    out = sched.schedule()
    assert sched.abort("x") == [seq]
    sched.update(out, StepOutput([3], [None], [None]))
    assert seq.finish_reason is FinishReason.ABORT and seq.num_output_tokens == 1
    assert not sched.has_work and sched.block_manager.usage == 0.0


def test_stop_conditions() -> None:
    sched = make_scheduler()
    eos = Sequence(next(_ids), "e", 0, [1, 2, 3], SamplingParams(max_new_tokens=9))
    stop = make_seq([1, 2, 3], max_new=9, stop_token_ids=(7,))
    min_tokens = Sequence(
        next(_ids), "m", 0, [1, 2], SamplingParams(max_new_tokens=9, min_new_tokens=3)
    )
    sched.add([eos, stop, min_tokens])
    out = sched.schedule()
    sched.update(out, StepOutput([EOS, 7, EOS], [None] * 3, [None] * 3))
    assert eos.finish_reason is FinishReason.STOP and stop.finish_reason is FinishReason.STOP
    assert min_tokens.status is SequenceStatus.RUNNING  # eos before min_new_tokens: ignored


def test_max_model_len_finishes_with_length() -> None:
    sched = make_scheduler(max_len=12)
    seq = make_seq(list(range(1, 11)), max_new=100)
    sched.add([seq])
    run_to_end(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 12


def test_n_samples_share_prompt_blocks() -> None:
    sched = make_scheduler(block_size=4, prefix=False)
    prompt = list(range(1, 11))
    params = SamplingParams(n=3, max_new_tokens=2, ignore_eos=True)
    first = Sequence(next(_ids), "n", 0, prompt, params)
    others = [Sequence(next(_ids), "n", i, prompt, params, parent=first) for i in (1, 2)]
    sched.add([first, *others])
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [first]  # siblings wait for the shared prompt
    sched.update(out, StepOutput([5], [None], [None]))
    out = sched.schedule()
    for sib in others:
        assert sib.num_cached_tokens == 8 and sib.block_table[:2] == first.block_table[:2]
    assert sched.block_manager.blocks[first.block_table[0]].ref_count == 3
    run_to_end(sched)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_session_keeps_blocks_and_prefills_only_new_tokens() -> None:
    sched = make_scheduler(block_size=4)
    session = sched.sessions.begin_turn(1, "t1")
    turn1 = Sequence(
        next(_ids),
        "t1",
        0,
        [1, 2, 3, 4, 5, 6],
        SamplingParams(max_new_tokens=3, ignore_eos=True),
        session_id=1,
    )
    sched.add([turn1])
    run_to_end(sched)
    assert session.history == [1, 2, 3, 4, 5, 6, 7, 7, 7] and session.busy_request is None
    assert session.num_computed_tokens == 8 and len(session.block_table) == 2
    sched.sessions.begin_turn(1, "t2")
    with pytest.raises(SessionBusyError):
        sched.sessions.begin_turn(1, "t3")
    turn2 = Sequence(
        next(_ids),
        "t2",
        0,
        [*session.history, 8, 9],
        SamplingParams(max_new_tokens=1, ignore_eos=True),
        session_id=1,
    )
    sched.add([turn2])
    before = sched.stats.prompt_tokens_computed
    run_to_end(sched)
    # Only the last history token (sampled, never fed) and the two new tokens are computed.
    assert sched.stats.prompt_tokens_computed - before == 3
    assert sched.sessions.end(1) is not None
    assert sched.block_manager.usage == 0.0


def test_idle_session_blocks_released_under_pressure() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.sessions.begin_turn(1, "s")
    turn = Sequence(
        next(_ids),
        "s",
        0,
        list(range(1, 9)),
        SamplingParams(max_new_tokens=1, ignore_eos=True),
        session_id=1,
    )
    sched.add([turn])
    run_to_end(sched)
    assert sched.block_manager.usage > 0
    big = make_seq(list(range(20, 33)), max_new=1)
    sched.add([big])
    run_to_end(sched)
    assert big.finish_reason is FinishReason.LENGTH
    assert sched.sessions.get(1).block_table == []  # released, history kept
    assert sched.sessions.get(1).history
