"""AsyncEngine mechanics on a tiny random model: sessions, aborts, n > 1, injected faults."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from app import GenerationConfig, pipeline
from app.api import ADMIT_BATCH
from app.engine.builder import default_max_batch_size
from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import AsyncEngine, RequestOutput, SessionBusyError
from app.engine.heap import FULL_COLLECTION_EVERY

LONG = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> AsyncEngine:
    eng = AsyncEngine(str(tiny_model_dir), EngineConfig(block_size=16, max_prefill_token_num=64))
    yield eng
    eng.shutdown()


def run(engine: AsyncEngine, body: Callable[[], Awaitable[object]]) -> object:
    async def main() -> object:
        try:
            return await body()
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(
    engine: AsyncEngine, ids: list[int], params: SamplingParams, **kwargs: object
) -> list[RequestOutput]:
    return [out async for out in engine.generate(ids, params, **kwargs)]


def idle(engine: AsyncEngine) -> bool:
    stats = engine.stats()
    return stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0


def test_open_batch_cap_is_chosen_at_start(engine: AsyncEngine) -> None:
    # The fixture leaves max_batch_size at 0: the device's default applies everywhere.
    chosen = default_max_batch_size(engine.runner.device)  # 128 on the CPU
    assert engine.config.max_batch_size == engine.scheduler.max_batch_size == chosen


def test_engine_defers_full_collections_until_shutdown(tiny_model_dir: Path) -> None:
    before = gc.get_threshold()
    eng = AsyncEngine(str(tiny_model_dir), EngineConfig(block_size=16))
    try:
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] == max(before[2], FULL_COLLECTION_EVERY)
        assert gc.get_freeze_count() > 0
    finally:
        eng.shutdown()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_large_batch_starts_stepping_while_it_is_admitted(tiny_model_dir: Path) -> None:
    # The pipeline lets the engine loop run between groups of admissions: the first step is
    # scheduled before all the prompts are checked into the engine (counted when it is
    # scheduled, not when the GPU thread gets to run it).
    with pipeline(str(tiny_model_dir), backend_config=EngineConfig(block_size=16)) as pipe:
        scheduler = pipe.engine.scheduler
        schedule = scheduler.schedule
        admitted: list[int] = []

        def counted():  # type: ignore[no-untyped-def]
            admitted.append(pipe.engine.num_requests)
            return schedule()

        scheduler.schedule = counted
        prompts = [[100 + i, 200 + i, 300 + i] for i in range(8 * ADMIT_BATCH)]
        results = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=2, ignore_eos=True))
    assert admitted[0] < len(prompts)
    assert [r.generate_token_len for r in results] == [2] * len(prompts)


def test_pipeline_checks_each_prompt_once(tiny_model_dir: Path) -> None:
    # All prompts are checked before any starts; the engine does not check them again.
    with pipeline(str(tiny_model_dir), backend_config=EngineConfig(block_size=16)) as pipe:
        checked: list[list[int]] = []
        validate = pipe.engine.validate

        def counted(prompt_ids, *args):  # type: ignore[no-untyped-def]
            checked.append(list(prompt_ids))
            return validate(prompt_ids, *args)

        pipe.engine.validate = counted
        prompts = [[100, 200, 300], [101, 201]]
        config = GenerationConfig(max_new_tokens=2, ignore_eos=True)
        assert [r.generate_token_len for r in pipe(prompts, gen_config=config)] == [2, 2]
        assert len(pipe.get_ppl(prompts)) == 2
    assert checked == prompts + prompts


def test_pipeline_logits_processors(tiny_model_dir: Path) -> None:
    def count_up(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[int(ids[-1]) + 1] = 0.0
        return forced

    def broken(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a bug in the user's processor")

    plain = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    with pipeline(str(tiny_model_dir), backend_config=EngineConfig(block_size=16)) as pipe:
        config = GenerationConfig(max_new_tokens=6, ignore_eos=True, logits_processors=[count_up])
        outs = pipe([[100, 200], [300], [7, 8, 9]], gen_config=[config, plain, config])
        assert outs[0].token_ids == [201, 202, 203, 204, 205, 206]
        assert outs[2].token_ids == [10, 11, 12, 13, 14, 15]
        sampled = GenerationConfig(
            max_new_tokens=3, do_sample=True, temperature=1.5, logits_processors=count_up
        )
        assert pipe([40], gen_config=sampled).token_ids == [41, 42, 43]
        with pytest.raises(ValueError, match="logits_processors must be callables"):
            pipe([1], gen_config=GenerationConfig(logits_processors=["nope"]))
        failing = GenerationConfig(max_new_tokens=2, logits_processors=[broken])
        with pytest.raises(RuntimeError, match="raised RuntimeError: a bug in the user's"):
            pipe([1, 2], gen_config=failing)
        # Only its own request fails: the neighbours in its steps finish as they would alone.
        deltas = list(pipe.stream_infer([[300], [1, 2], [7, 8, 9]], [plain, failing, config]))
        last = {d.index: d for d in deltas}
        assert last[1].finish_reason == "error"
        tokens = {i: [t for d in deltas if d.index == i for t in d.token_ids] for i in (0, 2)}
        assert tokens == {0: outs[1].token_ids, 2: outs[2].token_ids}
        assert pipe([300], gen_config=plain).token_ids == outs[1].token_ids  # serving on


def test_a_grammar_the_vocabulary_cannot_continue_fails_its_request_only(
    tiny_model_dir: Path,
) -> None:
    # xgrammar finds no token for this unassigned code point: the regex dead-ends after "a".
    dead_end = {"type": "regex_schema", "regex_schema": "a\U000a24d7"}
    with pipeline(str(tiny_model_dir), backend_config=EngineConfig(block_size=16)) as pipe:
        config = GenerationConfig(max_new_tokens=8, response_format=dead_end)
        with pytest.raises(ValueError, match="the grammar cannot be continued"):
            pipe([5, 6, 7], gen_config=config)
        neighbour = GenerationConfig(max_new_tokens=8, ignore_eos=True)
        deltas = list(pipe.stream_infer([[5, 6, 7], [8, 9]], gen_config=[config, neighbour]))
        last = {d.index: d for d in deltas}
        assert last[0].finish_reason == "error"
        assert last[1].finish_reason == "length" and last[1].generate_token_len == 8


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_quantized_cache_greedy_is_the_same_batched_chunked_and_from_the_prefix_cache(
    tiny_model_dir: Path, quant_policy: int
) -> None:
    """Every key and value is read back quantized, whoever wrote it: through an int8 or int4
    cache, greedy tokens are the same for a prompt alone in one prefill, batched in chunks of
    16 tokens, and continuing from another request's cached blocks."""
    shared = list(range(100, 148))  # three blocks of 16
    prompts = [[*shared, 7, 8, 9], [*shared, 10, 11], list(range(300, 340))]
    greedy = GenerationConfig(max_new_tokens=8, top_k=1, ignore_eos=True)

    def answers(batched: bool, **config: object) -> list[list[int]]:
        engine = EngineConfig(block_size=16, quant_policy=quant_policy, **config)
        with pipeline(str(tiny_model_dir), backend_config=engine) as pipe:
            if batched:
                return [r.token_ids for r in pipe(prompts, gen_config=greedy)]
            outs = [pipe(prompt, gen_config=greedy).token_ids for prompt in prompts]
            if config.get("enable_prefix_caching", True):
                assert pipe.engine.stats()["prefix_cache_hits"] > 0
            return outs

    alone = answers(False, enable_prefix_caching=False)
    assert answers(True, enable_prefix_caching=False, max_prefill_token_num=16) == alone
    assert answers(False) == alone  # the second prompt starts from the first's blocks


