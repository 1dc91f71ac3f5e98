"""Operational endpoints: /health, /metrics, /tokenize, /detokenize and lmdeploy's /v1/encode."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from app.chat_template import ChatTemplateError
from app.engine.config import SamplingParams
from app.errors import APIError, error_response
from app.routes import generation as gen
from app.routes.protocol import DetokenizeRequest, EncodeRequest, TokenizeRequest


def register(router: APIRouter, ctx: Any) -> None:
    engine = ctx.engine
    tokenizer = engine.tokenizer

    probing = asyncio.Lock()

    async def probe() -> None:
        """After a failed engine step, one greedy token tells whether the engine works again:
        without it an idle server would stay unhealthy, and get no traffic to prove otherwise."""
        async with probing:
            if engine.last_error is None or ctx.draining or not engine.running:
                return
            params = SamplingParams(max_new_tokens=1, temperature=0.0)
            try:
                # A health check must answer in the seconds a load balancer waits for it.
                async with asyncio.timeout(min(ctx.settings.server.health_stall_seconds, 5.0)):
                    async for _ in engine.generate([0], params, f"health-{uuid.uuid4().hex}"):
                        pass
            except TimeoutError:
                pass

    @router.get("/health")
    async def health() -> Response:
        await probe()
        if ctx.healthy():
            return Response(status_code=200)
        reason = "the server is shutting down" if ctx.draining else "the engine is not healthy"
        return error_response(503, reason)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        gen.check_model(ctx, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            try:
                text = ctx.template.render(
                    [m.to_template() for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt,
                )
            except ChatTemplateError as exc:
                raise APIError(400, str(exc), param="messages") from None
            ids = await gen.encode(tokenizer, text, add_special_tokens=False)
        else:
            ids = await gen.encode(tokenizer, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        gen.check_model(ctx, body.model)
        vocab = engine.info.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return {"prompt": tokenizer.decode(body.tokens)}

    @router.post("/v1/encode")
    async def encode(body: EncodeRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input

        async def one(text: str) -> list[int]:
            if body.do_preprocess:
                text = ctx.template.render([{"role": "user", "content": text}])
                return await gen.encode(tokenizer, text, add_special_tokens=False)
            return await gen.encode(tokenizer, text, add_special_tokens=body.add_bos)

        try:
            ids = [await one(t) for t in texts]
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="input") from None
        if isinstance(body.input, str):
            return {"input_ids": ids[0], "length": len(ids[0])}
        return {"input_ids": ids, "length": [len(i) for i in ids]}
