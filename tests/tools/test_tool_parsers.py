"""Tool-call parsers: formats, malformed input, and the streaming == non-streaming invariant."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.tools import ParsedOutput, get_tool_parser, tool_parser_for_model

CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
FORMATS = ["hermes", "llama3", "internlm2"]


def stream(name: str, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed `pieces`, check every tool-call delta has OpenAI's shape, and merge like a client."""
    state = get_tool_parser(name).stream()
    deltas = [state.feed(piece) for piece in pieces] + [state.finish()]
    content = "".join(d.content for d in deltas if d.content)
    calls: list[list[str]] = []
    for delta in deltas:
        for part in delta.tool_calls:
            if part["index"] == len(calls):  # the first delta of a call
                assert set(part) == {"index", "id", "type", "function"}
                assert CALL_ID.fullmatch(part["id"]) and part["type"] == "function"
                assert part["function"]["arguments"] == ""
                calls.append([part["function"]["name"], ""])
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                assert part["index"] == len(calls) - 1
                calls[-1][1] += part["function"]["arguments"]
    return content or None, [(n, a) for n, a in calls]


def summary(parsed: ParsedOutput) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(set(points)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


# ---- generated model outputs -------------------------------------------------------------------

names = st.sampled_from(["get_weather", "f", "名字", "a b"])
values = st.one_of(st.integers(-999, 999), st.text('ab"\\{}é😀', max_size=4), st.booleans())
arguments = st.dictionaries(st.text("xyz", min_size=1, max_size=3), values, max_size=3)
noise = st.one_of(
    st.text("ab x\n{}<>/|;\"'é😀", max_size=12),
    st.sampled_from(["<tool", "<tool_call", "</tool_call>", "<|action_start|>", "<|plugin|>",
                     "<|action_start|><|plug", "<|python_tag|>", "<|python", "{", '{"', "; "]),
)  # fmt: skip


def call_json(name: str, args: dict[str, Any], key: str, indent: int | None) -> str:
    return json.dumps({"name": name, key: args}, ensure_ascii=False, indent=indent)


@st.composite
def tagged_output(draw: st.DrawFn, start: str, end: str, key: str) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["call", "call", "noise", "malformed", "unclosed"]))
        body = call_json(draw(names), draw(arguments), key, draw(st.sampled_from([None, 1])))
        if kind == "call":
            parts.append(f"{start}\n{body}\n{end}")
        elif kind == "malformed":
            parts.append(f"{start}{body[:-1]}{end}")
        elif kind == "unclosed":
            parts.append(f"{start}{body}")
        else:
            parts.append(draw(noise))
    return "".join(parts)


@st.composite
def llama3_output(draw: st.DrawFn) -> str:
    lead = draw(st.sampled_from(["", " ", "<|python_tag|>", "\n<|python_tag|> "]))
    calls = [
        call_json(draw(names), draw(arguments), "parameters", draw(st.sampled_from([None, 1])))
        for _ in range(draw(st.integers(0, 3)))
    ]
    separator = draw(st.sampled_from(["; ", ";", "\n", " ;\n"]))
    tail = draw(st.one_of(st.just(""), noise, st.just('{"name": "f", "parameters": {'[:9])))
    return lead + separator.join(calls) + tail


