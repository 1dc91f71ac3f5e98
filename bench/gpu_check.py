"""Engine correctness on a GPU: greedy tokens and logits against transformers on the same device.

    python bench/gpu_check.py            # random small Llama/Qwen2 models, fp32 and bf16
    python bench/gpu_check.py --model M  # a model with real weights (a directory or a .gguf)
                                         # on chat prompts, each answer ending at its eos

For each model: transformers' greedy continuation of several prompts (one at a time) against
splitfuse's in one batch, with chunked prefill, the prefix cache and CUDA graphs (and eager),
and one prompt at a time (batch-1 decodes: the smallest graph, the one-row linears); then with an
int8 and an int4 KV cache against the same engine on the CPU (reported only). Reported as the
share of matching tokens; exits 1 if fp32 matches less than 90%, or if the logits and hidden
states that requests ask for (`output_logits`, `output_last_hidden_state`) differ from
transformers'.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine.trace import TRACE_ENV
from bench.common import write_word_tokenizer


def make_model(kind: str, root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**shape))
    with torch.no_grad():  # sharper logits than the default init, so argmax is not a coin toss
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    out = root / kind
    model.save_pretrained(out, safe_serialization=True)
    write_word_tokenizer(out, shape["vocab_size"])
    return out


def chat_prompts(model_dir: Path) -> list[list[int]]:
    """Chat-templated questions of a few to ~60 tokens, as token ids."""
    from transformers import AutoTokenizer

    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Hi",
        "Explain in one sentence why the sky is blue, and name the scattering effect.",
        "List the planets of the solar system in order from the sun, with one fact about each.",
    ]
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def reference(
    model_dir: Path, prompts: list[list[int]], new: int, dtype: torch.dtype, until_eos: bool
) -> list:
    """transformers' greedy tokens, one prompt at a time: `new` of them, or up to and including
    the eos token when `until_eos`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    length = {} if until_eos else {"min_new_tokens": new}
    outs = []
    for ids in prompts:
        t = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            gen = model.generate(
                t,
                attention_mask=torch.ones_like(t),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **length,
            )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def ours(
    model_dir: Path,
    prompts: list[list[int]],
    new: int,
    dtype: str,
    eager: bool,
    budget: int,
    one_at_a_time: bool = False,
    quant_policy: int = 0,
    device: str = "auto",
    until_eos: bool = False,
) -> tuple[list, dict]:
    from app import EngineConfig, GenerationConfig, pipeline

    config = EngineConfig(
        dtype=dtype,
        device=device,
        quant_policy=quant_policy,
        eager_mode=eager,
        max_prefill_token_num=budget,
        block_size=64,
        max_batch_size=32,
    )
    with pipeline(str(model_dir), backend_config=config) as pipe:
        gen = GenerationConfig(max_new_tokens=new, top_k=1, ignore_eos=not until_eos)
        if one_at_a_time:  # batch-1 decodes: the bucket-1 graph and the one-row linears
            first = [pipe([ids], gen_config=gen)[0] for ids in prompts]
            again = [pipe([ids], gen_config=gen)[0] for ids in prompts]
        else:
            first = pipe(prompts, gen_config=gen)
            again = pipe(prompts, gen_config=gen)  # prefix-cache hits this time
        stats = pipe.engine.stats()
    stats["same_with_prefix_cache"] = [r.token_ids for r in first] == [r.token_ids for r in again]
    return [r.token_ids for r in first], stats


def share_equal(got: list[list[int]], ref: list[list[int]]) -> float:
    """The share of positions with equal tokens; a shorter answer's missing tokens count as
    unequal."""
    pairs = [
        (a, b)
        for g, r in zip(got, ref, strict=True)
        for a, b in itertools.zip_longest(g, r, fillvalue=-1)
    ]
    return sum(a == b for a, b in pairs) / len(pairs)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def check_model(
    name: str, model_dir: Path, prompts: list[list[int]], new: int, until_eos: bool
) -> bool:
    """Print each mode's agreement with transformers; True if float32 fails (under 90% of
    tokens equal, or different answers on a second run through the prefix cache)."""
    failed = False
    ref32 = reference(model_dir, prompts, new, torch.float32, until_eos)
    ref16 = reference(model_dir, prompts, new, torch.bfloat16, until_eos)
    for dtype, ref in (("float32", ref32), ("bfloat16", ref16)):
        modes = ((False, 8192, False), (True, 256, False), (False, 64, False))
        for eager, budget, alone in (*modes, (False, 8192, True)):
            got, stats = ours(
                model_dir, prompts, new, dtype, eager, budget, alone, until_eos=until_eos
            )
            exact = got == ref
            share = share_equal(got, ref)
            label = f"{name} {dtype} {'eager' if eager else 'graphs'} budget {budget}"
            label += " batch 1" if alone else ""
            bad = dtype == "float32" and share < 0.9
            status = "ok" if exact else ("FAIL" if bad else "differs")
            print(
                f"{label:<40} tokens equal: {share:6.1%}  {status}  "
                f"(prefix hits {stats['prefix_cache_hits']}, same with them: "
                f"{stats['same_with_prefix_cache']})",
                flush=True,
            )
            failed |= bad or (dtype == "float32" and not stats["same_with_prefix_cache"])
    # An int8 / int4 KV cache (quant_policy=8 / 4), reported, not judged: its rounding noise
    # alone moves most greedy tokens of a random-weight model (near-tied logits) even against
    # the same engine on the CPU; `bench/kernels.py` checks the quantized kernels against the
    # torch reference at real shapes, and the CPU tests the bundled model's answers.
    for bits, budget in itertools.product((8, 4), (8192, 64)):
        quant = {"quant_policy": bits, "until_eos": until_eos}
        got, _ = ours(model_dir, prompts, new, "float32", False, budget, **quant)
        cpu, _ = ours(
            model_dir, prompts, new, "float32", True, budget, False, device="cpu", **quant
        )
        agree = [first_difference(g, c) for g, c in zip(got, cpu, strict=True)]
        print(
            f"{name + f' float32 int{bits} KV budget {budget}':<40} tokens equal: "
            f"{share_equal(got, cpu):6.1%} vs the CPU's int{bits} (first difference at "
            f"{agree}); {share_equal(got, ref32):6.1%} vs transformers (float32 KV)",
            flush=True,
        )
    return failed