def test_pipeline_log_level_and_unknown_arguments(tiny_model_dir: Path) -> None:
    logger = logging.getLogger("splitfuse")
    previous = logger.level
    try:
        with pipeline(str(tiny_model_dir), log_level="error") as pipe:
            assert logger.level == logging.ERROR
            assert pipe([1, 2, 3], gen_config=GenerationConfig(max_new_tokens=1)).text is not None
    finally:
        logger.setLevel(previous)
    with pytest.raises(ValueError, match="log_level must be"):
        pipeline(str(tiny_model_dir), log_level="loud")
    with pytest.raises(TypeError, match="chat_template_config"):
        pipeline(str(tiny_model_dir), chat_template_config=None)  # type: ignore[call-arg]


def test_session_turns_prefill_only_new_tokens(engine: AsyncEngine) -> None:
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)

    async def body() -> None:
        turn1 = await collect(engine, list(range(100, 140)), params, session_id=7)
        assert turn1[-1].history_tokens == 0 and turn1[-1].prompt_tokens == 40
        before = engine.stats()["prompt_tokens_computed"]
        turn2 = await collect(engine, list(range(200, 210)), params, session_id=7)
        computed = engine.stats()["prompt_tokens_computed"] - before
        assert turn2[-1].history_tokens == 45 and turn2[-1].prompt_tokens == 10
        # The 10 new tokens, plus turn 1's last sampled token whose KV was never computed.
        assert computed == 11
        assert engine.end_session(7)
        assert not engine.end_session(7)

    run(engine, body)
    assert engine.block_manager.usage == 0.0


