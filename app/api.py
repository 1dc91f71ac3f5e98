"""The offline pipeline: lmdeploy-compatible `pipeline()` over an AsyncEngine on a private loop."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from app.chat_template import ChatTemplate
from app.engine.config import EngineConfig, GenerationConfig, SamplingParams, all_ints
from app.engine.engine import AsyncEngine
from app.engine.grammar_spec import GrammarSpec
from app.engine.outputs import RequestOutput, TokenLogprob

if TYPE_CHECKING:
    import torch

    from app.engine.grammar import CompiledGrammar

Prompt = str | list[dict[str, Any]] | list[int]  # text, messages or token ids
T = TypeVar("T")

# Requests started before the engine loop gets a turn: it starts stepping on the first ones
# while the rest of a large batch is admitted (a thousand prompts take tens of milliseconds).
ADMIT_BATCH = 32


@dataclass
class Response:
    """One prompt's result (or, from stream_infer, one delta of it)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    session_id: int | None = None
    # GenerationConfig.output_logits / output_last_hidden_state: float32 tensors, one row per
    # generated token ("generation") or per position, the prompt's first ("all"); from
    # stream_infer, on each prompt's last delta.
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


@dataclass
class _Request:
    ids: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None

    def generate(self, engine: AsyncEngine, stream: bool = True) -> AsyncIterator[RequestOutput]:
        return engine.generate(
            self.ids, self.params, grammar=self.grammar, stream=stream, validated=True
        )


