"""Steps scheduled ahead of their predecessor's tokens give exactly the tokens of the plain
order: greedy and seeded sampling, length limits, stop tokens, sequences ending mid-batch, and
prompts admitted or chunked in a step ahead; in a GPU's order the step ahead is launched before
those tokens are collected; a request that arrives takes back a queued step so that it joins
the next one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import AsyncEngine
from app.engine.handoff import Gate
from app.engine.scheduler import SchedulerOutput

T = TypeVar("T")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> AsyncEngine:
    eng = AsyncEngine(str(tiny_model_dir), EngineConfig(block_size=16, max_prefill_token_num=256))
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def recording_ahead(engine: AsyncEngine, ahead: bool) -> Iterator[list[SchedulerOutput]]:
    """The steps scheduled ahead inside the block (none without `ahead`), from a cold prefix
    cache so that both orders do the same work."""
    engine.block_manager.reset_prefix_cache()
    scheduler = engine.scheduler
    original = scheduler.schedule_ahead
    steps: list[SchedulerOutput] = []

    def recorded(out):  # type: ignore[no-untyped-def]
        nxt = original(out) if ahead else None
        if nxt is not None:
            steps.append(nxt)
        return nxt

    scheduler.schedule_ahead = recorded  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        scheduler.schedule_ahead = original  # type: ignore[method-assign]


async def collect_tokens(
    engine: AsyncEngine, ids: list[int], params: SamplingParams, grammar: object = None
) -> list[int]:
    stream = engine.generate(ids, params, grammar=grammar)  # type: ignore[arg-type]
    return [token async for out in stream for token in out.token_ids]


async def stopping(engine: AsyncEngine, body: Awaitable[T]) -> T:
    """`body`'s result, the engine loop stopped afterwards (it lives on this asyncio loop)."""
    try:
        return await body
    finally:
        await engine.stop()


def generate_all(
    engine: AsyncEngine, requests: list[tuple[list[int], SamplingParams]], ahead: bool
) -> tuple[list[list[int]], list[SchedulerOutput]]:
    """Every request's tokens, and the steps that were scheduled ahead."""

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect_tokens(engine, ids, p) for ids, p in requests))

    with recording_ahead(engine, ahead) as steps:
        return asyncio.run(stopping(engine, main())), steps


def test_ahead_matches_the_plain_order(engine: AsyncEngine) -> None:
    greedy = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 9, 20, 33)
    ]
    seeded = [
        SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
        for s in (1, 2)
    ]
    requests = [(list(range(10 + i, 40 + 3 * i)), p) for i, p in enumerate(greedy + seeded)]
    plain, none_ahead = generate_all(engine, requests, ahead=False)
    overlapped, ahead = generate_all(engine, requests, ahead=True)
    assert not none_ahead and len(ahead) > 10
    assert overlapped == plain
    assert [len(t) for t in plain] == [3, 9, 20, 33, 25, 25]