def test_session_turn_past_session_len_ends_with_length(tiny_model_dir: Path) -> None:
    eng = AsyncEngine(str(tiny_model_dir), EngineConfig(block_size=16, session_len=64))
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)

    async def body() -> None:
        await collect(eng, list(range(100, 130)), params, session_id=1)
        second = await collect(eng, list(range(100, 130)), params, session_id=1)
        assert second[-1].finish_reason == "length"
        assert second[-1].completion_tokens < 20
        # The refused turn left the session as it was (50 tokens), blocks and all: a short
        # third turn runs until the session is full.
        third = await collect(eng, [5], params, session_id=1)
        assert third[-1].history_tokens == 50
        assert third[-1].finish_reason == "length" and third[-1].completion_tokens == 64 - 51
        assert third[-1].cached_tokens == 49

    run(eng, body)
    eng.shutdown()


def test_concurrent_turn_on_busy_session_refused(engine: AsyncEngine) -> None:
    async def body() -> None:
        first = engine.generate(list(range(100, 120)), LONG, session_id=3)
        await first.__anext__()
        with pytest.raises(SessionBusyError):
            await collect(engine, [5, 6], LONG, session_id=3)
        await first.aclose()  # leaving the stream aborts the turn
        assert idle(engine)
        assert engine.scheduler.sessions.get(3).busy_request is None
        engine.end_session(3)

    run(engine, body)
    assert engine.block_manager.usage == 0.0


def test_abort_frees_blocks_and_ends_stream(engine: AsyncEngine) -> None:
    async def body() -> None:
        stream = engine.generate(list(range(100, 150)), LONG, request_id="abort-me")
        await stream.__anext__()
        assert engine.stats()["num_requests_running"] == 1
        assert engine.abort("abort-me")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "abort"
        assert idle(engine) and engine.block_manager.usage == 0.0

    run(engine, body)


def test_n_samples_share_prompt_and_differ(engine: AsyncEngine) -> None:
    params = SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)

    async def body() -> list[RequestOutput]:
        return await collect(engine, list(range(100, 180)), params)

    outputs = run(engine, body)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in outputs:
        tokens[out.index] += out.token_ids
    assert all(len(t) == 8 for t in tokens.values())
    assert len({tuple(t) for t in tokens.values()}) == 3
    finals = [o for o in outputs if o.finish_reason is not None]
    assert sorted(o.index for o in finals) == [0, 1, 2]
    assert all(o.cached_tokens >= 64 for o in finals if o.index > 0)


# A failed forward pass, or a bug in the bookkeeping after a step (the scheduler's update), must
# not end the engine loop: the requests in flight fail, the next one is served.
@pytest.mark.parametrize(("method", "logged"), [("forward", "step"), ("update", "update")])
def test_a_failure_fails_inflight_and_engine_recovers(
    engine: AsyncEngine, monkeypatch, method: str, logged: str
) -> None:
    owner = engine.runner.model if method == "forward" else engine.scheduler
    original = getattr(owner, method)
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"injected {method} failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, flaky)

    async def body() -> None:
        results = await asyncio.gather(
            *(collect(engine, list(range(100 + i, 130)), LONG) for i in range(3))
        )
        for outputs in results:
            assert outputs[-1].finish_reason == "error"
            assert "injected" not in (outputs[-1].error or "")  # no internals leak
        assert engine.last_error == f"engine {logged} failed: RuntimeError"
        assert idle(engine) and engine.block_manager.usage == 0.0
        ok = await collect(
            engine, [100, 101, 102], SamplingParams(max_new_tokens=3, temperature=0.0)
        )
        assert ok[-1].finish_reason in ("stop", "length")
        assert engine.last_error is None

    run(engine, body)


