"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json (valid and
invalid ones) for a bounded number of cases; none may get a 5xx, every 4xx is an OpenAI error.
The server allows chat templates in requests, so hostile templates are tried here too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from server_harness import API_KEY, Server, start_server

schemathesis = pytest.importorskip("schemathesis")

CASES_PER_OPERATION = 30
TEMPLATE_TIMEOUT = 1.0
HOSTILE_TEMPLATES = {
    "sandbox-escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "huge-string": "{{ 'a' * 10**10 }}",
    "huge-list": "{{ [1] * 10**10 }}",
    "huge-range": "{% for i in range(10**9) %}x{% endfor %}",
    "huge-power": "{{ 7 ** 1000000000 }}",
    "huge-output": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
    "{% endfor %}",
    "silent-loop": "{% set x = range(100000)|list %}{% for i in x %}{% for j in x %}{% endfor %}"
    "{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "division-by-zero": "{{ 1 / 0 }}",
    "undefined": "{{ nothing.at.all }}",
    "syntax-error": "{% for %}",
    "raise-exception": "{{ raise_exception('refused') }}",
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_logs: Path) -> Iterator[Server]:
    # A small max_tokens cap keeps every generated request cheap.
    running = start_server(
        tiny_model_dir,
        server_logs,
        "--session-len",
        "256",
        "--max-tokens-cap",
        "4",
        api_key=API_KEY,
        env={
            "SPLITFUSE_ALLOW_REQUEST_CHAT_TEMPLATE": "true",
            "SPLITFUSE_CHAT_TEMPLATE_TIMEOUT": str(TEMPLATE_TIMEOUT),
        },
    )
    yield running
    running.stop()


def test_openapi_describes_the_request_bodies(server: Server) -> None:
    schema = server.request("GET", "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/tokenize"):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert "$ref" in body["content"]["application/json"]["schema"]


def test_fuzzed_requests_never_get_a_5xx(server: Server) -> None:
    schema = schemathesis.openapi.from_url(
        server.url + "/openapi.json", headers=server.auth(), timeout=30
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.body:  # nothing to make invalid in a request without a body
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(
                max_examples=CASES_PER_OPERATION,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=server.url, headers=server.auth(), timeout=60)
                assert response.status_code < 500, (
                    f"{case.method} {case.path} {case.body!r} -> "
                    f"{response.status_code} {response.text[:300]}"
                )
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}

            check()
    assert server.health() == 200
    server.wait_idle()


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_hostile_request_templates_get_a_400_in_bounded_time(server: Server, template: str) -> None:
    start = time.monotonic()
    reply = server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "chat_template": template},
    )
    assert reply.status == 400, reply.body[:300]
    assert time.monotonic() - start < TEMPLATE_TIMEOUT + 3
    error = reply.json()["error"]
    assert error["param"] in ("chat_template", "messages") and "Traceback" not in error["message"]
    assert server.health() == 200


def test_a_request_template_renders_when_allowed(server: Server) -> None:
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    reply = server.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template": template,
            "max_tokens": 2,
        },
    )
    assert reply.status == 200, reply.body
    expected = server.post("/tokenize", {"prompt": "user: hi\nassistant:"}).json()["count"]
    assert reply.json()["usage"]["prompt_tokens"] == expected
    # A billion-space indent is clamped, not allocated.
    start = time.monotonic()
    bomb = "{{ messages | tojson(indent=10**9) }}"
    reply = server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "chat_template": bomb, "max_tokens": 1},
    )
    assert reply.status == 200 and time.monotonic() - start < 3