def test_on_a_gpu_the_step_ahead_is_launched_before_the_tokens_come_back(
    engine: AsyncEngine,
) -> None:
    """Where launching only queues work (a GPU's), each step scheduled ahead is launched before
    the tokens of the step it follows are collected, so the device does not wait for the host
    between the two; every token is the plain order's."""
    greedy = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (5, 17)]
    seeded = SamplingParams(max_new_tokens=15, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    requests = [(list(range(10, 40)), greedy[0]), (list(range(100, 400)), greedy[1])]
    requests.append((list(range(500, 520)), seeded))
    plain, _ = generate_all(engine, requests, ahead=False)
    runner, launch = engine.runner, engine.runner.launch
    events: list[tuple[str, SchedulerOutput]] = []

    def logged(out, *args):  # type: ignore[no-untyped-def]  # the GPU thread
        pending = launch(out, *args)
        events.append(("launch", out))
        result = pending.result

        def logged_result():  # type: ignore[no-untyped-def]
            events.append(("result", out))
            return result()

        pending.result = logged_result
        return pending

    runner.launch = logged
    engine._block_for_launch = True  # the order the engine takes on a GPU
    try:
        overlapped, ahead = generate_all(engine, requests, ahead=True)
    finally:
        runner.launch = launch
        engine._block_for_launch = runner.device.type == "cuda"
    assert overlapped == plain
    at = {(kind, id(out)): i for i, (kind, out) in enumerate(events)}
    launched = [out for kind, out in events if kind == "launch"]
    follows = [(a, b) for a, b in itertools.pairwise(launched) if any(b is x for x in ahead)]
    assert len(follows) > 10
    assert all(at["launch", id(b)] < at["result", id(a)] for a, b in follows)


def test_a_stop_token_ends_the_sequence_at_the_same_place(engine: AsyncEngine) -> None:
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    prompt = list(range(50, 80))
    (free,), _ = generate_all(engine, [(prompt, greedy)], ahead=False)
    stop = free[12]  # the sequence is mid-batch when this comes: a step ahead is in flight
    params = SamplingParams(
        max_new_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,)
    )
    longer = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    requests = [(prompt, params), (list(range(90, 100)), longer)]
    plain, _ = generate_all(engine, requests, ahead=False)
    overlapped, ahead = generate_all(engine, requests, ahead=True)
    assert ahead
    assert overlapped == plain
    assert overlapped[0] == free[: free.index(stop) + 1]
    assert len(overlapped[1]) == 40


def test_sampling_that_reads_the_history_is_not_scheduled_ahead(engine: AsyncEngine) -> None:
    penalized = SamplingParams(
        max_new_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3
    )
    late_eos = SamplingParams(max_new_tokens=12, temperature=0.0, min_new_tokens=12)
    for params in (penalized, late_eos):
        plain, _ = generate_all(engine, [(list(range(5, 25)), params)], ahead=False)
        overlapped, ahead = generate_all(engine, [(list(range(5, 25)), params)], ahead=True)
        assert overlapped == plain
        assert not ahead


def test_prompts_admitted_and_chunked_ahead_match_the_plain_order(engine: AsyncEngine) -> None:
    """Prompts longer than the step budget (256) go on in steps scheduled ahead, and requests
    that could not join the first step join steps ahead, the running decodes' tokens arriving
    on the device meanwhile."""
    requests = [
        (
            [(37 * i + 11 * j) % 40000 + 100 for j in range(60 + 97 * i)],
            SamplingParams(max_new_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True),
        )
        for i in range(8)
    ]
    plain, _ = generate_all(engine, requests, ahead=False)
    overlapped, ahead = generate_all(engine, requests, ahead=True)
    assert overlapped == plain
    assert [len(t) for t in plain] == [6 + 3 * i for i in range(8)]
    mixed = [out for out in ahead if out.ahead_rows and len(out.scheduled) > len(out.ahead_rows)]
    assert any(item.start_pos == 0 for out in mixed for item in out.scheduled)
    assert any(item.num_new_tokens > 1 for out in mixed for item in out.scheduled)


def test_a_grammar_request_admitted_ahead_samples_under_its_mask(engine: AsyncEngine) -> None:
    """A constrained request that waits while a plain one fills the first step (its 256 prompt
    tokens are the whole budget) joins the step scheduled ahead; its first token, sampled there,
    already obeys the grammar, and every token is the one the plain order gives."""
    from app.engine.grammar_spec import GrammarSpec

    compiled = engine.grammar_compiler.compile_sync(GrammarSpec.for_regex("[ab]+"))
    plain_params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    # Without the mask the bias would make token 1234 the answer every step.
    constrained = SamplingParams(
        max_new_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=((1234, 100.0),)
    )

    def run_both(ahead: bool) -> tuple[list[list[int]], list[SchedulerOutput]]:
        async def main() -> list[list[int]]:
            return await asyncio.gather(
                collect_tokens(engine, list(range(300, 556)), plain_params),
                collect_tokens(engine, [100, 101, 102], constrained, compiled),
            )

        with recording_ahead(engine, ahead) as steps:
            return asyncio.run(stopping(engine, main())), steps

    plain, _ = run_both(ahead=False)
    overlapped, steps = run_both(ahead=True)
    assert overlapped == plain
    assert re.fullmatch("[ab]+", engine.tokenizer.decode(overlapped[1]))
    first = steps[0].scheduled
    assert [(item.start_pos, item.num_new_tokens, item.sample) for item in first] == [
        (256, 1, True),  # the plain request's first decode, its token on the device
        (0, 3, True),  # the constrained request, admitted and sampled under its mask
    ]


