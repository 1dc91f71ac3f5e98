"""The offline pipeline: lmdeploy-compatible `pipeline()` over an AsyncEngine on a private loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
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
    session_id: int | None = None

    def generate(self, engine: AsyncEngine, stream: bool = True) -> AsyncIterator[RequestOutput]:
        return engine.generate(
            self.ids,
            self.params,
            session_id=self.session_id,
            grammar=self.grammar,
            stream=stream,
            validated=True,
        )


class Session:
    """A conversation through `Pipeline.chat` (lmdeploy's): the engine keeps its tokens and KV
    between turns. `response` is the last turn's answer, `history` the (prompt, answer) pairs;
    `close()` lets the engine forget it."""

    def __init__(self, session_id: int, pipe: Pipeline):
        self.session_id = session_id
        self.history: list[tuple[Prompt, str]] = []
        self.response: Response | None = None
        self._pipe = pipe
        self._tokens: list[int] = []  # what the engine held after the last turn

    def close(self) -> None:
        self._pipe._run(self._pipe._end_session(self.session_id))
        self.history, self.response, self._tokens = [], None, []

    def __repr__(self) -> str:
        turns = "".join(
            f"\nUSER: {prompt!r}\nASSISTANT: {answer!r}" for prompt, answer in self.history
        )
        return f"Session(id={self.session_id}){turns}"


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
        self._session_ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="splitfuse-loop", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, do_preprocess: bool = True) -> list[int]:
        """A prompt's token ids: messages (or a string, as a user message) through the chat
        template, a string as it is with `do_preprocess=False`, token ids unchanged."""
        return self._encode(prompt, do_preprocess, None)

    def _encode(self, prompt: Prompt, do_preprocess: bool, tail: str | None) -> list[int]:
        """`encode`, for a conversation's later turn when `tail` (the text its history ends
        with) is given: only what follows the history (`ChatTemplate.render_turn`)."""
        if isinstance(prompt, list) and prompt and all_ints(prompt):
            return list(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if not do_preprocess:
                return self.tokenizer.encode(_valid_text(prompt), add_special_tokens=tail is None)
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
        text = self.chat_template.render_turn(prompt, tail)
        return self.tokenizer.encode(_valid_text(text), add_special_tokens=False)

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
        # All prompts are checked before any starts.
        requests = [
            self._request(self.encode(prompt, do_preprocess), config)
            for prompt, config in zip(batch, configs, strict=True)
        ]
        return single, requests

    def _request(
        self, ids: list[int], config: GenerationConfig | None, session_id: int | None = None
    ) -> _Request:
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"gen_config must be a GenerationConfig, got {type(config).__name__}")
        params = config.to_sampling_params(self.tokenizer)
        self.engine.validate(ids, params, session_id)
        # As lmdeploy's pipeline: one Response per prompt (the OpenAI server's n gives several).
        if params.n != 1:
            raise ValueError(f"n must be 1 in the pipeline, got {params.n}")
        grammar = None
        if config.response_format is not None:
            spec = GrammarSpec.from_response_format(config.response_format)
            if spec is not None:
                grammar = self.engine.grammar_compiler.compile_sync(spec)
        return _Request(ids, params, grammar, session_id)

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

        async def produce(queue: asyncio.Queue[Response | None]) -> None:
            async def one(index: int, request: _Request) -> None:
                async for out in request.generate(self.engine):
                    queue.put_nowait(_response(out, len(request.ids), index))

            await _staggered(one(i, r) for i, r in enumerate(requests))

        return self._iterate(produce)

    def chat(
        self,
        prompt: Prompt,
        session: Session | None = None,
        gen_config: GenerationConfig | None = None,
        stream_response: bool = False,
        do_preprocess: bool = True,
    ) -> Session | Iterator[Response]:
        """One turn of a conversation (a new one without `session`): only this turn's message
        is sent and prefilled, after the tokens the engine keeps from the earlier turns. Returns
        the session, its `response` the answer; with `stream_response`, the answer's deltas,
        the session updated once they are all read."""
        if session is None:
            session = Session(next(self._session_ids), self)
        ids = self._run(self._turn_ids(session, prompt, do_preprocess))
        request = self._request(ids, gen_config, session.session_id)
        if not stream_response:
            self._run(self._turn(session, prompt, request, None))
            return session

        async def produce(queue: asyncio.Queue[Response | None]) -> None:
            await self._turn(session, prompt, request, queue)

        return self._iterate(produce)

    async def _turn_ids(self, session: Session, prompt: Prompt, do_preprocess: bool) -> list[int]:
        """The ids a turn sends: its message after the history the engine holds; if the engine
        let the session go (idle past session_ttl, or evicted), the whole conversation again."""
        held = self.engine.scheduler.sessions.get(session.session_id)
        history = held.history if held is not None and held.history else []
        resend = [] if history else session._tokens
        tokens = history or resend
        tail = self.tokenizer.decode(tokens[-1:], skip_special_tokens=False) if tokens else None
        return resend + self._encode(prompt, do_preprocess, tail)

    async def _turn(
        self,
        session: Session,
        prompt: Prompt,
        request: _Request,
        queue: asyncio.Queue[Response | None] | None,
    ) -> None:
        deltas = request.generate(self.engine, stream=queue is not None)
        if queue is not None:
            deltas = _teed(deltas, queue, len(request.ids), session.session_id)
        response = await _collect(deltas, len(request.ids), 0)
        response.session_id = session.session_id
        held = self.engine.scheduler.sessions.get(session.session_id)
        session._tokens = list(held.history) if held is not None else []
        session.response = response
        session.history.append((prompt, response.text))

    async def _end_session(self, session_id: int) -> None:
        self.engine.end_session(session_id)

    def _iterate(
        self, produce: Callable[[asyncio.Queue[Response | None]], Awaitable[None]]
    ) -> Iterator[Response]:
        """Yield what `produce` puts on its queue, running it on the pipeline's loop."""
        queue: asyncio.Queue[Response | None] = asyncio.Queue()

        async def run() -> None:
            try:
                await produce(queue)
            finally:
                queue.put_nowait(None)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
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
            if not isinstance(ids, (list, tuple)):
                raise ValueError("get_ppl takes a list of token ids or a list of such lists")
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
            coro.close()  # never awaited, and known not to be: no warning about it
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