def test_detokenizer_exception_fails_only_its_request(engine: AsyncEngine, monkeypatch) -> None:
    async def body() -> None:
        good = asyncio.ensure_future(collect(engine, list(range(100, 120)), LONG))
        bad_stream = engine.generate(list(range(300, 320)), LONG, request_id="bad")
        first = await bad_stream.__anext__()
        sample = engine._requests["bad"].samples[0]

        def boom(ids: object) -> tuple[str, bool]:
            raise RuntimeError("injected")

        monkeypatch.setattr(sample.detokenizer, "step", boom)
        rest = [first] + [out async for out in bad_stream]
        assert rest[-1].finish_reason == "error"
        outputs = await good
        assert outputs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outputs) == 64

    run(engine, body)


@pytest.mark.parametrize(
    ("ids", "params", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([10**6], SamplingParams(), "vocabulary"),
        ([5, -1, 7], SamplingParams(), r"id -1 is outside"),
        ([5, 2.0, 7], SamplingParams(), r"id 2\.0 is outside"),
        ([5, "7"], SamplingParams(), r"id '7' is outside"),
        ([1, 2], SamplingParams(n=99), "n must"),
        ([1, 2], SamplingParams(logprobs=1000), "logprobs"),
        ([1, 2], SamplingParams(logit_bias=((10**7, 1.0),)), "logit_bias"),
        ([1, 2], SamplingParams(stop_strings=("x",) * 100), "stop strings"),
        ([1, 2], SamplingParams(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"),
        ([1, 2], SamplingParams(top_k=-1), "top_k"),
        ([1, 2], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_validation(
    engine: AsyncEngine, ids: list[int], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.validate(ids, params)


def test_grammar_applies_after_the_reasoning_gate(engine: AsyncEngine) -> None:
    from app.engine.grammar_spec import GrammarSpec

    gate = 1234
    compiled = engine.grammar_compiler.compile_sync(GrammarSpec.for_regex("[ab]+"))
    # The bias makes the gate token the model's first choice every step; once it has been
    # sampled the grammar takes over and only "a"/"b" text may follow.
    params = SamplingParams(
        max_new_tokens=12, temperature=0.0, ignore_eos=True, logit_bias=((gate, 100.0),)
    )

    async def body() -> list[int]:
        outputs = await collect(
            engine, [100, 101, 102], params, grammar=compiled, grammar_after=[gate], stream=False
        )
        return outputs[-1].token_ids

    tokens = run(engine, body)
    assert tokens[0] == gate
    assert re.fullmatch("[ab]+", engine.tokenizer.decode(tokens[1:]))
    unconstrained = run(engine, lambda: collect(engine, [100, 101, 102], params, stream=False))
    assert unconstrained[-1].token_ids == [gate] * 12  # without the grammar: the bias wins


def test_model_may_open_a_reasoning_section_before_the_grammar(engine: AsyncEngine) -> None:
    from app.engine.grammar_spec import GrammarSpec

    opener, closer = 1234, 1235
    compiled = engine.grammar_compiler.compile_sync(GrammarSpec.for_regex("[ab]+"))

    def first_run(bias: float) -> list[int]:
        params = SamplingParams(
            max_new_tokens=12, temperature=0.0, ignore_eos=True, logit_bias=((opener, bias),)
        )

        async def body() -> list[int]:
            outputs = await collect(
                engine,
                [100, 101, 102],
                params,
                grammar=compiled,
                grammar_after=[closer],
                reasoning_open=opener,
                stream=False,
            )
            return outputs[-1].token_ids

        return run(engine, body)

    # The opener is allowed beside the grammar's tokens on the first step only; once sampled,
    # the section runs unconstrained (the bias keeps winning, the closer never comes).
    assert first_run(100.0) == [opener] * 12
    # A model that does not open one is held to the grammar from its first token.
    tokens = first_run(-100.0)
    assert re.fullmatch("[ab]+", engine.tokenizer.decode(tokens))