def test_prompt_logprobs_of_chunks_scheduled_ahead(engine: AsyncEngine) -> None:
    """A 600-token prompt in chunks of the 256-token budget, the later chunks scheduled ahead:
    the prompt's logprobs are those of the plain order, one per token after the first."""
    params = SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=True)
    prompt = [(7 * j) % 30000 + 100 for j in range(600)]

    def prompt_logprobs(ahead: bool) -> tuple[list[float], int]:
        async def main() -> list[float]:
            outputs = [out async for out in engine.generate(prompt, params, stream=False)]
            return outputs[-1].prompt_logprobs or []

        with recording_ahead(engine, ahead) as steps:
            return asyncio.run(stopping(engine, main())), len(steps)

    plain, _ = prompt_logprobs(ahead=False)
    overlapped, ahead = prompt_logprobs(ahead=True)
    assert ahead >= 2
    assert len(plain) == len(prompt) - 1
    assert overlapped == pytest.approx(plain, abs=1e-5)


def test_a_request_arriving_takes_back_the_queued_step(engine: AsyncEngine) -> None:
    """While step k runs with step k+1 queued ahead of it, a new request withdraws k+1 and is
    prefilled in the next step rather than the one after; nobody's tokens change."""
    long = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    prompt_a, prompt_b = list(range(60, 90)), list(range(200, 220))
    (alone_a, alone_b), _ = generate_all(engine, [(prompt_a, long), (prompt_b, short)], False)
    runner, original = engine.runner, engine.runner.launch
    steps: list[set[str]] = []
    seen: dict[str, object] = {}

    async def consume(ids: list[int], params: SamplingParams, request_id: str) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(ids, params, request_id=request_id):
            tokens += out.token_ids
        return tokens

    async def arrive() -> None:  # on the loop, while step k is still "running"
        seen["b"] = asyncio.create_task(consume(prompt_b, short, "b"))
        while not any(seq.request_id == "b" for seq in engine.scheduler.waiting):
            await asyncio.sleep(0)

    def launch(out, *args):  # type: ignore[no-untyped-def]  # the GPU thread
        result = original(out, *args)
        steps.append({item.seq.request_id for item in out.scheduled})
        if len(steps) == 6:  # "a" decodes alone; wait until the next step is queued ahead
            deadline = time.monotonic() + 10
            while engine._queued is None and time.monotonic() < deadline:
                time.sleep(0.001)
            seen["queued"] = engine._queued is not None
            asyncio.run_coroutine_threadsafe(arrive(), seen["loop"]).result(10)
        return result

    async def main() -> tuple[list[int], list[int]]:
        seen["loop"] = asyncio.get_running_loop()
        try:
            tokens_a = await consume(prompt_a, long, "a")
            return tokens_a, await seen["b"]
        finally:
            await engine.stop()

    runner.launch = launch
    try:
        tokens_a, tokens_b = asyncio.run(main())
    finally:
        runner.launch = original
    assert seen["queued"]
    assert steps[5] == {"a"} and "b" in steps[6]  # not only in steps[7]
    assert (tokens_a, tokens_b) == (alone_a, alone_b)


def test_a_queued_step_either_starts_or_is_withdrawn() -> None:
    started = Gate()
    assert started.start() and not started.withdraw() and not started.withdrawn
    withdrawn = Gate()
    assert withdrawn.withdraw() and not withdrawn.start() and withdrawn.withdrawn
