"""Steps scheduled ahead of their predecessor's tokens, driven by a fake device that computes
like a model (each sample depends on every token in the sequence's KV): decodes, unfinished
prompt chunks and new arrivals in the step ahead give exactly the tokens of the plain order,
also when some of those steps are taken back before they run."""

from __future__ import annotations

import itertools
import random

import pytest

from app.engine.block_manager import BlockManager
from app.engine.config import SamplingParams
from app.engine.scheduler import Scheduler, SchedulerOutput, StepOutput
from app.engine.sequence import Sequence, SequenceStatus
from app.engine.sessions import SessionManager

EOS = 3


class FakeDevice:
    """Holds each sequence's KV as the tokens written to it; a step ahead reads its leading
    decodes' tokens from the previous step's samples, as the runner does on the GPU."""

    def __init__(self) -> None:
        self.kv: dict[int, list[int]] = {}
        self.last: list[int] = []

    def run(self, out: SchedulerOutput) -> StepOutput:
        samples: list[int] = []
        ahead = out.ahead_rows or []
        for i, item in enumerate(out.scheduled):
            seq = item.seq
            kv = self.kv.setdefault(seq.seq_id, [])
            if item.start_pos < len(kv):  # recomputed after a preemption
                del kv[item.start_pos :]
            if item.start_pos > len(kv):  # a prefix found in the cache (or a sibling's)
                kv[:] = seq.all_token_ids[: item.start_pos]
            tokens = [self.last[ahead[i]]] if i < len(ahead) else list(item.token_ids)
            assert len(tokens) == item.num_new_tokens
            kv.extend(tokens)
            if item.sample:
                samples.append(random.Random(hash(tuple(kv))).randrange(3, 40))
        self.last = samples
        n = len(samples)
        return StepOutput(samples, [None] * n, [None] * n)


def make_scheduler(num_blocks: int) -> Scheduler:
    bm = BlockManager(num_blocks, 4)
    return Scheduler(
        bm,
        max_batch_size=4,
        max_num_batched_tokens=16,
        max_model_len=128,
        eos_token_ids=(EOS,),
        sessions=SessionManager(bm, ttl=60.0, max_sessions=4),
    )


def make_requests(seed: int) -> list[list[Sequence]]:
    """Twelve requests arriving over the first steps: long prompts (chunked at budget 16),
    stop tokens and eos (a step ahead computes one token too many), a repetition penalty (never
    ahead), and n=2 (a sibling waits for its parent's prompt)."""
    rng = random.Random(seed)
    ids = itertools.count()
    requests: list[list[Sequence]] = []
    for r in range(12):
        prompt = [rng.randrange(5, 40) for _ in range(rng.randint(3, 40))]
        extra: dict = {}
        if r % 4 == 1:
            extra = {"stop_token_ids": (rng.randrange(3, 40),)}
        elif r == 6:
            extra = {"repetition_penalty": 1.2}
        params = SamplingParams(
            max_new_tokens=rng.randint(1, 14), ignore_eos=r % 3 != 0, n=2 if r == 8 else 1, **extra
        )
        seqs = [Sequence(next(ids), f"r{r}", 0, prompt, params)]
        if params.n == 2:
            seqs.append(Sequence(next(ids), f"r{r}", 1, prompt, params, parent=seqs[0]))
        requests.append(seqs)
    return requests


