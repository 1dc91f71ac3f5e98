"""`Pipeline.chat` on the bundled SmolLM2: conversations whose turns the engine keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import EngineConfig, GenerationConfig, pipeline
from app.api import Pipeline, Session

pytestmark = pytest.mark.slow

GREEDY = GenerationConfig(max_new_tokens=24, top_k=1)


@pytest.fixture(scope="module")
def pipe(smollm2_dir: Path) -> Pipeline:
    with pipeline(str(smollm2_dir), backend_config=EngineConfig(block_size=16)) as p:
        yield p


def computed(pipe: Pipeline) -> int:
    return pipe.engine.stats()["prompt_tokens_computed"]


def test_second_turn_sends_only_its_message_and_matches_a_fresh_prefill(pipe: Pipeline) -> None:
    session = pipe.chat("What is the capital of France?", gen_config=GREEDY)
    assert isinstance(session, Session) and session.response is not None
    first = session.response
    assert "Paris" in first.text and first.session_id == session.session_id
    history = list(session._tokens)
    assert len(history) == first.input_token_len + first.generate_token_len

    before = computed(pipe)
    assert pipe.chat("And of Italy?", session=session, gen_config=GREEDY) is session
    second = session.response
    # Only the new message (plus the first answer's last token, whose KV was never computed).
    assert computed(pipe) - before == second.input_token_len + 1
    assert second.input_token_len < 20
    assert [prompt for prompt, _ in session.history] == [
        "What is the capital of France?",
        "And of Italy?",
    ]
    # The kept KV gives the answer a fresh prefill of the same tokens gives.
    turn_ids = session._tokens[len(history) : len(history) + second.input_token_len]
    fresh = pipe(history + turn_ids, gen_config=GREEDY)
    assert second.token_ids == fresh.token_ids
    assert "Rome" in second.text


def test_a_session_the_engine_let_go_is_sent_again_whole(pipe: Pipeline) -> None:
    kept = pipe.chat("Name a primary color.", gen_config=GREEDY)
    dropped = pipe.chat("Name a primary color.", gen_config=GREEDY)
    history = list(kept._tokens)
    pipe._run(pipe._end_session(dropped.session_id))  # as session_ttl or eviction would
    pipe.chat("Name another one.", session=kept, gen_config=GREEDY)
    pipe.chat("Name another one.", session=dropped, gen_config=GREEDY)
    assert dropped.response.token_ids == kept.response.token_ids
    assert dropped.response.input_token_len == len(history) + kept.response.input_token_len
    assert dropped._tokens == kept._tokens


def test_streamed_turn_updates_the_session_once_read(pipe: Pipeline) -> None:
    session = pipe.chat("Hi", gen_config=GREEDY)
    deltas = pipe.chat(
        "Tell me a short joke.", session=session, gen_config=GREEDY, stream_response=True
    )
    assert len(session.history) == 1
    pieces = list(deltas)
    assert len(pieces) > 1 and all(p.session_id == session.session_id for p in pieces)
    assert "".join(p.text for p in pieces) == session.response.text
    assert [t for p in pieces for t in p.token_ids] == session.response.token_ids
    assert len(session.history) == 2 and "USER: 'Tell me a short joke.'" in repr(session)


def test_close_forgets_the_conversation(pipe: Pipeline) -> None:
    session = pipe.chat("Hi", gen_config=GREEDY)
    held = len(pipe.engine.scheduler.sessions)
    session.close()
    assert len(pipe.engine.scheduler.sessions) == held - 1
    assert session.history == [] and session.response is None
    fresh = pipe.chat("Hi", gen_config=GREEDY)
    pipe.chat("Hi", session=session, gen_config=GREEDY)  # starts over
    assert session.response.token_ids == fresh.response.token_ids


def test_bad_turn_is_refused_and_leaves_the_session_as_it_was(pipe: Pipeline) -> None:
    session = pipe.chat("Hi", gen_config=GREEDY)
    tokens = list(session._tokens)
    with pytest.raises(ValueError, match="top_p"):
        pipe.chat("Again", session=session, gen_config=GenerationConfig(top_p=0.0))
    with pytest.raises(ValueError, match="n > 1"):
        pipe.chat("Again", session=session, gen_config=GenerationConfig(n=2))
    assert session._tokens == tokens and len(session.history) == 1
    pipe.chat("Again", session=session, gen_config=GREEDY)
    assert session._tokens[: len(tokens)] == tokens
