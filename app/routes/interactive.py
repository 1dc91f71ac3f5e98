"""lmdeploy's /v1/chat/interactive: multi-turn sessions whose history and KV stay on the server.

With `interactive_mode` the engine keeps the session's tokens; each turn sends only the new
message, rendered as a continuation of the conversation. Without it the session is reset and the
prompt is answered on its own. Streaming answers are newline-delimited JSON, as lmdeploy sends.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from app.chat_template import ChatTemplateError
from app.engine.config import SamplingParams
from app.engine.sessions import SessionBusyError
from app.errors import APIError
from app.routes import generation as gen
from app.routes.formatting import generation_error
from app.routes.protocol import ChatMessage, InteractiveRequest
from app.routes.structured import request_grammar

if TYPE_CHECKING:
    from app.engine.grammar import CompiledGrammar


def _messages(prompt: str | list[ChatMessage]) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return [m.to_template() for m in prompt]


def register(router: APIRouter, ctx: Any) -> None:
    engine = ctx.engine
    tokenizer = engine.tokenizer

    async def prompt_ids(body: InteractiveRequest, session_id: int) -> list[int]:
        messages = _messages(body.prompt)
        tail = engine.session_tail(session_id) if body.interactive_mode else None
        try:
            text = ctx.template.render_turn(messages, tail)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return await gen.encode(tokenizer, text, add_special_tokens=False)

    @router.post("/v1/chat/interactive")
    async def chat_interactive(body: InteractiveRequest, request: Request) -> Any:
        session_id = body.session_id
        if session_id < -1:
            raise APIError(
                400,
                "session_id must be a non-negative integer (or -1 for a new session)",
                param="session_id",
            )
        if session_id == -1:
            session_id = random.randrange(1 << 30, 1 << 62)
        if body.cancel:
            session = engine.scheduler.sessions.get(session_id)
            if session is None:
                raise APIError(404, f"session {session_id} does not exist", param="session_id")
            if session.busy_request is not None:
                engine.abort(session.busy_request)
            return {
                "text": "",
                "tokens": 0,
                "input_tokens": 0,
                "history_tokens": len(session.history),
                "finish_reason": "abort",
                "session_id": session_id,
            }
        session = engine.scheduler.sessions.get(session_id)
        ending = not body.interactive_mode and body.prompt in ("", [])  # lmdeploy's way to end
        # A turn on a busy session gets 409 and leaves the running turn alone; only ending the
        # session aborts that turn.
        if session is not None and session.busy_request is not None and not ending:
            raise _busy(session_id)
        if not body.interactive_mode:
            existed = engine.end_session(session_id)
            if ending:
                if not existed:
                    raise APIError(404, f"session {session_id} does not exist", param="session_id")
                return {
                    "text": "",
                    "tokens": 0,
                    "input_tokens": 0,
                    "history_tokens": 0,
                    "finish_reason": None,
                    "session_id": session_id,
                }
        session = engine.scheduler.sessions.get(session_id)
        ids = await prompt_ids(body, session_id)
        history = len(session.history) if session is not None else 0
        room = engine.max_model_len - history - len(ids)
        # lmdeploy clients send request_output_len=512 by default: clamp it to the cap, not 400.
        if ctx.settings.server.max_tokens_cap:
            room = min(room, ctx.settings.server.max_tokens_cap)
        stops = gen.check_stops(ctx, body.stop)
        params = SamplingParams(
            max_new_tokens=max(1, min(body.request_output_len or room, room)),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(0, body.top_k),
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            stop_strings=tuple(stops),
            seed=body.seed,
        )
        gen.validate(ctx, params)
        if not ids or any(not 0 <= t < engine.info.vocab_size for t in ids):
            raise APIError(400, "the prompt could not be tokenized", param="prompt")
        grammar = await request_grammar(ctx, body)
        turn = _turn(
            ctx, ids, params, gen.request_id(request), session_id, body.interactive_mode, grammar
        )
        try:
            # The first delta shows the engine took the turn: a concurrent turn that won the
            # race for the session makes this one a 409, before any response is sent.
            first = await gen.unless_disconnected(request, anext(turn))
        except SessionBusyError:
            raise _busy(session_id) from None
        if body.stream:

            async def lines() -> AsyncIterator[bytes]:
                yield orjson.dumps(first) + b"\n"
                async for item in turn:
                    yield orjson.dumps(item) + b"\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        items = [first, *await gen.unless_disconnected(request, gen.collect(turn))]
        last = items[-1]
        if last["finish_reason"] == "error":
            raise generation_error(last.get("error"), last.get("error_code"))
        return {**last, "text": "".join(i["text"] for i in items)}


def _busy(session_id: int) -> APIError:
    return APIError(
        409,
        f"session {session_id} is busy with another request",
        param="session_id",
        code="session_busy",
    )


async def _turn(
    ctx: Any,
    ids: list[int],
    params: SamplingParams,
    rid: str,
    session_id: int,
    keep: bool,
    grammar: CompiledGrammar | None,
) -> AsyncIterator[dict[str, Any]]:
    engine = ctx.engine
    try:
        run = gen.EngineRun(ctx, [ids], params, rid, session_id=session_id, grammar=grammar)
        async for _, out in run.outputs():
            item = {
                "text": out.text,
                "tokens": out.completion_tokens,
                "input_tokens": out.prompt_tokens,
                "history_tokens": out.history_tokens,
                "finish_reason": out.finish_reason,
                "session_id": session_id,
            }
            if (
                out.finish_reason == "length"
                and out.prompt_tokens + out.history_tokens + out.completion_tokens
                >= engine.max_model_len
            ):
                item["message"] = (
                    f"the session reached session_len ({engine.max_model_len} "
                    "tokens); end it or start a new one"
                )
            if out.finish_reason == "error":
                item["error"] = out.error
                if out.error_code:
                    item["error_code"] = out.error_code
            yield item
    finally:
        if not keep:
            engine.end_session(session_id)
