"""Forced tool calls: random generation under the grammar always parses into valid calls."""

from __future__ import annotations

import json
from typing import Any

import grammar_walk
import jsonschema
import pytest
import torch

from app.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
)
from app.tools import get_tool_parser
from app.tools.tool_grammar import tool_call_spec

# The simulated model's vocab-wide ops are tiny; on a busy 2-core machine extra intra-op
# threads only make them 10x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
}
ADD = {
    "$defs": {"num": {"type": "number", "minimum": -100, "maximum": 100}},
    "type": "object",
    "properties": {
        "terms": {"type": "array", "items": {"$ref": "#/$defs/num"}, "minItems": 2, "maxItems": 3},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["terms", "note"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Sum.", "parameters": ADD}},
    {"type": "function", "function": {"name": "now"}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "now": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def closer_bias(tokenizer: Any) -> torch.Tensor:
    """Favour tokens that close strings and objects, so random calls stay short; EOS is left
    alone so parallel grammars often go on to a second call."""
    return grammar_walk.closer_bias(tokenizer)


def generate(compiler: GrammarCompiler, spec: GrammarSpec, bias: torch.Tensor, seed: int) -> list:
    return grammar_walk.generate(compiler, spec, bias, seed, limit=3000)


@pytest.mark.parametrize("parser_name", ["hermes", "llama3", "internlm2"])
def test_forced_calls_always_parse_and_validate(
    parser_name: str, compiler, tokenizer, closer_bias
) -> None:
    parser = get_tool_parser(parser_name)
    named = {"type": "function", "function": {"name": "add"}}
    seen_parallel = False
    for seed in range(12):
        choice = "required" if seed % 3 else named
        parallel = seed % 2 == 0
        spec = tool_call_spec(TOOLS, choice, parser_name, parallel)
        text = tokenizer.decode(generate(compiler, spec, closer_bias, seed))
        parsed = parser.parse(text)
        assert parsed.content is None, text
        assert parsed.tool_calls and (parallel or len(parsed.tool_calls) == 1), text
        seen_parallel |= len(parsed.tool_calls) > 1
        for call in parsed.tool_calls:
            assert choice == "required" or call.name == "add"
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert seen_parallel


def test_spec_is_canonical_ebnf() -> None:
    spec = tool_call_spec(TOOLS[:1], "required", "hermes", False)
    assert spec.kind == "ebnf"
    assert spec.source.startswith("root ::= call\ncall ::= tool_0\n")
    assert '"<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": "' in spec.source
    assert spec == tool_call_spec(TOOLS[:1], "required", "hermes", False)


@pytest.mark.parametrize(
    ("tools", "choice", "parser", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "hermes", "not in tools"),
        (TOOLS, "auto", "hermes", "tool_choice must be"),
        (TOOLS, "required", "mistral", "no tool-call grammar"),
        ([], "required", "hermes", "non-empty list"),
        ([{"type": "function", "function": {}}], "required", "hermes", "each tool must"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
            "required",
            "hermes",
            'Unsupported type "strin"',
        ),
        (
            [{"function": {"name": "f", "parameters": {"not": {"type": "object"}}}}],
            "required",
            "llama3",
            "'not'",
        ),
    ],
)
def test_bad_requests(tools, choice, parser, message) -> None:
    with pytest.raises(GrammarError, match=message):
        tool_call_spec(tools, choice, parser, False)