def _valid_text(text: str) -> str:
    """`text`, if it is valid Unicode (a lone surrogate cannot be encoded to UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the prompt is not valid text: {exc.reason} at {exc.start}") from None
    return text


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


async def _teed(
    stream: AsyncIterator[RequestOutput],
    queue: asyncio.Queue[Response | None],
    input_len: int,
    session_id: int,
) -> AsyncIterator[RequestOutput]:
    """`stream`, each delta also put on `queue` as a Response."""
    async for out in stream:
        response = _response(out, input_len, 0)
        response.session_id = session_id
        queue.put_nowait(response)
        yield out


async def _collect(stream: AsyncIterator[RequestOutput], input_len: int, index: int) -> Response:
    """Join a request's deltas into one Response."""
    text: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    last: RequestOutput | None = None
    async for out in stream:
        text.append(out.text)
        token_ids.extend(out.token_ids)
        logprobs.extend(out.logprobs or [])
        last = out
    if last is None:
        raise RuntimeError("the engine returned no output")
    if last.finish_reason == "error":
        if last.error_code:  # the request's own input, e.g. a grammar the vocabulary cannot end
            raise ValueError(f"generation failed: {last.error}")
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
    log_level: str | None = None,
) -> Pipeline:
    """Build a Pipeline; with no model, the bundled SmolLM2-135M-Instruct. `log_level` (as in
    lmdeploy: "INFO", "WARNING", ...) sets the engine's loggers' level."""
    if log_level is not None:
        level = logging.getLevelName(str(log_level).upper())
        if not isinstance(level, int):
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}"
            )
        logging.getLogger("splitfuse").setLevel(level)
    return Pipeline(model, backend_config=backend_config, chat_template=chat_template)
