"""Incremental detokenization against full decodes: UTF-8 safety, stop strings, special tokens."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from app.engine.detokenizer import IncrementalDetokenizer, special_token_ids, token_listing

MIXED_TEXT = "Hello 你好，世界！🎉🚀 naïve café — ok 日本語のテキスト 👩‍👩‍👧 Ünïcödé ∑x² end."
IM_START, IM_END = 1, 2
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer: byte-level BPE, the one the default model speaks."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama_style() -> PreTrainedTokenizerBase:
    """A tiny sentencepiece-style tokenizer (metaspace, byte fallback, leading-space strip)."""
    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "\u2581",
        "\u2581Hello",
        "\u2581world",
        "Hello",
        "world",
        "!",
        ",",
        "\u2581the",
        "H",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "a",
        "b",
        "c",
        "E",
        "N",
        "D",
        "\u2581END",
        "é",
    ]
    model = models.BPE(
        {p: i for i, p in enumerate(pieces)},
        [],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def loose_tokens(
    smol: PreTrainedTokenizerBase, llama_style: PreTrainedTokenizerBase
) -> dict[str, list[int]]:
    """Per tokenizer, the ids a random stream may use one by one. Byte-fallback decoders turn a
    whole invalid byte run into U+FFFD, valid bytes included, which no streaming decoder can
    foresee, so their byte tokens only come as whole characters."""
    tokenizers = {"smol": smol, "llama_style": llama_style}
    return {
        name: [t for t in range(len(tok)) if not BYTE_PIECE.fullmatch(tok.convert_ids_to_tokens(t))]
        for name, tok in tokenizers.items()
    }


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] = ()
) -> tuple[list[str], bool]:
    """Feed `ids` in chunks of the given sizes (then one at a time); returns the deltas."""
    deltas, at, sizes = [], 0, list(chunks)
    while at < len(ids):
        size = sizes.pop(0) if sizes else 1
        text, stopped = detok.step(ids[at : at + size])
        deltas.append(text)
        at += size
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def segmented_reference(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """What slow tokenizers return with spaces_between_special_tokens: runs and specials, spaced."""
    special = special_token_ids(tok)
    parts, run = [], []
    for token_id in [*ids, None]:
        if token_id is None or token_id in special:
            text = tok.decode(run, clean_up_tokenization_spaces=False)
            parts.extend([text] if text else [])
            run = []
            if token_id is not None:
                parts.append(tok.convert_ids_to_tokens(token_id))
        else:
            run.append(token_id)
    return " ".join(parts)


@pytest.mark.parametrize("name", ["smol", "llama_style"])
def test_cjk_and_emoji_are_never_split(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    ids = tok.encode(MIXED_TEXT, add_special_tokens=False)
    assert len(ids) > len(MIXED_TEXT) // 2  # many characters span several tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas, stopped = stream(detok, ids)
    assert not stopped
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas).strip() == MIXED_TEXT


def test_prompt_context_keeps_the_leading_space(llama_style: PreTrainedTokenizerBase) -> None:
    tok = llama_style
    hello, world = tok.convert_tokens_to_ids(["\u2581Hello", "\u2581world"])
    # Decoded alone, "▁world" loses its space; after a prompt it is a word boundary.
    assert tok.decode([world]) == "world"
    detok = IncrementalDetokenizer(tok, [1, hello])
    assert stream(detok, [world, world]) == ([" world", " world", ""], False)


def test_stop_string_spanning_tokens_is_never_released(smol: PreTrainedTokenizerBase) -> None:
    text = "The answer is 42, said the machine. STOP_HERE and then more text."
    ids = smol.encode(text, add_special_tokens=False)
    stop = "STOP_HERE"
    assert len(smol.encode(stop, add_special_tokens=False)) > 1
    detok = IncrementalDetokenizer(smol, [], stop_strings=[stop])
    deltas, stopped = stream(detok, ids)
    assert stopped
    assert "".join(deltas) == detok.text == "The answer is 42, said the machine. "
    assert not any(part in delta for delta in deltas for part in ("STOP", "_HERE"))


def test_include_stop_string_in_output(smol: PreTrainedTokenizerBase) -> None:
    ids = smol.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [], stop_strings=["thr"], include_stop_str_in_output=True)
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == "one two thr"
    assert detok.step(ids[:1]) == ("", True)


def test_held_prefix_released_when_it_diverges(smol: PreTrainedTokenizerBase) -> None:
    ids = smol.encode("The END is near", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [], stop_strings=["END OF TEXT"])
    released = []
    for token_id in ids:
        text, stopped = detok.step([token_id])
        assert not stopped
        released.append(text)
        if detok.text.endswith("The"):
            assert "END" not in detok.text
    assert "".join(released) == "The END is near"
    assert detok.flush() == ""


def test_flush_releases_a_dangling_stop_prefix(smol: PreTrainedTokenizerBase) -> None:
    ids = smol.encode("Count: one, two, thr", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [], stop_strings=["three"])
    deltas = [detok.step([t])[0] for t in ids]
    assert "".join(deltas) == "Count: one, two, "
    assert detok.flush() == "thr"
    assert detok.text == "Count: one, two, thr"


def test_stop_strings_count_from_min_tokens(smol: PreTrainedTokenizerBase) -> None:
    ids = smol.encode("Hello world, hello moon", add_special_tokens=False)
    assert smol.decode(ids[:2]) == "Hello world"
    for chunks in ((), (3,)):  # the step that reaches the minimum is searched whole
        detok = IncrementalDetokenizer(smol, [], stop_strings=["ell"], min_tokens=2)
        deltas, stopped = stream(detok, ids, chunks)
        assert stopped and detok.text == ("Hello world, h" if not chunks else "H")
    detok = IncrementalDetokenizer(smol, [], stop_strings=["moon"], min_tokens=len(ids) + 1)
    deltas, stopped = stream(detok, ids)
    assert not stopped and "".join(deltas) == "Hello world, hello moon"


def test_stop_inside_one_token_and_multiple_stops(smol: PreTrainedTokenizerBase) -> None:
    ids = smol.encode("Hello world, hello moon", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [], stop_strings=["moon", "ell"])
    assert stream(detok, ids)[1] and detok.text == "H"
    # The stop that completes first wins, whatever the step size.
    ids = smol.encode("xx abcd yy", add_special_tokens=False)
    for chunks in ([], [len(ids)], [2, 3]):
        detok = IncrementalDetokenizer(smol, [], stop_strings=["abcd", "bc"])
        assert stream(detok, ids, chunks)[1] and detok.text == "xx a"


def test_special_tokens(smol: PreTrainedTokenizerBase) -> None:
    hello = smol.encode("Hello", add_special_tokens=False)
    tail = smol.encode("assistant\nHi", add_special_tokens=False)
    ids = [*hello, IM_END, IM_START, *tail]
    cases = {
        (True, True): "Helloassistant\nHi",
        (True, False): "Helloassistant\nHi",
        (False, False): "Hello<|im_end|><|im_start|>assistant\nHi",
        (False, True): "Hello <|im_end|> <|im_start|> assistant\nHi",
    }
    for (skip, spaces), want in cases.items():
        detok = IncrementalDetokenizer(
            smol, [IM_START], skip_special_tokens=skip, spaces_between_special_tokens=spaces
        )
        assert "".join(stream(detok, ids)[0]) == want, (skip, spaces)
    detok = IncrementalDetokenizer(smol, [], skip_special_tokens=False)
    assert "".join(stream(detok, [IM_START, *hello, IM_END])[0]) == "<|im_start|> Hello <|im_end|>"


def test_token_listing(smol: PreTrainedTokenizerBase, llama_style: PreTrainedTokenizerBase) -> None:
    world = smol.encode(" world", add_special_tokens=False)
    assert [token_listing(smol, t) for t in world] == [(" world", b" world")]
    half = smol.encode("你", add_special_tokens=False)
    listings = [token_listing(smol, t) for t in half]
    assert "".join(text for text, _ in listings).startswith("bytes:\\xe4")
    assert b"".join(data for _, data in listings) == "你".encode()
    assert token_listing(smol, IM_END) == ("<|im_end|>", b"<|im_end|>")
    assert token_listing(smol, 10**9) == ("", b"")
    assert token_listing(smol, -5) in (("", b""), ("token_id:-5", b""))
    byte_e4, byte_a, hello = llama_style.convert_tokens_to_ids(["<0xE4>", "<0x41>", "\u2581Hello"])
    assert token_listing(llama_style, byte_e4) == ("bytes:\\xe4", b"\xe4")
    assert token_listing(llama_style, byte_a) == ("A", b"A")
    assert token_listing(llama_style, hello) == (" Hello", b" Hello")


@pytest.mark.parametrize("name", ["smol", "llama_style"])
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_streams_equal_the_full_decode(
    name: str,
    request: pytest.FixtureRequest,
    loose_tokens: dict[str, list[int]],
    data: st.DataObject,
) -> None:
    tok = request.getfixturevalue(name)
    pieces = st.one_of(
        st.sampled_from(loose_tokens[name]).map(lambda t: [t]),
        st.sampled_from(sorted(special_token_ids(tok))).map(lambda t: [t]),
        st.sampled_from([tok.encode(c, add_special_tokens=False) for c in ("é", "你", "🎉", " a")]),
    )
    tokens = st.lists(pieces, max_size=60).map(lambda parts: [t for part in parts for t in part])
    # Sentencepiece decoding drops the first token's leading space, so there the stream equals
    # the output decoded alone only when no prompt context precedes it.
    prompt = data.draw(tokens)[:8] if name == "smol" else []
    ids = data.draw(tokens)
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=10))
    skip, spaces = data.draw(st.booleans()), data.draw(st.booleans())
    detok = IncrementalDetokenizer(
        tok, prompt, skip_special_tokens=skip, spaces_between_special_tokens=spaces
    )
    deltas, _ = stream(detok, ids, chunks)
    if not skip and spaces:
        want = segmented_reference(tok, ids)
    else:
        want = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert "".join(deltas) == want


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_stop_strings(smol: PreTrainedTokenizerBase, data: st.DataObject) -> None:
    words = st.sampled_from(["a", "b", "ab", " ", "ba", "你", "好", "🎉", "x"])
    text = "".join(data.draw(st.lists(words, max_size=30)))
    stops = data.draw(st.lists(st.text("ab 你x🎉", min_size=1, max_size=4), min_size=1, max_size=3))
    include = data.draw(st.booleans())
    ids = smol.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [], stop_strings=stops, include_stop_str_in_output=include)
    deltas, stopped = stream(detok, ids, data.draw(st.lists(st.integers(1, 4), max_size=8)))
    full = smol.decode(ids)
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    want = full
    if hits:
        end, start, _ = min(hits)
        want = full[:end] if include else full[:start]
    assert stopped == bool(hits)
    assert "".join(deltas) == detok.text == want
