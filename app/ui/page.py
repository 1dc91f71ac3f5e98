"""The chat page: streaming replies, a system prompt, sampling controls, Stop, Reset and the
interactive-session switch, over any ChatBackend.

Every handler is async, so it runs on the web server's event loop, where the backend lives.
Errors become a warning and a line on the page; the conversation stays as it was.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.ui.backend import BackendError, ChatBackend, Sampling

log = logging.getLogger("splitfuse.ui")

# Fonts the browser has: the default theme's web fonts need the internet, which a deployment
# (or a test machine) may not have.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
CSS = "#status { min-height: 1.5em; } #model-info p { margin: 0; }"
ENDINGS = {
    "stop": "Done",
    "abort": "Stopped",
    "length": "Reached the token limit",
    "error": "Failed",
}


@dataclass
class Chat:
    """One browser tab's conversation: its id (the engine session id) and its messages.

    Gradio hands every event of a tab the same object, so a change made by Reset is seen by a
    reply that is still streaming.
    """

    chat_id: int = field(default_factory=lambda: secrets.randbelow(1 << 62))
    messages: list[dict[str, str]] = field(default_factory=list)  # user/assistant turns
    epoch: int = 0  # bumped by Reset, so a reply still streaming knows it was dropped


def _new_chat() -> Chat:
    # A function, not the class: gradio would serialize a dataclass default into the page config.
    return Chat()


def _conversation(chat: Chat, system: str, text: str) -> list[dict[str, str]]:
    system_turn = [{"role": "system", "content": system.strip()}] if system.strip() else []
    return [*system_turn, *chat.messages, {"role": "user", "content": text}]


def _summary(finish_reason: str | None, tokens: int, notes: list[str]) -> str:
    ending = ENDINGS.get(finish_reason or "", "Ended")
    return " · ".join([f"{ending} after {tokens} tokens", *notes])


def build_page(backend: ChatBackend) -> gr.Blocks:
    """The page, wired to `backend`."""

    async def on_load() -> tuple[str, Any]:
        try:
            info = await backend.info()
        except BackendError as exc:
            gr.Warning(str(exc))
            return f"**splitfuse** · model unavailable: {exc}", gr.update()
        context = f"{info.context_length:,} tokens" if info.context_length else "not reported"
        header = f"**splitfuse** · model **{info.name}** · context {context} · {info.where}"
        limit = gr.update(maximum=info.context_length) if info.context_length else gr.update()
        return header, limit

    async def on_send(
        text: str,
        chat: Chat,
        system: str,
        interactive: bool,
        temperature: float,
        top_p: float,
        top_k: float,
        max_tokens: float,
    ) -> AsyncIterator[tuple[Any, ...]]:
        text = text.strip()
        if not text:
            return
        epoch = chat.epoch
        sampling = Sampling(temperature, top_p, int(top_k), int(max_tokens))
        messages = _conversation(chat, system, text)
        shown = [*chat.messages, {"role": "user", "content": text}]
        answer = {"role": "assistant", "content": ""}
        yield "", [*shown, answer], "Generating…"
        tokens, finish, notes = 0, None, []
        try:
            stream = backend.reply(chat.chat_id, messages, interactive, sampling)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    if chat.epoch != epoch:  # Reset while streaming: drop this reply
                        return
                    answer["content"] += delta.text
                    tokens, finish = delta.tokens, delta.finish_reason or finish
                    if delta.message and delta.message not in notes:
                        notes.append(delta.message)
                    yield gr.update(), [*shown, answer], "Generating…"
        except BackendError as exc:
            gr.Warning(str(exc))
            yield text, chat.messages, f"Error: {exc}"
            return
        except Exception as exc:  # the page must survive anything: say what failed, log why
            log.exception("chat %d: the reply failed", chat.chat_id)
            gr.Warning(f"{type(exc).__name__}: {exc}")
            yield text, chat.messages, f"Error: {type(exc).__name__}: {exc}"
            return
        if chat.epoch != epoch:
            return
        chat.messages = [*shown, answer]
        yield gr.update(), chat.messages, _summary(finish, tokens, notes)

    async def on_stop(chat: Chat) -> None:
        try:
            await backend.cancel(chat.chat_id)
        except BackendError as exc:
            gr.Warning(str(exc))

    async def on_reset(chat: Chat) -> tuple[Any, ...]:
        chat.epoch += 1
        chat.messages = []
        try:
            await backend.reset(chat.chat_id)
        except BackendError as exc:
            gr.Warning(str(exc))
            return [], f"Cleared here, but the server session may remain: {exc}"
        return [], "Conversation cleared"

    async def on_mode(chat: Chat, interactive: bool) -> str:
        # The server session is dropped either way: it would be stale once turns are re-sent,
        # and a new one must start from the whole conversation.
        try:
            await backend.reset(chat.chat_id)
        except BackendError as exc:
            gr.Warning(str(exc))
        if interactive:
            return "Interactive session: the server keeps the history; each turn sends one message"
        return "Each turn re-sends the whole conversation"

    with gr.Blocks(title="splitfuse", analytics_enabled=False) as page:
        chat_state = gr.State(_new_chat)
        header = gr.Markdown("**splitfuse**", elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    elem_id="chat",
                    height=520,
                    label="Conversation",
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                )
                with gr.Row(equal_height=True):
                    message = gr.Textbox(
                        placeholder="Type a message, press Enter",
                        show_label=False,
                        scale=1,
                        elem_id="message",
                        autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", scale=0, min_width=90)
                    stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="stop")
                    reset = gr.Button("Reset", scale=0, min_width=90, elem_id="reset")
                status = gr.Markdown("Ready", elem_id="status")
            with gr.Column(scale=1):
                system = gr.Textbox(
                    label="System prompt",
                    lines=3,
                    placeholder="(the model's default)",
                    elem_id="system",
                    info="Sent with the first turn of an interactive session",
                )
                interactive = gr.Checkbox(
                    value=True,
                    label="Interactive session (history kept on the server)",
                    elem_id="interactive",
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p", elem_id="top-p")
                top_k = gr.Slider(0, 200, value=40, step=1, label="Top k (0: off)", elem_id="top-k")
                max_tokens = gr.Slider(
                    1, 8192, value=512, step=1, label="Max new tokens", elem_id="max-tokens"
                )

        page.load(on_load, outputs=[header, max_tokens])
        inputs = [message, chat_state, system, interactive, temperature, top_p, top_k, max_tokens]
        outputs = [message, chatbot, status]
        for trigger in (message.submit, send.click):
            trigger(on_send, inputs, outputs, concurrency_limit=None, show_progress="hidden")
        stop.click(on_stop, chat_state, None, concurrency_limit=None, queue=False)
        # The chat box's own trash button clears the same way as Reset.
        for trigger in (reset.click, chatbot.clear):
            trigger(on_reset, chat_state, [chatbot, status], concurrency_limit=None)
        interactive.change(on_mode, [chat_state, interactive], status, concurrency_limit=None)
    return page
