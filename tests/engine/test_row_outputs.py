"""GenerationConfig.output_logits / output_last_hidden_state against transformers' forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app import GenerationConfig, pipeline
from app.api import Pipeline
from app.engine.config import EngineConfig
from app.engine.model_runner import PendingStep
from app.engine.scheduler import StepOutput

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def forward(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final hidden states of every position of `ids`."""
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        return out.logits[0], out.hidden_states[-1][0]

    return forward


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    # A 16-token budget splits the prompts below into chunks; 24 blocks of 16 force preemption.
    config = EngineConfig(block_size=16, num_gpu_blocks=24, max_prefill_token_num=16)
    with pipeline(str(tiny_model_dir), backend_config=config) as p:
        yield p


def greedy(n: int, **rows: str) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, top_k=1, ignore_eos=True, **rows)


def test_generation_rows_are_the_steps_that_sampled_each_token(pipe: Pipeline, reference) -> None:
    prompt = list(range(300, 340))
    out = pipe(
        prompt,
        gen_config=greedy(6, output_logits="generation", output_last_hidden_state="generation"),
    )
    assert out.logits is not None and out.last_hidden_state is not None
    assert out.logits.shape == (6, 49152) and out.logits.dtype == torch.float32
    assert out.last_hidden_state.shape == (6, 64)
    assert out.logits.argmax(dim=-1).tolist() == out.token_ids
    logits, hidden = reference(prompt + out.token_ids[:-1])
    torch.testing.assert_close(out.logits, logits[len(prompt) - 1 :], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        out.last_hidden_state, hidden[len(prompt) - 1 :], atol=ATOL, rtol=RTOL
    )


def test_all_rows_cover_every_position_and_skip_the_prefix_cache(pipe: Pipeline, reference) -> None:
    prompt = list(range(500, 548))  # three full blocks: a prefix-cache hit for a second run
    pipe(prompt, gen_config=greedy(2))
    before = pipe.engine.stats()["prompt_tokens_computed"]
    out = pipe(
        prompt, gen_config=greedy(5, output_logits="all", output_last_hidden_state="generation")
    )
    assert pipe.engine.stats()["prompt_tokens_computed"] - before == len(prompt)
    assert out.logits.shape == (len(prompt) + 4, 49152)
    assert out.last_hidden_state.shape == (5, 64)
    logits, hidden = reference(prompt + out.token_ids[:-1])
    torch.testing.assert_close(out.logits, logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        out.last_hidden_state, hidden[len(prompt) - 1 :], atol=ATOL, rtol=RTOL
    )


def test_rows_in_a_batch_with_preemption(pipe: Pipeline, reference) -> None:
    """Neighbours that ask for nothing, prompt logprobs and each kind of rows share steps; the
    pool is too small for all of them, so some are preempted and recomputed."""
    prompts = [list(range(1000 + 50 * i, 1000 + 50 * i + 30 + i)) for i in range(8)]
    kinds = [
        {},
        {"output_logits": "all"},
        {"output_last_hidden_state": "all"},
        {"output_logits": "generation"},
    ]
    configs = [greedy(40, **kinds[i % 4]) for i in range(8)]
    preemptions = pipe.engine.stats()["num_preemptions"]
    results = pipe(prompts, gen_config=configs)
    assert pipe.engine.stats()["num_preemptions"] > preemptions
    for prompt, config, out in zip(prompts, configs, results, strict=True):
        assert out.generate_token_len == 40
        logits, hidden = reference(prompt + out.token_ids[:-1])
        if config.output_logits is None:
            assert out.logits is None
        else:
            first = 0 if config.output_logits == "all" else len(prompt) - 1
            torch.testing.assert_close(out.logits, logits[first:], atol=ATOL, rtol=RTOL)
        if config.output_last_hidden_state is None:
            assert out.last_hidden_state is None
        else:
            torch.testing.assert_close(out.last_hidden_state, hidden, atol=ATOL, rtol=RTOL)


def test_stream_infer_hands_rows_on_the_last_delta(pipe: Pipeline) -> None:
    deltas = list(pipe.stream_infer([1, 2, 3, 4], gen_config=greedy(4, output_logits="generation")))
    assert all(d.logits is None for d in deltas[:-1])
    assert deltas[-1].logits.shape == (4, 49152)
    assert deltas[-1].logits.argmax(dim=-1).tolist() == [t for d in deltas for t in d.token_ids]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GenerationConfig(output_logits="last"), "output_logits must be 'all', 'generation'"),
        (GenerationConfig(output_last_hidden_state=True), "output_last_hidden_state must be"),
        (GenerationConfig(n=2, output_logits="all"), "needs n == 1"),
    ],
)
def test_bad_row_settings_are_refused(
    pipe: Pipeline, config: GenerationConfig, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pipe([1, 2, 3], gen_config=config)


def test_rows_staged_on_the_way_to_the_host_are_handed_on_as_copies() -> None:
    """A GPU step copies a decode row into pinned memory without a wait; collecting the step
    hands the request a copy in ordinary memory, so the pinned buffer goes back to be reused."""
    step = StepOutput()
    staged, kept = torch.arange(6.0).reshape(2, 3), torch.ones(1, 3)
    step.rows = {7: (4, staged, None), 8: (2, kept, kept)}
    rows = PendingStep(step, staged=[7]).result().rows
    first, logits, hidden = rows[7]
    assert (first, hidden) == (4, None)
    assert torch.equal(logits, staged) and logits.data_ptr() != staged.data_ptr()
    assert rows[8][1] is kept  # read with a wait: already in ordinary memory