OUTPUTS = {
    "hermes": tagged_output("<tool_call>", "</tool_call>", "arguments"),
    "llama3": llama3_output(),
    "internlm2": tagged_output("<|action_start|><|plugin|>", "<|action_end|>", "parameters"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_streaming_matches_parse_at_any_split(name: str) -> None:
    @settings(max_examples=150, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        text = data.draw(OUTPUTS[name])
        points = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
        expected = summary(get_tool_parser(name).parse(text))
        assert stream(name, cut(text, points)) == expected
        assert stream(name, list(text)) == expected

    check()


@pytest.mark.parametrize("name", FORMATS)
def test_streaming_token_by_token(name: str, tokenizer: Any) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=OUTPUTS[name])
    def check(text: str) -> None:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        points = [end for _, end in offsets["offset_mapping"]]
        assert stream(name, cut(text, points)) == summary(get_tool_parser(name).parse(text))

    check()


# ---- formats -----------------------------------------------------------------------------------


def test_hermes() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    parsed = get_tool_parser("hermes").parse(text)
    assert parsed.content == "Let me check.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {}),
    ]
    assert len({c.id for c in parsed.tool_calls}) == 2
    assert parsed.tool_calls[0].to_openai() == {
        "id": parsed.tool_calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    only_calls = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
    assert get_tool_parser("hermes").parse(only_calls).content is None


@pytest.mark.parametrize(
    "text",
    [
        "a <tool_cal> b",  # diverges from the tag
        "ends with <tool_call",  # a tag prefix at the very end
        '<tool_call>{"name": "f", "arguments": {}</tool_call>',  # malformed JSON
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        "<tool_call>unfinished",
    ],
)
def test_hermes_non_calls_are_content(text: str) -> None:
    parsed = get_tool_parser("hermes").parse(text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_hermes_holds_back_only_possible_tags() -> None:
    state = get_tool_parser("hermes").stream()
    assert state.feed("Hi <tool").content == "Hi "
    assert state.feed("box>").content == "<toolbox>"
    assert state.feed(" <tool_call>").content == " "
    delta = state.feed('{"name": "f", "arguments": {"x": 1}}</tool_call> done')
    assert delta.content == " done"
    assert [p["function"] for p in delta.tool_calls] == [
        {"name": "f", "arguments": ""},
        {"arguments": '{"x": 1}'},
    ]


def test_llama3() -> None:
    parser = get_tool_parser("llama3")
    text = (
        '<|python_tag|>{"name": "f", "parameters": {"s": "}{\\"", "n": [1, {"k": null}]}}; '
        '{"name": "g", "parameters": {}}'
    )
    parsed = parser.parse(text)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("f", {"s": '}{"', "n": [1, {"k": None}]}),
        ("g", {}),
    ]
    for plain in ['{"answer": 42}', "The answer is {x}.", '{"name": "f"}', "{ oops", "{"]:
        assert parser.parse(plain) == ParsedOutput(plain, [])
    trailing = parser.parse('{"name": "f", "parameters": {}}\nDone.')
    assert trailing.content == "\nDone." and [c.name for c in trailing.tool_calls] == ["f"]
    state = parser.stream()
    assert state.feed("{ not json").content == "{ not json"  # released as soon as it diverges


def test_internlm2() -> None:
    parser = get_tool_parser("internlm2")
    text = (
        "I will search.<|action_start|><|plugin|>\n"
        '{"name": "search", "parameters": {"q": "weather"}}<|action_end|>\n'
    )
    parsed = parser.parse(text)
    assert parsed.content == "I will search.\n"
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("search", '{"q": "weather"}')]
    code = "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"
    assert parser.parse(code) == ParsedOutput(code, [])


def test_registry() -> None:
    assert get_tool_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match="hermes, internlm2, llama3"):
        get_tool_parser("mistral")
    assert tool_parser_for_model("Qwen2ForCausalLM", None) == "hermes"
    assert tool_parser_for_model("LlamaForCausalLM", "{{ '<tool_call>' }}") == "hermes"
    llama31 = "{{- '<|start_header_id|>ipython<|end_header_id|>' }}{{ '<|eot_id|>' }}"
    assert tool_parser_for_model("LlamaForCausalLM", llama31) == "llama3"
    assert tool_parser_for_model("InternLM2ForCausalLM", None) == "internlm2"
    assert tool_parser_for_model("X", "{{ '<|action_start|><|plugin|>' }}") == "internlm2"
    assert tool_parser_for_model("LlamaForCausalLM", "{{ messages }}") is None
