"""The lmdeploy-style APIClient and `splitfuse client` against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from server_harness import Server

from app.client import APIClient, APIError


@pytest.fixture
def api(tiny_server: Server) -> APIClient:
    return APIClient(tiny_server.url, api_key=tiny_server.api_key)


def test_models_chat_and_completions(api: APIClient, tiny_server: Server) -> None:
    assert api.available_models == [tiny_server.model]
    model = api.available_models[0]
    [reply] = api.chat_completions_v1(model, "Hi", max_tokens=5, temperature=0)
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
    chunks = list(api.chat_completions_v1(model, "Hi", max_tokens=5, temperature=0, stream=True))
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == reply["choices"][0]["message"]["content"]
    [text] = api.completions_v1(model, "Once upon", max_tokens=4, temperature=0)
    assert text["object"] == "text_completion"
    ids, length = api.encode("Hello world")
    assert length == len(ids) > 0


def test_interactive_turns_and_end(api: APIClient) -> None:
    first = list(
        api.chat_interactive_v1(
            "Hi", session_id=4242, interactive_mode=True, request_output_len=4, temperature=0
        )
    )
    assert first[-1]["history_tokens"] == 0
    second = list(
        api.chat_interactive_v1(
            "Again",
            session_id=4242,
            interactive_mode=True,
            request_output_len=4,
            temperature=0,
            stream=True,
        )
    )
    assert second[-1]["history_tokens"] > 0 and second[-1]["finish_reason"] is not None
    api.end_session(4242)
    with pytest.raises(APIError) as missing:
        api.end_session(4242)
    assert missing.value.status == 404


def test_errors_carry_status_and_message(tiny_server: Server) -> None:
    with pytest.raises(APIError) as unauthorized:
        APIClient(tiny_server.url, api_key="wrong").available_models  # noqa: B018
    assert unauthorized.value.status == 401
    api = APIClient(tiny_server.url, api_key=tiny_server.api_key)
    with pytest.raises(APIError) as bad:
        list(api.chat_completions_v1(tiny_server.model, "Hi", temperature=-1))
    assert bad.value.status == 400 and "temperature" in bad.value.message


def test_terminal_client_chats_and_resets(tiny_server: Server) -> None:
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "client",
        tiny_server.url,
        "--api-key",
        tiny_server.api_key or "",
        "--session-id",
        "31337",
    ]
    started = time.monotonic()
    result = subprocess.run(
        command,
        input="Hello there\n/reset\nHi again\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(conversation reset)" in result.stdout
    assert result.stdout.count(">>> ") >= 3
    # The client prints failures as "error: ..." or "(error: ...)"; random-weight text may
    # contain the word itself, so look for the client's own markers.
    assert not re.search(r"^error: |\(error: ", result.stdout, re.MULTILINE)
    assert time.monotonic() - started < 120