class Pipeline:
    """Batch and streaming inference; the engine runs on a background event loop thread."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        backend_config: EngineConfig | None = None,
        chat_template: str | None = None,
    ):
        config = backend_config or EngineConfig()
        if chat_template is not None:
            config = config.replace(chat_template=chat_template)
        self.engine = AsyncEngine(model, config)
        self.tokenizer = self.engine.tokenizer
        self.chat_template = ChatTemplate.for_tokenizer(self.tokenizer, config.chat_template)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="splitfuse-loop", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, do_preprocess: bool = True) -> list[int]:
        if isinstance(prompt, list) and prompt and all_ints(prompt):
            return list(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if not do_preprocess:
                return self.tokenizer.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("a prompt is a non-empty string or a non-empty list of messages")
        for message in prompt:
            if not isinstance(message, dict) or message.get("role") not in (
                "system",
                "user",
                "assistant",
                "tool",
            ):
                raise ValueError(
                    f"invalid message {message!r}: needs a role of system, user, assistant or tool"
                )
        text = self.chat_template.render(prompt, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _requests(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | Sequence[GenerationConfig] | None,
        do_preprocess: bool,
    ) -> tuple[bool, list[_Request]]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], (dict, int))
        )
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if not batch:
            raise ValueError("no prompts given")
        configs = gen_config if isinstance(gen_config, (list, tuple)) else [gen_config] * len(batch)
        if len(configs) != len(batch):
            raise ValueError(f"{len(configs)} generation configs for {len(batch)} prompts")
        requests = []
        for prompt, config in zip(batch, configs, strict=True):
            ids = self.encode(prompt, do_preprocess)
            config = config or GenerationConfig()
            params = config.to_sampling_params(self.tokenizer)
            self.engine.validate(ids, params)  # all prompts are checked before any starts
            grammar = None
            if config.response_format is not None:
                spec = GrammarSpec.from_response_format(config.response_format)
                if spec is not None:
                    grammar = self.engine.grammar_compiler.compile_sync(spec)
            requests.append(_Request(ids, params, grammar))
        return single, requests

    # ---------------------------------------------------------------- inference
    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
        do_preprocess: bool = True,
    ) -> Response | list[Response]:
        single, requests = self._requests(prompts, gen_config, do_preprocess)
        results = self._run(self._batch(requests))
        return results[0] if single else results

    async def async_batch_infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
        do_preprocess: bool = True,
    ) -> Response | list[Response]:
        single, requests = self._requests(prompts, gen_config, do_preprocess)
        future = asyncio.run_coroutine_threadsafe(self._batch(requests), self._loop)
        results = await asyncio.wrap_future(future)
        return results[0] if single else results

    def stream_infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
        do_preprocess: bool = True,
    ) -> Iterator[Response]:
        """Yield deltas as they are generated; `Response.index` says which prompt each is for."""
        _single, requests = self._requests(prompts, gen_config, do_preprocess)
        queue: asyncio.Queue[Response | None] = asyncio.Queue()

        async def produce() -> None:
            async def one(index: int, request: _Request) -> None:
                async for out in request.generate(self.engine):
                    queue.put_nowait(_response(out, len(request.ids), index))

            try:
                await _staggered(one(i, r) for i, r in enumerate(requests))
            finally:
                queue.put_nowait(None)

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while True:
                item = self._run(queue.get())
                if item is None:
                    break
                yield item
            future.result()
        finally:
            future.cancel()

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> list[float] | float:
        """Cross-entropy (mean negative log-likelihood per predicted token) of each sequence."""
        single = bool(input_ids) and isinstance(input_ids[0], int)
        batch: list[list[int]] = [input_ids] if single else input_ids  # type: ignore[list-item]
        params = SamplingParams(
            max_new_tokens=1, temperature=0.0, prompt_logprobs=True, ignore_eos=True
        )
        for ids in batch:
            if len(ids) < 2:
                raise ValueError("get_ppl needs at least two tokens per sequence")
            self.engine.validate(ids, params)

        async def one(ids: list[int]) -> float:
            logprobs: list[float] = []
            async for out in self.engine.generate(ids, params, stream=False, validated=True):
                logprobs = out.prompt_logprobs or logprobs
            return -math.fsum(logprobs) / len(logprobs)

        async def run_all() -> list[float]:
            return await _staggered(one(ids) for ids in batch)

        losses = self._run(run_all())
        return losses[0] if single else losses

    # ----------------------------------------------------------------- plumbing
    async def _batch(self, requests: list[_Request]) -> list[Response]:
        async def one(index: int, request: _Request) -> Response:
            stream = request.generate(self.engine, stream=False)
            return await _collect(stream, len(request.ids), index)

        return await _staggered(one(i, r) for i, r in enumerate(requests))

    def _run(self, coro: Any) -> Any:
        if not self._loop.is_running():
            raise RuntimeError("the pipeline is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.engine.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self.engine.shutdown()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _staggered(coros: Iterable[Awaitable[T]]) -> list[T]:
    """`asyncio.gather`, letting the loop (the engine) run after every ADMIT_BATCH starts."""
    tasks: list[asyncio.Future[T]] = []
    try:
        for i, coro in enumerate(coros, 1):
            tasks.append(asyncio.ensure_future(coro))
            if i % ADMIT_BATCH == 0:
                await asyncio.sleep(0)
        return list(await asyncio.gather(*tasks))
    except BaseException:  # cancelled, or a request failed: none of the others goes on
        for task in tasks:
            task.cancel()
        raise


def _logprob_dicts(logprobs: list[TokenLogprob] | None) -> list[dict[int, float]] | None:
    if logprobs is None:
        return None
    return [{lp.token_id: lp.logprob, **dict(lp.top)} for lp in logprobs]


def _response(out: RequestOutput, input_len: int, index: int) -> Response:
    return Response(
        text=out.text,
        generate_token_len=out.completion_tokens,
        input_token_len=input_len,
        finish_reason=out.finish_reason,
        token_ids=out.token_ids,
        logprobs=_logprob_dicts(out.logprobs),
        index=index,
        logits=out.logits,
        last_hidden_state=out.last_hidden_state,
    )


async def _collect(stream: AsyncIterator[RequestOutput], input_len: int, index: int) -> Response:
    """Join a request's deltas (the first sample's when n > 1) into one Response."""
    text: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    last: RequestOutput | None = None
    async for out in stream:
        if out.index != 0:
            continue
        text.append(out.text)
        token_ids.extend(out.token_ids)
        logprobs.extend(out.logprobs or [])
        last = out
    if last is None:
        raise RuntimeError("the engine returned no output")
    if last.finish_reason == "error":
        raise RuntimeError(f"generation failed: {last.error}")
    return Response(
        text="".join(text),
        generate_token_len=last.completion_tokens,
        input_token_len=input_len,
        finish_reason=last.finish_reason,
        token_ids=token_ids,
        logprobs=_logprob_dicts(logprobs) if logprobs else None,
        index=index,
        logits=last.logits,
        last_hidden_state=last.last_hidden_state,
    )


def pipeline(
    model: str | os.PathLike | None = None,
    backend_config: EngineConfig | None = None,
    chat_template: str | None = None,
    **_: Any,
) -> Pipeline:
    """Build a Pipeline; with no model, the bundled SmolLM2-135M-Instruct."""
    return Pipeline(model, backend_config=backend_config, chat_template=chat_template)
