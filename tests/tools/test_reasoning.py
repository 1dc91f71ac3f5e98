"""Reasoning parser: splitting, templates that pre-open the section, and streaming invariance."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.tools import ReasoningParser


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[str | None, str | None]:
    state = parser.stream()
    deltas = [state.feed(piece) for piece in pieces] + [state.finish()]
    reasoning = "".join(r for r, _ in deltas if r)
    content = "".join(c for _, c in deltas if c)
    return reasoning or None, content or None


text_part = st.one_of(
    st.text("ab \n<>/thinké😀", max_size=10),
    st.sampled_from(["<think>", "</think>", "<thi", "</thin", "<think", "\n\n"]),
)
outputs = st.lists(text_part, max_size=6).map("".join)


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
def test_streaming_matches_parse_at_any_split(starts_in_reasoning: bool) -> None:
    parser = ReasoningParser(starts_in_reasoning=starts_in_reasoning)

    @settings(max_examples=300, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        text = data.draw(outputs)
        points = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=6))))
        pieces = [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]
        expected = parser.parse(text)
        assert stream(parser, pieces) == expected
        assert stream(parser, list(text)) == expected

    check()


def test_model_opens_the_section() -> None:
    parser = ReasoningParser()
    assert parser.parse("<think>\nLet me see.\n</think>\n\nParis.") == ("Let me see.\n", "Paris.")
    assert parser.parse("Paris.") == (None, "Paris.")
    assert parser.parse("  <think>still going") == ("still going", None)
    assert parser.parse("<think></think>Paris.") == (None, "Paris.")
    assert parser.parse("I <think> so") == (None, "I <think> so")  # only at the start


def test_template_opens_the_section() -> None:
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.parse("Let me see.\n</think>\n\nParis.") == ("Let me see.\n", "Paris.")
    assert parser.parse("<think>Hmm</think>Paris.") == ("Hmm", "Paris.")  # tag repeated anyway
    assert parser.parse("never closes") == ("never closes", None)


def test_holds_back_only_a_possible_end_tag() -> None:
    state = ReasoningParser(starts_in_reasoning=True).stream()
    assert state.feed("a</th") == ("a", None)
    assert state.feed("x") == ("</thx", None)
    assert not state.ended
    assert state.feed("</think>b") == (None, "b")
    assert state.ended


def test_custom_tags() -> None:
    parser = ReasoningParser("<|begin_of_thought|>", "<|end_of_thought|>")
    assert parser.parse("<|begin_of_thought|>x<|end_of_thought|>y") == ("x", "y")


def test_reasoning_ended() -> None:
    opens = ReasoningParser()
    assert opens.reasoning_ended("")  # a grammar from token one rules reasoning out
    assert opens.reasoning_ended('{"a": 1}')
    assert not opens.reasoning_ended("<thi")
    assert not opens.reasoning_ended("\n<think>working")
    assert opens.reasoning_ended("<think>done</think>")
    preopened = ReasoningParser(starts_in_reasoning=True)
    assert not preopened.reasoning_ended("")
    assert not preopened.reasoning_ended("working </thi")
    assert preopened.reasoning_ended("done</think>")
