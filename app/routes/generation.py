"""What chat, completions and interactive share: request -> SamplingParams, admission control,
running engine requests with disconnect-aware collection, and timing metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from app.engine.config import SamplingParams
from app.engine.engine import RequestOutput
from app.errors import APIError, ClientDisconnected
from app.routes.protocol import SamplingFields

if TYPE_CHECKING:  # xgrammar is imported only when a request uses a grammar
    from app.engine.grammar import CompiledGrammar

log = logging.getLogger("splitfuse.server")
T = TypeVar("T")


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


async def in_thread_if(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in a worker thread when the work is `large`: meanwhile the event loop
    goes on streaming other requests (the Rust tokenizer releases the GIL)."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


# Texts this long are tokenized in a worker thread: 4 MB take ~3 s.
THREAD_ENCODE_CHARS = 50_000
THREAD_DECODE_TOKENS = 10_000  # about THREAD_ENCODE_CHARS of text


async def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """`text`'s token ids, off the event loop when it is long."""
    large = len(text) >= THREAD_ENCODE_CHARS
    return await in_thread_if(large, tokenizer.encode, text, add_special_tokens=add_special_tokens)


async def decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` (an echoed prompt), off the event loop when they are many."""
    return await in_thread_if(len(ids) >= THREAD_DECODE_TOKENS, tokenizer.decode, ids)


def check_model(ctx: Any, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{ctx.model_name}'",
            param="model",
            code="model_not_found",
        )


def max_tokens_for(
    ctx: Any,
    prompt_len: int,
    asked: int | None,
    param: str = "max_tokens",
    prompt_param: str = "messages",
    default: int | None = None,
) -> int:
    """The max_tokens a request gets: what it asked for, or else `default` (all the room the
    context leaves when None), within the server's cap."""
    context = ctx.engine.max_model_len
    if prompt_len >= context:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, but the model's context is {context} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = context - prompt_len
    cap = ctx.settings.server.max_tokens_cap or context
    if asked is None:
        return min(room, cap, default or room)
    if asked > cap:
        raise APIError(400, f"{param} is {asked}, above this server's limit of {cap}", param=param)
    if asked > room:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens and {param} asks for {asked}, "
            f"together more than the model's context of {context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    return asked


def check_stops(ctx: Any, stop: str | list[str] | None) -> list[str]:
    """A request's stop strings as a list, within the server's count and length limits."""
    cfg = ctx.engine.config
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > cfg.max_stop_strings:
        raise APIError(
            400,
            f"at most {cfg.max_stop_strings} stop strings are allowed, got {len(stops)}",
            param="stop",
        )
    if any(not 0 < len(text) <= cfg.max_stop_string_len for text in stops):
        raise APIError(
            400, f"stop strings must be 1 to {cfg.max_stop_string_len} characters long", "stop"
        )
    return stops


def check_limits(ctx: Any, body: SamplingFields, logprobs: int | None, logprobs_param: str) -> None:
    """The engine's per-request limits, checked here so that the error names the field."""
    cfg, vocab = ctx.engine.config, ctx.engine.info.vocab_size
    if body.n > cfg.max_n:
        raise APIError(400, f"n is {body.n}, above this server's limit of {cfg.max_n}", param="n")
    if logprobs is not None and logprobs > cfg.max_logprobs:
        raise APIError(
            400,
            f"{logprobs_param} is {logprobs}, above this server's limit of {cfg.max_logprobs}",
            param=logprobs_param,
        )
    for name, ids in (
        ("logit_bias", [int(k) for k in body.logit_bias or {}]),
        ("stop_token_ids", body.stop_token_ids or []),
    ):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"{name}: token id {bad} is outside the vocabulary (0..{vocab - 1})", name
            )


def sampling_params(
    ctx: Any,
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    logprobs_param: str = "logprobs",
    prompt_logprobs: bool = False,
) -> SamplingParams:
    """Map an OpenAI-style body onto SamplingParams, validated against the engine's limits."""
    check_limits(ctx, body, logprobs, logprobs_param)
    stops = check_stops(ctx, body.stop)
    if body.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens ({body.min_tokens}) is larger than max_tokens ({max_tokens})",
            param="min_tokens",
        )
    top_k = body.top_k or 0
    params = SamplingParams(
        n=body.n,
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        stop_strings=tuple(stops),
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
    validate(ctx, params)
    return params


def validate(
    ctx: Any,
    params: SamplingParams,
    prompt_ids: list[int] | None = None,
    prompt_param: str = "prompt",
) -> None:
    """The engine's own checks (the last word on what it accepts), as 400s."""
    try:
        if prompt_ids is None:
            cfg = ctx.engine.config
            params.validate(
                ctx.engine.info.vocab_size,
                cfg.max_n,
                cfg.max_logprobs,
                cfg.max_stop_strings,
                cfg.max_stop_string_len,
            )
        else:
            ctx.engine.validate(prompt_ids, params)
    except ValueError as exc:
        raise APIError(400, str(exc), param=None if prompt_ids is None else prompt_param) from None


def admit(ctx: Any, num_sequences: int) -> None:
    """All-or-nothing admission against the queue cap, counting n > 1 as n."""
    cap = ctx.settings.server.max_queued_requests
    if num_sequences > cap:  # no wait would make room: not a 429 to retry
        raise APIError(
            400,
            f"this request asks for {num_sequences} sequences (n times the prompts); the "
            f"server queues at most {cap}",
            param="n",
        )
    if ctx.pending + num_sequences > cap:
        raise APIError(
            429,
            f"the server is busy: more than {cap} requests are queued",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    ctx.pending += num_sequences


@dataclass
class Timing:
    """One sample's latency bookkeeping for the Prometheus histograms and the log."""

    metrics: Any
    start: float = field(default_factory=time.monotonic)
    last: float | None = None

    def delta(self) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def finished(self, output: RequestOutput) -> None:
        elapsed = time.monotonic() - self.start
        self.metrics.e2e.observe(elapsed)
        self.metrics.finished(output.finish_reason)
        if output.queue_seconds is not None:
            self.metrics.queue_time.observe(output.queue_seconds)
        log.info(
            "sample %d finished (%s): %d prompt + %d completion tokens in %.3f s",
            output.index,
            output.finish_reason,
            output.prompt_tokens,
            output.completion_tokens,
            elapsed,
        )


class EngineRun:
    """The engine requests of one HTTP request, one per prompt, started at once.

    Admission reserves room in the queue for every sample, and each keeps it until its first
    delta: requests admitted in the same instant cannot all slip past the cap before any of them
    reaches the engine. Iterate `outputs()` for (prompt index, delta); leaving it early aborts
    the engine requests.
    """

    def __init__(
        self,
        ctx: Any,
        prompts: list[list[int]],
        params: SamplingParams,
        rid: str,
        session_id: int | None = None,
        grammar: CompiledGrammar | None = None,
        grammar_after: list[int] | None = None,
        reasoning_open: int | None = None,
    ):
        admit(ctx, params.n * len(prompts))
        self.ctx = ctx
        self.grammar = grammar
        self.grammar_after = grammar_after
        self.reasoning_open = reasoning_open
        self._samples = {(p, i) for p in range(len(prompts)) for i in range(params.n)}
        self._queued = set(self._samples)
        self._finished: set[tuple[int, int]] = set()
        self._outputs: asyncio.Queue[tuple[int, RequestOutput] | Exception | None] = asyncio.Queue()
        # Client ids may repeat; the engine's must not.
        tag = uuid.uuid4().hex[:8]
        self._tasks = [
            asyncio.create_task(self._pump(p, ids, params, f"{rid}-{tag}-{p}", session_id))
            for p, ids in enumerate(prompts)
        ]

    def _dequeue(self, key: tuple[int, int]) -> None:
        if key in self._queued:
            self._queued.discard(key)
            self.ctx.pending -= 1

    async def _pump(
        self,
        p: int,
        ids: list[int],
        params: SamplingParams,
        engine_rid: str,
        session_id: int | None,
    ) -> None:
        timings: dict[int, Timing] = {}
        try:
            async for out in self.ctx.engine.generate(
                ids,
                params,
                request_id=engine_rid,
                session_id=session_id,
                grammar=self.grammar,
                grammar_after=self.grammar_after,
                reasoning_open=self.reasoning_open,
            ):
                self._dequeue((p, out.index))
                timing = timings.setdefault(out.index, Timing(self.ctx.metrics))
                timing.delta()
                if out.finished:
                    self._finished.add((p, out.index))
                    timing.finished(out)
                self._outputs.put_nowait((p, out))
        except Exception as exc:
            self._outputs.put_nowait(exc)
        finally:
            for i in range(params.n):
                self._dequeue((p, i))
            self._outputs.put_nowait(None)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas in order. A caller that fell behind (a slow client, a busy loop) gets a
        sample's waiting deltas merged into one, so it catches up in fewer sends."""
        remaining = len(self._tasks)
        abandoned = True
        held: list[tuple[int, RequestOutput] | Exception | None] = []
        try:
            while remaining:
                item = held.pop() if held else await self._outputs.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    abandoned = False
                    raise item
                else:
                    p, out = item
                    while not out.finished and not self._outputs.empty():
                        following = self._outputs.get_nowait()
                        if (
                            not isinstance(following, tuple)
                            or following[0] != p
                            or following[1].index != out.index
                        ):
                            held.append(following)
                            break
                        out = out.merged(following[1])
                    yield p, out
            abandoned = False
        finally:
            await self.close(abandoned)

    async def close(self, abandoned: bool = True) -> None:
        """Abort whatever still runs; count it as aborted when the caller gave up on it."""
        for task in self._tasks:
            task.cancel()
        # Bookkeeping before the await: a cancelled caller (anyio cancels at every await of a
        # cancelled scope) may never get past it.
        for key in list(self._queued):
            self._dequeue(key)
        if abandoned:
            for _ in self._samples - self._finished:
                self.ctx.metrics.finished("abort")
            self._finished |= self._samples
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def until_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; a client disconnect cancels it (and so aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    return task.result()


async def collect(stream: AsyncIterator[T]) -> list[T]:
    return [item async for item in stream]
