"""Terminal chat: `splitfuse chat` with a local engine, `splitfuse client URL` against a server.

Both keep the conversation as an engine session (only each new turn is sent and prefilled),
stream the reply, and understand /reset and /exit; Ctrl-C stops a reply without leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

HELP = "Type a message. /reset starts over, /exit leaves; Ctrl-C stops a reply."
SESSION_ID = 1


async def _read_line(prompt: str) -> str | None:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, input, prompt)
    except EOFError:
        return None


async def _chat_loop(
    reply: Callable[[str], AsyncIterator[str]], reset: Callable[[], Any], title: str
) -> None:
    """Read lines, stream replies; SIGINT cancels the reply in progress."""
    print(f"{title}\n{HELP}")
    loop = asyncio.get_running_loop()
    current: asyncio.Task[None] | None = None

    def on_sigint() -> None:
        if current is not None and not current.done():
            current.cancel()
        else:
            raise SystemExit(0)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)

    async def speak(text: str) -> None:
        async for delta in reply(text):
            sys.stdout.write(delta)
            sys.stdout.flush()

    while True:
        line = await _read_line("\n>>> ")
        if line is None or line.strip() == "/exit":
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            await reset()
            print("(conversation reset)")
            continue
        current = asyncio.create_task(speak(line))
        try:
            await current
        except asyncio.CancelledError:
            print("\n(stopped)")
        except Exception as exc:
            print(f"\nerror: {exc}")
        finally:
            current = None
        print()


def run_chat(settings: Any, params: Any) -> None:
    """Chat with a model in this process."""
    from app.chat_template import ChatTemplate, resolve_template_source
    from app.engine.engine import AsyncEngine

    # Refuse bad flags before the load. The chat flags carry no token ids, so the vocabulary
    # size plays no part in the sampling checks.
    params.validate(vocab_size=0)
    if settings.engine.chat_template:
        resolve_template_source(settings.engine.chat_template)
    engine = AsyncEngine(settings.model, settings.engine)
    # Shut the engine down on every way out, or its native objects leak at exit.
    try:
        template = ChatTemplate.for_tokenizer(engine.tokenizer, settings.engine.chat_template)
        tokenizer = engine.tokenizer

        async def reply(text: str) -> AsyncIterator[str]:
            messages = [{"role": "user", "content": text}]
            prompt = template.render_turn(messages, engine.session_tail(SESSION_ID))
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            async for out in engine.generate(ids, params, session_id=SESSION_ID):
                if out.finish_reason == "length" and out.completion_tokens == 0:
                    yield "(the conversation is full: /reset to start over)"
                elif out.finish_reason == "error":
                    yield f"(error: {out.error})"
                yield out.text

        async def reset() -> None:
            engine.end_session(SESSION_ID)

        async def main() -> None:
            try:
                await _chat_loop(reply, reset, f"splitfuse chat: {engine.model_name}")
            finally:
                await engine.stop()

        asyncio.run(main())
    finally:
        engine.shutdown()


def run_client(url: str, api_key: str | None = None, session_id: int | None = None) -> None:
    """Chat with a running server through /v1/chat/interactive."""
    import random

    import aiohttp

    session = session_id if session_id is not None else random.randrange(1, 1 << 31)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/chat/interactive"

    async def main() -> None:
        async with aiohttp.ClientSession(headers=headers) as http:

            async def reply(text: str) -> AsyncIterator[str]:
                body = {
                    "prompt": text,
                    "session_id": session,
                    "interactive_mode": True,
                    "stream": True,
                }
                async with http.post(endpoint, json=body) as response:
                    if response.status != 200:
                        error = (await response.json(content_type=None)).get("error", {})
                        raise RuntimeError(error.get("message", f"HTTP {response.status}"))
                    async for raw in response.content:
                        if raw.strip():
                            item = json.loads(raw)
                            yield item.get("text", "")
                            if item.get("message"):
                                yield f"\n({item['message']})"

            async def reset() -> None:
                body = {"prompt": "", "session_id": session, "interactive_mode": False}
                async with http.post(endpoint, json=body):
                    pass

            await _chat_loop(reply, reset, f"splitfuse client: {url} (session {session})")

    try:
        asyncio.run(main())
    except aiohttp.ClientConnectionError as exc:
        raise ValueError(f"cannot reach {url}: {exc}") from None