# Requests for rows, in turn beside requests that ask for nothing: logits of the generated
# tokens alone (their decode steps replay the CUDA graphs), then with hidden states and every
# position's rows (their steps run eagerly).
ROW_KINDS: dict[str, list[dict[str, str]]] = {
    "graphed": [{}, {"output_logits": "generation"}],
    "eager": [
        {},
        {"output_logits": "generation"},
        {"output_logits": "all", "output_last_hidden_state": "all"},
        {"output_last_hidden_state": "generation"},
    ],
}


def check_rows(name: str, model_dir: Path, prompts: list[list[int]], mode: str) -> bool:
    """`output_logits` / `output_last_hidden_state` on the GPU, float32: each kept row against
    transformers' forward pass over the same tokens, for the requests of ROW_KINDS[mode]. True
    if a row's shape or values (relative to the largest value, 1e-3) are off."""
    from transformers import AutoModelForCausalLM

    from app import EngineConfig, GenerationConfig, pipeline

    kinds = ROW_KINDS[mode]
    configs = [
        GenerationConfig(max_new_tokens=16, top_k=1, ignore_eos=True, **kinds[i % len(kinds)])
        for i in range(len(prompts))
    ]
    config = EngineConfig(dtype="float32", max_prefill_token_num=256, max_batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "steps.jsonl"
        os.environ[TRACE_ENV] = str(trace)  # the engine reads it once, at start
        try:
            with pipeline(str(model_dir), backend_config=config) as pipe:
                results = pipe(prompts, gen_config=configs)
        finally:
            del os.environ[TRACE_ENV]
        records = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds_run = collections.Counter(r["kind"] for r in records if "kind" in r)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    worst, failed = 0.0, False
    for ids, gen, out in zip(prompts, configs, results, strict=True):
        tokens = torch.tensor([ids + out.token_ids[:-1]], device="cuda")
        with torch.no_grad():
            ref = model(tokens, output_hidden_states=True)
        for got, want, asked in (
            (out.logits, ref.logits[0], gen.output_logits),
            (out.last_hidden_state, ref.hidden_states[-1][0], gen.output_last_hidden_state),
        ):
            if asked is None:
                failed |= got is not None
                continue
            want = want[0 if asked == "all" else len(ids) - 1 :].cpu()
            if got is None or got.shape != want.shape:
                failed = True
                continue
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    failed |= worst > 1e-3
    # The graphed mode checks nothing unless its decode steps replayed the graphs.
    failed |= mode == "graphed" and not kinds_run["decode"]
    label = f"{name} float32 output rows, {mode}"
    print(
        f"{label:<40} worst difference {worst:.1e} of the largest value  "
        f"{'FAIL' if failed else 'ok'}  (steps: {dict(kinds_run)})",
        flush=True,
    )
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model directory or .gguf file")
    args = parser.parse_args()
    failed = False
    if args.model:
        from app.engine.loader import resolve_model_dir

        model_dir = resolve_model_dir(args.model)
        answers = chat_prompts(model_dir)
        print(f"{model_dir.name}: prompts of {[len(p) for p in answers]} tokens", flush=True)
        failed = check_model(Path(args.model).stem, model_dir, answers, 96, until_eos=True)
        sys.exit(1 if failed else 0)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in (5, 77, 130, 300, 1000)]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llama", "qwen2"):
            model_dir = make_model(kind, Path(tmp))
            failed |= check_model(kind, model_dir, prompts, 48, until_eos=False)
            for mode in ROW_KINDS:
                failed |= check_rows(kind, model_dir, prompts, mode)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
