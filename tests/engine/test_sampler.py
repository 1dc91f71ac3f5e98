"""The batched sampler against straightforward per-row references."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from app.engine.config import SamplingParams
from app.engine.sampler import Sampler, SamplingRow, costliest_rows

EOS = (2,)
NEG_INF = float("-inf")


def make_row(
    params: SamplingParams,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    seed: int | None = None,
) -> SamplingRow:
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return SamplingRow(params, list(prompt), list(output), generator, EOS)


def reference_process(
    logits: torch.Tensor, row: SamplingRow, allowed: torch.Tensor | None
) -> torch.Tensor:
    x = logits.clone()
    p, output = row.params, list(row.output_ids)
    for tok, bias in p.logit_bias:
        x[tok] += bias
    for tok in p.bad_token_ids:
        x[tok] = NEG_INF
    for word in p.bad_words_ids:
        prefix = list(word[:-1])
        if len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix:
            x[word[-1]] = NEG_INF
    if len(output) < p.min_new_tokens:
        for tok in (*row.eos_token_ids, *p.stop_token_ids):
            x[tok] = NEG_INF
    for tok in set(row.prompt_ids) | set(output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok, count in Counter(output).items():
        x[tok] -= p.presence_penalty + p.frequency_penalty * count
    if allowed is not None:
        x[~allowed] = NEG_INF
    return x


def reference_keep(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens that temperature, top-k, top-p and min-p (HF order) leave with nonzero probability."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda t: -probs[t].item())
    if p.top_k:
        order = order[: p.top_k]
    mass = sum(probs[t].item() for t in order)
    kept, cumulative = [], 0.0
    for t in order:
        if kept and cumulative > p.top_p:
            break
        kept.append(t)
        cumulative += probs[t].item() / mass
    top = probs[kept[0]].item()
    return {t for t in kept if probs[t].item() >= p.min_p * top}


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    word = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 3)))
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0]),
        logit_bias=tuple(
            (rng.randrange(vocab), rng.uniform(-5, 5)) for _ in range(rng.randint(0, 3))
        ),
        bad_token_ids=tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 2))),
        bad_words_ids=(word,) if rng.random() < 0.5 else (),
        min_new_tokens=rng.choice([0, 3]),
        max_new_tokens=16,
        stop_token_ids=(rng.randrange(vocab),) if rng.random() < 0.5 else (),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.7]),
    )


def test_processors_match_per_row_reference() -> None:
    rng = random.Random(0)
    vocab = 40
    for trial in range(30):
        n = rng.randint(1, 6)
        rows = []
        for _ in range(n):
            output = tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 6)))
            prompt = tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 6)))
            rows.append(make_row(random_params(rng, vocab), prompt, output))
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * 3
        allowed = torch.rand(n, vocab) < 0.8 if trial % 2 else None
        got = Sampler()._process(logits, rows, allowed, {})
        for i, row in enumerate(rows):
            want = reference_process(logits[i], row, None if allowed is None else allowed[i])
            if torch.isneginf(want).all():
                continue  # the all-banned fallback, tested separately
            torch.testing.assert_close(got[i], want)


def test_cached_prompt_follows_the_prompt_list() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    logits = torch.tensor([[4.0, 3.0, 2.5, 0.0]])
    prompt = [0]
    sampler = Sampler()
    assert sampler(logits, [SamplingRow(params, prompt, [], None, EOS)]).token_ids == [1]
    assert sampler(logits, [SamplingRow(params, prompt, [1], None, EOS)]).token_ids == [2]
    prompt.append(2)  # a changed prompt is sent again, not served stale
    assert sampler(logits, [SamplingRow(params, prompt, [1], None, EOS)]).token_ids == [0]
    assert sampler(logits, [SamplingRow(params, [0, 1, 2], [], None, EOS)]).token_ids == [0]


def test_bad_words_multi_token() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0
    logits[0, 8] = 4.0
    logits[0, 9] = 3.0
    params = SamplingParams(temperature=0.0, bad_words_ids=((5, 6, 7), (8,)))
    sampler = Sampler()
    assert sampler(logits, [make_row(params, output=(1, 5, 6))]).token_ids == [9]
    assert sampler(logits, [make_row(params, output=(5, 6, 1))]).token_ids == [7]
    assert sampler(logits, [make_row(params, output=(6,))]).token_ids == [7]
    # The prefix lives in the output only: a prompt ending with it does not ban the word.
    assert sampler(logits, [make_row(params, prompt=(5, 6), output=())]).token_ids == [7]


def test_min_new_tokens_bans_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 2] = 9.0  # EOS
    logits[0, 4] = 8.0  # a stop token
    logits[0, 6] = 1.0
    params = SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=(4,))
    sampler = Sampler()
    assert sampler(logits, [make_row(params, output=())]).token_ids == [6]
    assert sampler(logits, [make_row(params, output=(6,))]).token_ids == [6]
    assert sampler(logits, [make_row(params, output=(6, 6))]).token_ids == [2]


def test_greedy_equals_argmax_in_a_mixed_batch() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0.0)
    top1 = SamplingParams(temperature=0.7, top_k=1)
    sampled = SamplingParams(temperature=1.0)
    rows = [make_row([greedy, top1, sampled][i % 3]) for i in range(8)]
    out = Sampler()(logits, rows)
    want = logits.argmax(dim=-1).tolist()
    assert [t for i, t in enumerate(out.token_ids) if i % 3 != 2] == [
        t for i, t in enumerate(want) if i % 3 != 2
    ]
    plain = Sampler()(logits, [make_row(greedy)] * 8)
    assert plain.token_ids == want
    assert plain.logprobs == [None] * 8 and plain.top_logprobs == [None] * 8


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    vocab, steps = 500, 12
    step_logits = [
        torch.randn(vocab, generator=torch.Generator().manual_seed(s)) for s in range(steps)
    ]
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=7)
    sampler = Sampler()

    def run_alone(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        tokens = []
        for logits in step_logits:
            row = SamplingRow(params, [1], list(tokens), generator, EOS)
            tokens.append(sampler(logits[None], [row]).token_ids[0])
        return tokens

    alone = run_alone(123)
    rng = random.Random(5)
    for _ in range(4):
        generator = torch.Generator().manual_seed(123)
        tokens: list[int] = []
        for logits in step_logits:
            others = [
                make_row(
                    SamplingParams(temperature=rng.choice([0.0, 1.0]), top_k=rng.choice([0, 5])),
                    seed=rng.choice([None, rng.randrange(1000)]),
                )
                for _ in range(rng.randint(0, 7))
            ]
            at = rng.randint(0, len(others))
            rows = [
                *others[:at],
                SamplingRow(params, [1], list(tokens), generator, EOS),
                *others[at:],
            ]
            batch = torch.randn(len(rows), vocab)
            batch[at] = logits
            tokens.append(sampler(batch, rows).token_ids[at])
        assert tokens == alone
    assert run_alone(124) != alone


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.5, top_p=0.6),
        SamplingParams(temperature=0.8, min_p=0.2),
        SamplingParams(temperature=2.0, top_k=10, top_p=0.7, min_p=0.05),
        SamplingParams(temperature=1.0, top_p=1e-6),
    ],
)
def test_truncation_never_samples_outside_the_kept_set(params: SamplingParams) -> None:
    torch.manual_seed(0)
    vocab, draws = 50, 4000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    keep = reference_keep(logits, params)
    out = Sampler()(logits.expand(draws, vocab).contiguous(), [make_row(params)] * draws)
    seen = set(out.token_ids)
    assert seen <= keep
    assert len(seen) == len(keep)  # every kept token shows up in this many draws


def test_allowed_mask_is_respected() -> None:
    torch.manual_seed(0)
    n, vocab = 400, 30
    logits = torch.randn(n, vocab) * 3
    allowed = torch.rand(n, vocab) < 0.3
    allowed[:, 0] = True  # no empty rows here
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.9, top_p=0.9, min_p=0.1),
    ]
    out = Sampler()(logits, [make_row(params[i % 3]) for i in range(n)], allowed)
    assert all(allowed[i, t] for i, t in enumerate(out.token_ids))


def test_logits_processors_see_the_ids_and_the_penalized_scores() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    seen: list[tuple[list[int], torch.Tensor]] = []

    def favour_last_id_plus_one(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append((ids.tolist(), scores.clone()))
        boosted = scores.clone()
        boosted[(int(ids[-1]) + 1) % 10] += 100.0
        return boosted

    biased = SamplingParams(
        temperature=0.0, logit_bias=((4, 5.0),), logits_processors=(favour_last_id_plus_one,)
    )
    rows = [
        make_row(biased, prompt=(3, 5), output=(7,)),
        make_row(SamplingParams(temperature=0.0), prompt=(1,)),
        make_row(
            SamplingParams(temperature=1.0, logits_processors=(favour_last_id_plus_one,)),
            prompt=(8,),
            seed=1,
        ),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == 8 and out.token_ids[2] == 9
    assert out.token_ids[1] == int(logits[1].argmax())  # a row without processors as it was
    assert [ids for ids, _ in seen] == [[3, 5, 7], [8]]
    expected = logits[0].clone()
    expected[4] += 5.0  # the bias comes first
    torch.testing.assert_close(seen[0][1], expected)


def test_a_failing_logits_processor_fails_its_row_only() -> None:
    """A wrong shape is named, an exception's type and message kept; the other rows sample."""

    def broken(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise KeyError("oops")

    rows = [
        make_row(SamplingParams(logits_processors=(lambda ids, scores: scores[:3],)), prompt=(1,)),
        make_row(SamplingParams(temperature=0.0), prompt=(1,)),
        make_row(SamplingParams(logits_processors=(broken,)), prompt=(1,)),
    ]
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    out = Sampler()(logits, rows)
    assert out.errors == {
        0: "a logits processor returned a tensor of shape [3], not [10] scores",
        2: "a logits processor raised KeyError: 'oops'",
    }
    assert out.token_ids[1] == int(logits[1].argmax())


def test_distribution_matches_softmax_over_temperature() -> None:
    torch.manual_seed(1234)
    vocab, draws, temperature = 8, 20000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2])
    out = Sampler()(
        logits.expand(draws, vocab).contiguous(),
        [make_row(SamplingParams(temperature=temperature))] * draws,
    )
    counts = Counter(out.token_ids)
    expected = torch.softmax(logits / temperature, dim=-1) * draws
    chi2 = sum((counts[t] - expected[t].item()) ** 2 / expected[t].item() for t in range(vocab))
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_all_banned_rows_fall_back_without_nan() -> None:
    vocab = 6
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 3)
    everything = SamplingParams(temperature=0.0, bad_token_ids=tuple(range(vocab)))
    sampled = SamplingParams(temperature=1.0, bad_token_ids=tuple(range(vocab)))
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[0, 1] = allowed[1, 2] = True
    out = Sampler()(
        logits, [make_row(everything), make_row(sampled), make_row(everything)], allowed
    )
    # The grammar mask outranks the bans; an empty mask falls back to the raw logits.
    assert out.token_ids == [1, 2, 5]
    out = Sampler()(logits[:1], [make_row(sampled)])
    assert 0 <= out.token_ids[0] < vocab