def drive(
    sched: Scheduler, requests: list[list[Sequence]], ahead: bool, withdraw_every: int = 0
) -> list[SchedulerOutput]:
    """The engine loop's order: schedule the next step while the current one runs, then update.
    Request k arrives before step k; with `withdraw_every` n, every n-th step scheduled ahead is
    taken back before it runs (as when a request arrives). Returns the steps that ran ahead."""
    device = FakeDevice()
    pending = list(requests)
    scheduled_ahead: list[SchedulerOutput] = []
    out: SchedulerOutput | None = None
    for steps in itertools.count():
        assert steps < 500, "no progress"
        if pending:
            sched.add(pending.pop(0))
        if out is None:
            if not sched.has_work:
                break
            out = sched.schedule()
            assert out, "nothing runs although work waits"
        nxt = sched.schedule_ahead(out) if ahead else None
        if nxt is not None and withdraw_every and steps % withdraw_every == 0:
            sched.withdraw_ahead(nxt)
            nxt = None
        sched.update(out, device.run(out))
        if nxt is not None:
            scheduled_ahead.append(nxt)
        out = nxt
    for seqs in requests:
        for seq in seqs:
            assert device.kv[seq.seq_id] == seq.all_token_ids[: len(device.kv[seq.seq_id])]
    return scheduled_ahead


@pytest.mark.parametrize("withdraw_every", [0, 3])
@pytest.mark.parametrize("num_blocks", [64, 14])  # 14: requests are preempted
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steps_ahead_give_the_tokens_of_the_plain_order(
    num_blocks: int, seed: int, withdraw_every: int
) -> None:
    plain_requests, ahead_requests = make_requests(seed), make_requests(seed)
    plain = make_scheduler(num_blocks)
    assert not drive(plain, plain_requests, ahead=False)
    sched = make_scheduler(num_blocks)
    steps = drive(sched, ahead_requests, ahead=True, withdraw_every=withdraw_every)

    def outputs(requests: list[list[Sequence]]) -> list[tuple[list[int], str | None]]:
        return [(s.output_ids, s.finish_reason) for seqs in requests for s in seqs]

    assert outputs(ahead_requests) == outputs(plain_requests)
    assert all(s.status is SequenceStatus.FINISHED for seqs in ahead_requests for s in seqs)
    assert sched.block_manager.num_free_blocks == num_blocks
    # Steps ahead did more than decode: they admitted requests and went on with chunks.
    assert any(item.start_pos == 0 for out in steps for item in out.scheduled)
    assert any(out.ahead_rows and len(out.scheduled) > len(out.ahead_rows) for out in steps)


def test_a_step_ahead_admits_what_schedule_would() -> None:
    sched = make_scheduler(64)
    a = Sequence(0, "a", 0, list(range(5, 25)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    sched.add([a])
    out = sched.schedule()  # a's first 16 prompt tokens
    b = Sequence(1, "b", 0, list(range(5, 17)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    sched.add([b])
    nxt = sched.schedule_ahead(out)
    assert nxt is not None and nxt.ahead_rows is None  # nothing sampled in `out`
    assert [(s.seq.seq_id, s.start_pos, s.num_new_tokens, s.sample) for s in nxt.scheduled] == [
        (0, 16, 4, True),  # the rest of a's prompt
        (1, 0, 12, True),  # b, with what is left of the budget
    ]
    assert nxt.scheduled[0].token_ids == list(range(21, 25))
    assert not nxt.admits_arrivals  # the budget is spent: an arrival would not have joined
    sched.update(out, StepOutput())
    sched.update(nxt, StepOutput([7, 8], [None] * 2, [None] * 2))
    third = sched.schedule_ahead(nxt)
    assert third is not None and third.ahead_rows == [0, 1]
    assert [(s.start_pos, s.num_new_tokens) for s in third.scheduled] == [(20, 1), (12, 1)]
    assert third.admits_arrivals


def test_a_sibling_or_session_turn_at_the_head_is_scheduled_the_usual_way() -> None:
    sched = make_scheduler(64)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a = Sequence(0, "a", 0, [5, 6, 7], params)
    sched.add([a])
    out = sched.schedule()
    parent = Sequence(1, "b", 0, [9, 10, 11], SamplingParams(max_new_tokens=4, n=2))
    child = Sequence(2, "b", 1, [9, 10, 11], parent.params, parent=parent)
    sched.add([child])
    assert sched.schedule_ahead(out) is None
    sched.waiting.clear()
    sched.add([Sequence(3, "c", 0, [9, 10], params, session_id=1)])
    assert sched.schedule_ahead(out) is None
