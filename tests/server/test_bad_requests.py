"""RELIABILITY.md's bad-request table, row by row: each bad request gets its status and an
OpenAI error body that leaks nothing, and the next good request still succeeds."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from server_harness import Reply, Server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
INTERACTIVE = "/v1/chat/interactive"
HELLO = [{"role": "user", "content": "hello"}]
CONTEXT = 256  # the shared tiny server's --session-len
LONG_TEXT = " ".join(["hello"] * 400)  # 400 tokens, past the context


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, "max_tokens": 4, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hello", "max_tokens": 4, **fields}


def raw(text: str) -> bytes:
    return text.encode()


@dataclass
class Case:
    """One row: what is sent and what must come back."""

    body: Any = None
    status: int = 400
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True
    mentions: tuple[str, ...] = ()  # substrings the error message must contain
    param: str | None = None  # the `param` the error must name, when given


CASES: dict[str, Case] = {
    # Not JSON, not an object, wrong types, missing fields.
    "malformed-json": Case(raw('{"messages": [')),
    "non-object-body": Case(raw("[1, 2, 3]")),
    "string-body": Case(raw('"hello"')),
    "empty-body": Case(b"", mentions=("empty",)),
    "messages-wrong-type": Case(chat(messages="hello"), param="messages"),
    "max-tokens-string": Case(chat(max_tokens="10"), param="max_tokens"),
    "stream-wrong-type": Case(chat(stream="yes"), param="stream"),
    "content-wrong-type": Case(chat(messages=[{"role": "user", "content": 5}])),
    "content-part-image": Case(
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    ),
    "stream-options-wrong-type": Case(chat(stream=True, stream_options={"include_usage": 1})),
    "missing-messages": Case({"max_tokens": 4}, param="messages"),
    "missing-prompt": Case({"max_tokens": 4}, path=COMPLETIONS, param="prompt"),
    "empty-messages": Case(chat(messages=[]), param="messages"),
    "unknown-role": Case(chat(messages=[{"role": "wizard", "content": "hi"}])),
    "empty-prompt": Case(completion(prompt=""), path=COMPLETIONS),
    "empty-prompt-ids": Case(completion(prompt=[]), path=COMPLETIONS),
    # Sizes and counts.
    "n-zero": Case(chat(n=0), param="n"),
    "n-over-limit": Case(chat(n=1000), param="n"),
    "best-of-differs": Case(completion(n=1, best_of=5), path=COMPLETIONS),
    "max-tokens-zero": Case(chat(max_tokens=0), param="max_tokens"),
    "max-tokens-negative": Case(chat(max_tokens=-5), param="max_tokens"),
    "max-tokens-over-context": Case(chat(max_tokens=100_000), param="max_tokens"),
    "prompt-plus-max-tokens-over-context": Case(
        completion(prompt="hello world", max_tokens=CONTEXT - 1),
        path=COMPLETIONS,
        mentions=("2 tokens", str(CONTEXT - 1), str(CONTEXT)),
        param="max_tokens",
    ),
    "min-tokens-over-max-tokens": Case(chat(min_tokens=10, max_tokens=5), param="min_tokens"),
    "min-tokens-over-context-without-max-tokens": Case(
        {"messages": HELLO, "min_tokens": 10_000}, param="min_tokens"
    ),
    "min-tokens-negative": Case(chat(min_tokens=-1), param="min_tokens"),
    # Sampling ranges, NaN and Infinity.
    "temperature-negative": Case(chat(temperature=-0.5), param="temperature"),
    "temperature-too-high": Case(chat(temperature=3.0), param="temperature"),
    "top-p-above-one": Case(chat(top_p=1.5), param="top_p"),
    "top-p-zero": Case(chat(top_p=0.0), param="top_p"),
    "top-k-below-minus-one": Case(chat(top_k=-2), param="top_k"),
    "min-p-above-one": Case(chat(min_p=2.0), param="min_p"),
    "presence-penalty": Case(chat(presence_penalty=5.0), param="presence_penalty"),
    "frequency-penalty": Case(chat(frequency_penalty=-3.0), param="frequency_penalty"),
    "repetition-penalty-zero": Case(chat(repetition_penalty=0.0), param="repetition_penalty"),
    "temperature-bool": Case(chat(temperature=True), param="temperature"),
    "top-p-string": Case(chat(top_p="1"), param="top_p"),
    "presence-penalty-bool": Case(chat(presence_penalty=False), param="presence_penalty"),
    "interactive-temperature-string": Case(
        {"prompt": "hi", "temperature": "0.1"}, path=INTERACTIVE, param="temperature"
    ),
    "temperature-nan": Case(raw(f'{{"messages": {json.dumps(HELLO)}, "temperature": NaN}}')),
    "top-p-infinity": Case(raw(f'{{"messages": {json.dumps(HELLO)}, "top_p": Infinity}}')),
    "temperature-overflow": Case(raw(f'{{"messages": {json.dumps(HELLO)}, "temperature": 1e999}}')),
    # Logprobs.
    "top-logprobs-over-limit": Case(chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    "top-logprobs-without-logprobs": Case(chat(top_logprobs=2), param="top_logprobs"),
    "completion-logprobs-over-limit": Case(
        completion(logprobs=50), path=COMPLETIONS, param="logprobs"
    ),
    # logit_bias, stop strings, token ids.
    "logit-bias-key-not-a-number": Case(chat(logit_bias={"abc": 1}), param="logit_bias"),
    "logit-bias-key-outside-vocab": Case(chat(logit_bias={"99999999": 1}), param="logit_bias"),
    "logit-bias-key-huge": Case(chat(logit_bias={"9" * 40: 1}), param="logit_bias"),
    "logit-bias-value-too-big": Case(chat(logit_bias={"5": 500}), param="logit_bias"),
    "logit-bias-value-not-a-number": Case(chat(logit_bias={"5": "x"}), param="logit_bias"),
    "logit-bias-value-string": Case(chat(logit_bias={"5": "5"}), param="logit_bias"),
    # str.isdigit() takes superscripts and other scripts' digits; int() refuses the first.
    "logit-bias-key-superscript": Case(chat(logit_bias={"\u00b2": 1}), param="logit_bias"),
    "logit-bias-key-arabic-indic": Case(
        completion(logit_bias={"\u0661": 1}), path=COMPLETIONS, param="logit_bias"
    ),
    "too-many-stop-strings": Case(chat(stop=[f"s{i}" for i in range(17)]), param="stop"),
    "stop-string-too-long": Case(chat(stop=["x" * 300]), param="stop"),
    "stop-string-empty": Case(chat(stop=[""]), param="stop"),
    "stop-token-id-outside-vocab": Case(chat(stop_token_ids=[10**9]), param="stop_token_ids"),
    "prompt-token-outside-vocab": Case(completion(prompt=[1, 2, 10**8]), path=COMPLETIONS),
    "prompt-token-negative": Case(completion(prompt=[-1]), path=COMPLETIONS),
    "detokenize-outside-vocab": Case({"tokens": [10**8]}, path="/detokenize", param="tokens"),
    # The context.
    "prompt-over-session-len": Case(
        completion(prompt=LONG_TEXT), path=COMPLETIONS, mentions=("400", str(CONTEXT))
    ),
    "chat-prompt-over-session-len": Case(
        chat(messages=[{"role": "user", "content": LONG_TEXT}]), mentions=(str(CONTEXT),)
    ),
    # The model.
    "unknown-model": Case(chat(model="gpt-4"), status=404, param="model"),
    "unknown-model-completions": Case(completion(model="../etc"), path=COMPLETIONS, status=404),
    # Body encoding: invalid UTF-8, lone surrogates, NUL; streaming or not.
    "invalid-utf8": Case(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    "invalid-utf8-stream": Case(
        b'{"stream": true, "messages": [{"role": "user", "content": "\xc3\x28"}]}'
    ),
    "lone-surrogate": Case(raw('{"messages": [{"role": "user", "content": "\\ud800"}]}')),
    "lone-surrogate-stream": Case(raw('{"stream": true, "prompt": "a\\udfff"}'), path=COMPLETIONS),
    "nul-character": Case(chat(messages=[{"role": "user", "content": "a\u0000b"}])),
    "nul-character-stream": Case(completion(prompt="a\u0000b", stream=True), path=COMPLETIONS),
    "nul-in-stop": Case(chat(stop=["\u0000"])),
    # Size limits before parsing.
    "oversize-body": Case(completion(prompt="a " * 600_000), status=413),
    "huge-header": Case(chat(), headers={"X-Filler": "a" * 100_000}, status=431),
    "too-many-headers": Case(
        chat(), headers={f"X-Filler-{i}": "a" for i in range(300)}, status=431
    ),
    # Chat templates from the request (disabled here); invalid grammars and tool choices.
    "request-chat-template": Case(chat(chat_template="{{ messages }}"), param="chat_template"),
    "request-chat-template-kwargs": Case(chat(chat_template_kwargs={"x": 1})),
    "response-format-json-schema": Case(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": -1}},
            }
        ),
        mentions=("minProperties",),
        param="response_format",
    ),
    "response-format-unknown-type": Case(
        chat(response_format={"type": "yaml"}), param="response_format"
    ),
    "guided-regex": Case(chat(guided_regex="(a+"), param="guided_regex"),
    "guided-two-fields": Case(chat(guided_regex="a", guided_choice=["a"])),
    "guided-json-completions": Case(
        completion(guided_json="{not json"), path=COMPLETIONS, param="guided_json"
    ),
    "guided-regex-interactive": Case(
        {"prompt": "hi", "response_format": {"type": "regex_schema", "regex_schema": "(a"}},
        path=INTERACTIVE,
        param="response_format",
    ),
    "tool-choice": Case(
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        mentions=("not in tools",),
        param="tool_choice",
    ),
    "tool-choice-without-tools": Case(chat(tool_choice="required"), param="tool_choice"),
    # Interactive sessions: odd ids, empty prompts, bad lengths.
    "session-id-path": Case({"session_id": "../x", "prompt": "hi"}, path=INTERACTIVE),
    "session-id-negative": Case({"session_id": -7, "prompt": "hi"}, path=INTERACTIVE),
    "session-id-float": Case({"session_id": 1.5, "prompt": "hi"}, path=INTERACTIVE),
    "session-id-huge": Case({"session_id": 2**70, "prompt": "hi"}, path=INTERACTIVE),
    "session-id-bool": Case({"session_id": True, "prompt": "hi"}, path=INTERACTIVE),
    "session-empty-prompt": Case(
        {"session_id": 5, "prompt": "", "interactive_mode": True}, path=INTERACTIVE, param="prompt"
    ),
    "session-end-unknown": Case(
        {"session_id": 434343, "prompt": "", "interactive_mode": False},
        path=INTERACTIVE,
        status=404,
        param="session_id",
    ),
    "session-stop-empty": Case({"prompt": "hi", "stop": [""]}, path=INTERACTIVE, param="stop"),
    "session-unknown-role": Case(
        {"prompt": [{"role": "wizard", "content": "hi"}]}, path=INTERACTIVE, mentions=("role",)
    ),
    "session-output-len-zero": Case(
        {"session_id": 5, "prompt": "hi", "request_output_len": 0}, path=INTERACTIVE
    ),
    "session-cancel-unknown": Case(
        {"session_id": 424242, "prompt": "", "cancel": True}, path=INTERACTIVE, status=404
    ),
    "tokenize-neither-prompt-nor-messages": Case({}, path="/tokenize"),
    # Paths and methods.
    "unknown-path": Case(chat(), path="/v1/nothing", status=404),
    "unknown-path-get": Case(None, method="GET", path="/admin/secret", status=404),
    "wrong-method": Case(None, method="GET", path=CHAT, status=405),
    "wrong-method-delete": Case(None, method="DELETE", path="/v1/models", status=405),
}

AUTH_ROUTES = [
    ("GET", "/v1/models"),
    ("POST", CHAT),
    ("POST", COMPLETIONS),
    ("POST", INTERACTIVE),
    ("POST", "/v1/encode"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/%6Dodels"),  # an encoded path is still the models route
    ("GET", "/v1/models/"),
    ("GET", "//v1/models"),
    ("GET", "/health/../metrics"),
    ("GET", "/nowhere"),
]
BAD_CREDENTIALS = {
    "missing": {},
    "wrong-key": {"Authorization": "Bearer wrong-key"},
    "basic-scheme": {"Authorization": "Basic dGVzdC1rZXk="},
    "empty-bearer": {"Authorization": "Bearer "},
    "key-as-prefix": {"Authorization": "Bearer test-key-and-more"},
}


def assert_error_body(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    leaks = ("Traceback", 'File "', " object at 0x", "pydantic", "function-after", "list[")
    for leak in leaks:
        assert leak not in error["message"], error["message"]
    assert "[" not in (error["param"] or ""), error
    return error


def assert_still_serving(server: Server) -> None:
    reply = server.post(COMPLETIONS, completion(max_tokens=2, temperature=0))
    assert reply.status == 200, reply.body
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.health() == 200


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_request(tiny_server: Server, case: Case) -> None:
    reply = tiny_server.request(case.method, case.path, case.body, case.headers, auth=case.auth)
    error = assert_error_body(reply, case.status)
    for text in case.mentions:
        assert text in error["message"], error["message"]
    if case.param is not None:  # a nested field's param is a dotted path under it
        assert (error["param"] or "").split(".")[0] == case.param, error
    assert_still_serving(tiny_server)


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
@pytest.mark.parametrize(("method", "path"), AUTH_ROUTES, ids=[p for _, p in AUTH_ROUTES])
def test_auth_on_every_route_but_health(
    tiny_server: Server, method: str, path: str, credentials: dict[str, str]
) -> None:
    body = chat() if method == "POST" else None
    reply = tiny_server.request(method, path, body, credentials, auth=False)
    error = assert_error_body(reply, 401)
    assert error["code"] == "invalid_api_key"


def test_oversize_body_in_chunks_gets_413(tiny_server: Server) -> None:
    filler = b"a " * 2**16
    chunks = iter([b'{"prompt": "', *[filler] * 40, b'"}'])  # 5 MiB without a Content-Length
    assert_error_body(tiny_server.post(COMPLETIONS, chunks), 413)
    assert_still_serving(tiny_server)


def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_server: Server) -> None:
    """A prompt near the body limit of a token per two bytes takes about a second to tokenize
    (and is then refused as over the context); /health answers meanwhile."""
    body = completion(prompt="1 2 3 4 " * 128_000)
    replies: list[Reply] = []
    worker = threading.Thread(target=lambda: replies.append(tiny_server.post(COMPLETIONS, body)))
    worker.start()
    latencies = []
    while worker.is_alive():
        start = time.perf_counter()
        assert tiny_server.health() == 200
        latencies.append(time.perf_counter() - start)
    worker.join()
    assert "1024000" in assert_error_body(replies[0], 400)["message"]
    assert latencies and max(latencies) < 0.5, latencies


def test_health_needs_no_key_and_the_key_opens_the_rest(tiny_server: Server) -> None:
    assert tiny_server.request("GET", "/health", auth=False).status == 200
    assert tiny_server.request("GET", "/v1/%6Dodels").status == 200
    assert tiny_server.request("GET", "/metrics").status == 200
    schema = tiny_server.request("GET", "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_metric_label_sets_stay_fixed(tiny_server: Server) -> None:
    def label_sets() -> set[str]:
        return {name for name in tiny_server.metrics() if "{" in name}

    before = label_sets()
    for path in ("/v1/nothing", "/v1/%2e%2e/x", "/a" * 50):
        assert tiny_server.request("GET", path).status == 404
    tiny_server.post(CHAT, chat(model="other"))
    assert label_sets() == before


def test_unknown_fields_are_ignored(tiny_server: Server) -> None:
    reply = tiny_server.post(CHAT, chat(temperature=0, frobnicate=True, metadata={"a": "b"}))
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["object"] == "chat.completion"