def test_tiny_temperature_is_argmax() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2)) * 30
    out = Sampler()(logits, [make_row(SamplingParams(temperature=1e-6))] * 64)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_logprobs_come_from_raw_logits() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    rows = [
        make_row(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5), prompt=(1,)),
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(temperature=0.5, logprobs=0), seed=1),
        make_row(SamplingParams(temperature=1.0, logprobs=5)),
    ]
    out = Sampler()(logits, rows)
    want = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    for i, k in ((0, 3), (2, 0), (3, 5)):
        assert out.logprobs[i] == pytest.approx(want[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert top is not None and len(top) == k
        values, ids = want[i].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


def test_costliest_rows_sample_through_every_transform() -> None:
    # What the start-up profiling pass samples to size memory: it must run and obey its cuts.
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = 100.0  # banned, so never drawn however likely
    out = Sampler()(logits, costliest_rows(3, 4))
    assert len(out.token_ids) == 3 and 0 not in out.token_ids
    assert all(top is not None and len(top) == 4 for top in out.top_logprobs)


def test_bfloat16_logits_sample_as_their_float32_widening() -> None:
    # The model hands over its own dtype; everything the sampler transforms is widened first.
    rng = random.Random(3)
    vocab = 300
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(2)).bfloat16()
    logits[0, :5] = 4.0  # a tie: the first index wins either way

    def rows() -> list[SamplingRow]:
        generated = [
            make_row(random_params(random.Random(i), vocab), prompt=(1, 2), output=(3, 4), seed=i)
            for i in range(8)
        ]
        extra = [
            make_row(SamplingParams(temperature=0.0)),
            make_row(SamplingParams(temperature=0.0, logprobs=3)),
            make_row(SamplingParams(temperature=0.9, top_k=7, top_p=0.8), seed=rng.randrange(99)),
            make_row(SamplingParams(temperature=1.2, min_p=0.1, logprobs=2), seed=5),
        ]
        return [*generated, *extra]

    allowed = torch.rand(12, vocab, generator=torch.Generator().manual_seed(4)) < 0.5
    state = rng.getstate()
    narrow = Sampler()(logits, rows(), allowed)
    rng.setstate(state)
    wide = Sampler()(logits.float(), rows(), allowed)
    assert narrow.token_ids == wide.token_ids
    assert narrow.logprobs == wide.logprobs and narrow.top_logprobs == wide.top_logprobs
    # Rows that only sample (no processor applies, so the logits come through untouched).
    params = SamplingParams(temperature=0.8, top_p=0.9)
    narrow = Sampler()(logits, [make_row(params, seed=i) for i in range(12)])
    wide = Sampler()(logits.float(), [make_row(params, seed=i) for i in range(12)])
    assert narrow.token_ids == wide.token_ids
    plain = Sampler()(logits, [make_row(SamplingParams(temperature=0.0))] * 12)
    assert plain.token_ids == logits.float().argmax(dim=-1).tolist() and plain.token_ids[0] == 0
