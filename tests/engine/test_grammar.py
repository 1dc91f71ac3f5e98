"""Grammar backend: specs, pre-checks, compile cache, and matchers driving a simulated model."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import grammar_walk
import jsonschema
import pytest
import torch
import xgrammar as xgr
from grammar_walk import VOCAB

from app.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarLimits,
    GrammarMatcher,
    GrammarSpec,
    allocate_bitmask,
    bitmask_to_bool,
    reset_bitmask,
)

# The simulated model's vocab-wide ops are tiny; on a busy 2-core machine extra intra-op
# threads only make them 10x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def closer_bias(tokenizer: Any) -> torch.Tensor:
    """Towards tokens that close strings, objects and arrays, and towards EOS."""
    bias = grammar_walk.closer_bias(tokenizer)
    bias[tokenizer.eos_token_id] = 3.0
    return bias


def generate(
    compiler: GrammarCompiler, spec: GrammarSpec, tokenizer: Any, bias: torch.Tensor, seed: int
) -> str:
    """The text the simulated model writes under `spec`."""
    return tokenizer.decode(grammar_walk.generate(compiler, spec, bias, seed, limit=2000))


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "nickname": {"type": "string"},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 2,
                "maxItems": 4,
            },
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "active": {"type": "boolean"},
        },
        "required": ["tags", "score", "active"],
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"path": {"type": "array", "items": {"$ref": "#/$defs/point"}}},
        "required": ["path"],
    },
    {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "when": {"type": "string", "format": "date"},
            "kind": {"anyOf": [{"type": "null"}, {"const": "fixed"}]},
        },
        "required": ["code", "when", "kind"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "tags", "refs", "pattern"])
def test_json_schema_outputs_validate(compiler, tokenizer, closer_bias, schema) -> None:
    spec = GrammarSpec.for_json_schema(schema)
    for seed in range(3):
        text = generate(compiler, spec, tokenizer, closer_bias, seed)
        jsonschema.validate(
            json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )


def test_json_object_regex_choice_ebnf(compiler, tokenizer, closer_bias) -> None:
    for seed in range(3):
        obj = generate(compiler, GrammarSpec.for_json_object(), tokenizer, closer_bias, seed)
        assert isinstance(json.loads(obj), dict)

        pattern = r"\d{3}-[a-z]{2,8}(\.[A-Z])?"
        text = generate(compiler, GrammarSpec.for_regex(pattern), tokenizer, closer_bias, seed)
        assert re.fullmatch(pattern, text), text

        choices = ["red", "green", "blue", "dark blue", 'say "hi"\n']
        text = generate(compiler, GrammarSpec.for_choice(choices), tokenizer, closer_bias, seed)
        assert text in choices

        ebnf = 'root ::= item ("," item){0,3}\nitem ::= "x=" [0-9]{1,3} | "y=" ("true" | "false")'
        text = generate(compiler, GrammarSpec.for_ebnf(ebnf), tokenizer, closer_bias, seed)
        item = r"(x=[0-9]{1,3}|y=(true|false))"
        assert re.fullmatch(rf"{item}(,{item}){{0,3}}", text), text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec.for_json_schema({"type": "strin"}), 'Unsupported type "strin"'),
        (
            GrammarSpec.for_json_schema('{"type": "array", "minItems": 3, "maxItems": 1}'),
            "minItems",
        ),
        (GrammarSpec.for_json_schema({"$ref": "#/$defs/missing"}), "$defs"),
        (GrammarSpec.for_regex("[a-"), "invalid regex"),
        (GrammarSpec.for_regex("(?=a)b"), "Lookahead"),
        (GrammarSpec.for_regex(r"(a)\1"), "Backreference"),
        (GrammarSpec.for_ebnf('root ::= "a" foo'), 'Rule "foo" is not defined'),
        (GrammarSpec.for_ebnf('start ::= "a"'), "root"),
        (GrammarSpec.for_json_schema({"type": "string", "pattern": "a(?=b)"}), "Lookahead"),
    ],
)
def test_invalid_grammars_name_the_problem(compiler, spec, message) -> None:
    with pytest.raises(GrammarError) as info:
        compiler.compile_sync(spec)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and "/project/" not in text and "Check failed" not in text


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "string", "not": {"const": "a"}}, "'not'"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "'if'"),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "'allOf'"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "array", "contains": {"type": "integer"}}, "'contains'"),
        ({"properties": {"a": {"dependentRequired": {"a": ["b"]}}}}, "'dependentRequired'"),
        ({"$ref": "https://example.com/s.json"}, "local '$ref'"),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
        ({"type": "string", "pattern": "a+", "maxLength": 3}, "'pattern' cannot"),
        ({"type": "string", "format": "email", "minLength": 3}, "'format' cannot"),
        ({"type": "object", "required": ["x"]}, "'x' is not defined"),
        ({"type": "string", "maxLength": 10**9}, "'maxLength'"),
    ],
)
def test_unsupported_schema_keywords_are_refused(compiler, schema, keyword) -> None:
    wrapper = {"type": "object", "properties": {"field": schema}, "required": ["field"]}
    with pytest.raises(GrammarError, match="unsupported JSON schema") as info:
        compiler.compile_sync(GrammarSpec.for_json_schema(wrapper))
    assert keyword in str(info.value)
    assert "at '/properties/field" in str(info.value)


def test_pathological_inputs_fail_fast(compiler, tokenizer, closer_bias) -> None:
    start = time.perf_counter()
    text = generate(compiler, GrammarSpec.for_regex("(a+)+b"), tokenizer, closer_bias, 0)
    assert re.fullmatch("a+b", text)
    for spec in (
        GrammarSpec.for_regex("(" * 30_000 + "a" + ")" * 30_000),
        GrammarSpec.for_ebnf("root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000),
        GrammarSpec.for_json_schema(_nested_arrays(100)),
    ):
        with pytest.raises(GrammarError, match="nested too deeply"):
            compiler.compile_sync(spec)
    with pytest.raises(GrammarError, match="nested too deeply"):
        GrammarSpec.for_json_schema("[" * 100_000 + "]" * 100_000)
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    with pytest.raises(GrammarError, match="over the limit of 100000"):
        compiler.compile_sync(GrammarSpec.for_json_schema(big))
    with pytest.raises(GrammarError, match="repetition count 2147483648"):
        compiler.compile_sync(GrammarSpec.for_regex("a{1,2147483648}"))
    assert time.perf_counter() - start < 5


def _nested_arrays(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_lru_is_bounded_by_memory(tokenizer) -> None:
    cap = 100_000
    compiler = GrammarCompiler(tokenizer, VOCAB, GrammarLimits(cache_max_bytes=cap))
    specs = [
        GrammarSpec.for_json_schema(
            {"type": "object", "properties": {f"k{i}": {"type": "integer"}}}
        )
        for i in range(200)
    ]
    first = compiler.compile_sync(specs[0])
    for spec in specs:
        compiler.compile_sync(spec)
        assert compiler.cache_bytes <= cap
    assert 0 < compiler.cache_entries < 200
    assert compiler.cache_bytes == sum(
        compiler.compile_sync(s).memory_bytes for s in specs[-compiler.cache_entries :]
    )
    assert compiler.compile_sync(specs[0]) is not first  # evicted, compiled again
    compiler.close()


def test_cache_hit_is_fast_and_shared(compiler) -> None:
    spec = GrammarSpec.for_json_schema(
        {"type": "object", "properties": {"hit": {"type": "string"}}}
    )
    first = compiler.compile_sync(spec)
    respaced = GrammarSpec.for_json_schema(
        '{"type":"object",  "properties":{"hit":{"type":"string"}}}'
    )
    start = time.perf_counter()
    again = compiler.compile_sync(respaced)
    assert time.perf_counter() - start < 0.005
    assert again is first
    assert asyncio.run(compiler.compile(spec)) is first


def test_concurrent_compiles_of_one_spec_run_once(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB)
    calls = 0
    real = compiler._compile_raw

    def counting(spec: GrammarSpec) -> Any:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        return real(spec)

    compiler._compile_raw = counting  # type: ignore[method-assign]
    spec = GrammarSpec.for_regex("[a-z]{5}")

    async def main() -> list[Any]:
        return await asyncio.gather(*(compiler.compile(spec) for _ in range(8)))

    results = asyncio.run(main())
    threads = [threading.Thread(target=compiler.compile_sync, args=(spec,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == 1
    assert all(r is results[0] for r in results)
    compiler.close()


def test_matcher_replay_rollback_reset_and_termination(compiler, tokenizer) -> None:
    matcher = GrammarMatcher(compiler.compile_sync(GrammarSpec.for_choice(["yes", "no"])))
    yes, no, eos = tokenizer.encode("yes"), tokenizer.encode("no"), tokenizer.eos_token_id
    assert not matcher.accept_tokens([*yes, *no])  # all-or-nothing: nothing was consumed
    assert matcher.accept_tokens(no)
    assert matcher.is_completed() and not matcher.is_terminated()
    matcher.rollback(len(no))
    assert not matcher.is_completed()
    assert matcher.accept_tokens([*yes, eos])
    assert matcher.is_terminated()
    bitmask = allocate_bitmask(2, VOCAB)
    matcher.fill_bitmask(bitmask, 1)
    assert bitmask_to_bool(bitmask, VOCAB)[1].nonzero().flatten().tolist() == [eos]
    assert bitmask_to_bool(bitmask, VOCAB)[0].all()
    matcher.reset()
    assert matcher.accept_tokens(yes)


def test_padded_vocab_and_bitmask_unpacking(tokenizer) -> None:
    padded = VOCAB + 64
    compiler = GrammarCompiler(tokenizer, padded)
    matcher = GrammarMatcher(compiler.compile_sync(GrammarSpec.for_json_object()))
    bitmask = allocate_bitmask(3, padded)
    assert bitmask.dtype == torch.int32 and bitmask.shape == (3, (padded + 31) // 32)
    matcher.fill_bitmask(bitmask, 1)
    bitmask[2] = torch.randint(-(2**31), 2**31 - 1, (bitmask.shape[1],), dtype=torch.int32)
    allowed = bitmask_to_bool(bitmask, padded)
    assert allowed.shape == (3, padded)
    assert not allowed[1, VOCAB:].any() and allowed[1].sum() < 1000
    logits = torch.zeros(3, padded)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.equal(allowed, logits.isfinite())
    reset_bitmask(bitmask)
    assert bitmask_to_bool(bitmask, padded).all()
    compiler.close()


def test_spec_constructors() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = GrammarSpec.for_json_schema(schema)
    assert spec == GrammarSpec.for_json_schema(json.dumps(schema, indent=2))
    assert spec.source == '{"type":"object","properties":{"a":{"type":"integer"}}}'
    # Key order is meaningful (properties are generated in schema order): not sorted away.
    assert spec != GrammarSpec.for_json_schema(dict(reversed(schema.items())))
    assert spec.key == GrammarSpec("json_schema", spec.source).key
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_object"}).kind == "json_object"
    wrapped = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": schema, "strict": True},
    }
    assert GrammarSpec.from_response_format(wrapped) == spec
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert GrammarSpec.from_response_format(no_schema) == GrammarSpec.for_json_object()
    lmdeploy = {"type": "regex_schema", "regex_schema": "[0-9]+"}
    assert GrammarSpec.from_response_format(lmdeploy) == GrammarSpec("regex", "[0-9]+")
    assert GrammarSpec.from_guided(guided_choice=["a", "b"]) == GrammarSpec("choice", '["a", "b"]')
    assert GrammarSpec.from_guided(guided_json='{"type": "integer"}').kind == "json_schema"
    assert GrammarSpec.from_guided(guided_grammar='root ::= "a"').kind == "ebnf"
    assert GrammarSpec.from_guided() is None
    bad: list[tuple[Any, str]] = [
        (lambda: GrammarSpec.from_response_format({"type": "xml"}), "must be one of"),
        (lambda: GrammarSpec.from_response_format([]), "must be an object"),
        (lambda: GrammarSpec.from_response_format({"type": "json_schema"}), "json_schema must"),
        (lambda: GrammarSpec.from_response_format({"type": "regex_schema"}), "regex must"),
        (lambda: GrammarSpec.from_guided(guided_regex="a", guided_choice=["a"]), "only one of"),
        (lambda: GrammarSpec.for_json_schema("{not json"), "invalid JSON schema"),
        (lambda: GrammarSpec.for_json_schema([1, 2]), "object or boolean"),
        (lambda: GrammarSpec.for_json_schema({"maximum": float("nan")}), "invalid JSON schema"),
        (lambda: GrammarSpec.for_choice([]), "non-empty list"),
        (lambda: GrammarSpec.for_choice("abc"), "non-empty list"),
        (lambda: GrammarSpec.for_choice(["a", 3]), "non-empty list"),
        (lambda: GrammarSpec.for_ebnf("  "), "non-empty"),
    ]
    for make, message in bad:
        with pytest.raises(GrammarError, match=message):
            make()


# Last in the file: the timed-out compile keeps a worker thread busy for a while afterwards.
def test_slow_compile_times_out_without_blocking_the_loop(tokenizer) -> None:
    # A pattern with a long bounded repetition takes xgrammar about a second (0.2.9, 2 cores).
    slow = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": "^[a-z0-9]{0,3000}$"}},
    }
    compiler = GrammarCompiler(tokenizer, VOCAB, GrammarLimits(compile_timeout_s=0.1))

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with pytest.raises(GrammarError, match=r"timed out after 0\.1s"):
            await compiler.compile(GrammarSpec.for_json_schema(slow))
        ticker.cancel()
        return ticks

    start = time.perf_counter()
    ticks = asyncio.run(main())
    assert time.perf_counter() - start < 1.0
    assert ticks >= 5
    compiler.close()
