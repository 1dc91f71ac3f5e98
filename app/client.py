"""A small synchronous client with lmdeploy's APIClient method names.

    from app.client import APIClient
    client = APIClient("http://127.0.0.1:23333")
    model = client.available_models[0]
    for item in client.chat_completions_v1(model, [{"role": "user", "content": "Hi"}]):
        print(item)

Each method is a generator: one item for a plain request, one per chunk when `stream=True`.
Errors come back as APIError with the server's status and OpenAI error message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class APIError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class APIClient:
    """Talks to a splitfuse (or lmdeploy, or OpenAI-compatible) server."""

    def __init__(self, api_server_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.url = api_server_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    # ------------------------------------------------------------------ plumbing
    def _open(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers=self.headers,
            method="GET" if body is None else "POST",
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise APIError(exc.code, str(message)) from None

    def _get(self, path: str) -> Any:
        with self._open(path) as response:
            return json.loads(response.read())

    def _post(
        self, path: str, body: dict[str, Any], stream: bool, sse: bool = True
    ) -> Iterator[dict[str, Any]]:
        with self._open(path, body) as response:
            if not stream:
                yield json.loads(response.read())
                return
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                if sse:
                    if not line.startswith("data:"):
                        continue
                    line = line[5:].strip()
                    if line == "[DONE]":
                        return
                item = json.loads(line)
                if "error" in item:
                    raise APIError(500, item["error"].get("message", "generation failed"))
                yield item

    # --------------------------------------------------------------------- API
    @property
    def available_models(self) -> list[str]:
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def encode(
        self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True
    ) -> tuple[Any, Any]:
        body = {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos}
        result = next(self._post("/v1/encode", body, stream=False))
        return result["input_ids"], result["length"]

    def chat_completions_v1(
        self, model: str, messages: str | list[dict[str, Any]], stream: bool = False, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": model, "messages": messages, "stream": stream, **kwargs}
        yield from self._post("/v1/chat/completions", body, stream)

    def completions_v1(
        self, model: str, prompt: str | list[Any], stream: bool = False, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        body = {"model": model, "prompt": prompt, "stream": stream, **kwargs}
        yield from self._post("/v1/completions", body, stream)

    def chat_interactive_v1(
        self,
        prompt: str | list[dict[str, Any]],
        session_id: int = -1,
        interactive_mode: bool = False,
        stream: bool = False,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        body = {
            "prompt": prompt,
            "session_id": session_id,
            "interactive_mode": interactive_mode,
            "stream": stream,
            **kwargs,
        }
        yield from self._post("/v1/chat/interactive", body, stream, sse=False)

    def end_session(self, session_id: int) -> None:
        """End an interactive session on the server (lmdeploy: interactive_mode=False)."""
        next(self.chat_interactive_v1("", session_id=session_id, interactive_mode=False))
