"""Structured output through the engine: the bundled SmolLM2 under a grammar always emits text
that parses and validates, also with n > 1, under preemption and next to unconstrained requests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from app import EngineConfig, GenerationConfig, pipeline
from app.api import Pipeline

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.fixture(scope="module")
def pipe(smollm2_dir: Path) -> Pipeline:
    config = EngineConfig(block_size=16, num_gpu_blocks=24)  # small: forces preemption
    with pipeline(str(smollm2_dir), backend_config=config) as p:
        yield p


def test_json_schema_outputs_validate_with_preemption(pipe: Pipeline) -> None:
    prompts = [f"Describe person number {i} as JSON." for i in range(6)]
    constrained = GenerationConfig(
        max_new_tokens=96,
        do_sample=True,
        temperature=1.0,
        random_seed=3,
        response_format=schema_format(PERSON),
    )
    free = GenerationConfig(max_new_tokens=96, top_k=1, ignore_eos=True)
    results = pipe(prompts + ["Tell me a story."] * 2, gen_config=[constrained] * 6 + [free] * 2)
    for result in results[:6]:
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), PERSON)
    assert results[6].generate_token_len == 96  # unconstrained neighbours run unaffected
    assert pipe.engine.stats()["num_preemptions"] > 0


def test_regex_and_json_object(pipe: Pipeline) -> None:
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    result = pipe(
        "Give me a phone number.",
        gen_config=GenerationConfig(
            max_new_tokens=32,
            top_k=1,
            response_format={"type": "regex_schema", "regex_schema": phone},
        ),
    )
    assert re.fullmatch(phone, result.text)
    result = pipe(
        "Return a JSON object about cats.",
        gen_config=GenerationConfig(
            max_new_tokens=64, top_k=1, response_format={"type": "json_object"}
        ),
    )
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:  # cut by max_new_tokens: still a valid JSON prefix, starting an object
        assert result.text.startswith("{")


def test_bad_schema_is_a_value_error(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="not"):
        pipe(
            "Hi",
            gen_config=GenerationConfig(response_format=schema_format({"not": {"type": "string"}})),
        )
    assert pipe("Hi", gen_config=GenerationConfig(max_new_tokens=2, top_k=1)).generate_token_len
