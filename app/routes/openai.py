"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request

from app.chat_template import ChatTemplateError
from app.engine.engine import RequestOutput
from app.engine.outputs import TokenLogprob
from app.errors import APIError
from app.routes import generation as gen
from app.routes.formatting import (
    TextOffsets,
    Usage,
    chat_logprobs,
    completion_logprobs,
    completion_logprobs_echoed,
    generation_error,
    sse,
)
from app.routes.protocol import ChatCompletionRequest, CompletionRequest
from app.routes.streams import chat_chunks, completion_chunks
from app.routes.structured import ChatPlan, OutputParsers, chat_plan, request_grammar


def register(router: APIRouter, ctx: Any) -> None:
    engine = ctx.engine
    tokenizer = engine.tokenizer
    parsers = OutputParsers.from_settings(ctx)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.model_name,
                    "object": "model",
                    "created": int(ctx.started),
                    "owned_by": "splitfuse",
                    "root": ctx.model_name,
                    "parent": None,
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    async def render_chat(body: ChatCompletionRequest) -> list[int]:
        template = ctx.template
        if body.chat_template is not None or body.chat_template_kwargs:
            if not ctx.settings.server.allow_request_chat_template:
                raise APIError(
                    400,
                    "chat_template and chat_template_kwargs in a request are "
                    "disabled on this server",
                    param="chat_template",
                )
            if body.chat_template is not None:
                try:
                    template = template.with_source(body.chat_template)
                except ChatTemplateError as exc:
                    raise APIError(400, str(exc), param="chat_template") from None
        try:
            text = template.render(
                [m.to_template() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                tools=body.tools,
                **(body.chat_template_kwargs or {}),
            )
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return await gen.encode(tokenizer, text, add_special_tokens=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        gen.check_model(ctx, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        prompt_ids = await render_chat(body)
        asked, param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            asked, param = body.max_completion_tokens, "max_completion_tokens"
        max_tokens = gen.max_tokens_for(ctx, len(prompt_ids), asked, param)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = gen.sampling_params(ctx, body, max_tokens, logprobs, "top_logprobs")
        gen.validate(ctx, params, prompt_ids, "messages")
        plan = await chat_plan(ctx, body, parsers)
        if plan.parses:  # tool and reasoning tags may be special tokens: the parsers need them
            params = dataclasses.replace(params, skip_special_tokens=False)
        rid = gen.request_id(request)
        chat_id, created = f"chatcmpl-{rid}", int(time.time())
        gate, opener = plan.reasoning_gate(engine.tokenizer)
        run = gen.EngineRun(
            ctx,
            [prompt_ids],
            params,
            rid,
            grammar=plan.grammar,
            grammar_after=gate,
            reasoning_open=opener,
        )
        if body.stream:
            opts = body.stream_options
            return sse(
                chat_chunks(
                    ctx,
                    run.outputs(),
                    {"id": chat_id, "created": created, "object": "chat.completion.chunk"},
                    params.n,
                    len(prompt_ids),
                    opts.include_usage if opts else False,
                    opts.continuous_usage_stats if opts else False,
                    plan.choice_parser if plan.parses else None,
                )
            )
        outputs = await gen.unless_disconnected(request, gen.collect(run.outputs()))
        return _chat_response(ctx, outputs, chat_id, created, params.n, len(prompt_ids), plan)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        gen.check_model(ctx, body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of different from n is not supported", param="best_of")
        prompts = await _completion_prompts(tokenizer, body.prompt)
        longest = max(len(p) for p in prompts)
        max_tokens = gen.max_tokens_for(
            ctx, longest, body.max_tokens, prompt_param="prompt", default=16
        )
        echo_logprobs = body.echo and body.logprobs is not None
        params = gen.sampling_params(
            ctx, body, max_tokens, body.logprobs, prompt_logprobs=echo_logprobs
        )
        for ids in prompts:
            gen.validate(ctx, params, ids, "prompt")
        grammar = await request_grammar(ctx, body)
        echoed = [await gen.decode(tokenizer, p) for p in prompts] if body.echo else None
        rid = gen.request_id(request)
        cmpl_id, created = f"cmpl-{rid}", int(time.time())
        run = gen.EngineRun(ctx, prompts, params, rid, grammar=grammar)
        if body.stream:
            opts = body.stream_options
            return sse(
                completion_chunks(
                    ctx,
                    run.outputs(),
                    {"id": cmpl_id, "created": created, "object": "text_completion"},
                    params.n,
                    prompts,
                    echoed,
                    echo_logprobs,
                    opts.include_usage if opts else False,
                    opts.continuous_usage_stats if opts else False,
                )
            )
        outputs = await gen.unless_disconnected(request, gen.collect(run.outputs()))
        return await _completion_response(
            ctx, outputs, cmpl_id, created, params.n, prompts, echoed, echo_logprobs
        )


async def _completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    prompts = []
    for item in prompt:
        ids = await gen.encode(tokenizer, item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts.append(ids)
    return prompts


def _raise_if_error(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise generation_error(out.error, out.error_code)


def _response(
    ctx: Any, kind: str, response_id: str, created: int, choices: list[Any], usage: Usage
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": kind,
        "created": created,
        "model": ctx.model_name,
        "choices": choices,
        "system_fingerprint": None,
        "usage": usage.body(),
    }


def _chat_response(
    ctx: Any,
    outputs: list[tuple[int, RequestOutput]],
    chat_id: str,
    created: int,
    n: int,
    prompt_len: int,
    plan: ChatPlan,
) -> dict[str, Any]:
    tokenizer = ctx.engine.tokenizer
    texts = [""] * n
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    finish: list[Any] = [None] * n
    usage = Usage(prompt_len)
    for p, out in outputs:
        usage.add(p, out)
        texts[out.index] += out.text
        if out.logprobs is not None:
            logprobs[out.index] = (logprobs[out.index] or []) + out.logprobs
        if out.finished:
            _raise_if_error(out)
            finish[out.index] = out.finish_reason
    choices = []
    for i in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
        if plan.parses:
            parser = plan.choice_parser()
            message, finish[i] = parser.message(texts[i]), parser.finish_reason(finish[i])
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(tokenizer, logprobs[i]),
                "finish_reason": finish[i],
            }
        )
    return _response(ctx, "chat.completion", chat_id, created, choices, usage)


async def _completion_response(
    ctx: Any,
    outputs: list[tuple[int, RequestOutput]],
    cmpl_id: str,
    created: int,
    n: int,
    prompts: list[list[int]],
    echoed: list[str] | None,
    echo_logprobs: bool,
) -> dict[str, Any]:
    tokenizer = ctx.engine.tokenizer
    count = n * len(prompts)
    texts = [echoed[slot // n] if echoed else "" for slot in range(count)]
    logprobs: list[list[TokenLogprob] | None] = [None] * count
    prompt_logprobs: list[list[float]] = [[] for _ in range(count)]
    finish: list[Any] = [None] * count
    usage = Usage(sum(len(p) for p in prompts))
    for p, out in outputs:
        usage.add(p, out)
        slot = p * n + out.index
        texts[slot] += out.text
        if out.logprobs is not None:
            logprobs[slot] = (logprobs[slot] or []) + out.logprobs
        if out.prompt_logprobs is not None:
            prompt_logprobs[slot] = out.prompt_logprobs
        if out.finished:
            _raise_if_error(out)
            finish[slot] = out.finish_reason
    choices = []
    for slot in range(count):
        if echo_logprobs:
            prompt = (prompts[slot // n], prompt_logprobs[slot])
            listed = logprobs[slot] or []
            lp = await completion_logprobs_echoed(tokenizer, listed, TextOffsets(), prompt)
        else:
            lp = completion_logprobs(tokenizer, logprobs[slot], TextOffsets())
        choices.append(
            {"index": slot, "text": texts[slot], "logprobs": lp, "finish_reason": finish[slot]}
        )
    return _response(ctx, "text_completion", cmpl_id, created, choices, usage)
