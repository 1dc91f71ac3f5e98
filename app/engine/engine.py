"""AsyncEngine: the engine loop coroutine, request admission, aborts and output streams.

The loop runs on the caller's asyncio loop: schedule (plain Python), hand the batch to the one
GPU thread, then turn sampled tokens into text deltas on the loop. While a step runs, the next
one is scheduled and queued behind it when nothing in it waits for the running step's tokens
(its decodes take theirs on the device; new prompts and chunks need none). A failing step fails
the requests it carried, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from app.engine.block_manager import BlockManager
from app.engine.builder import build
from app.engine.config import EngineConfig, SamplingParams, check_token_ids
from app.engine.constraints import accept_token, fill_masks
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.handoff import InFlight, submit, wait_launched
from app.engine.heap import freeze_startup_heap, release_startup_heap
from app.engine.outputs import RequestOutput, RequestState, SampleState, TokenLogprob
from app.engine.scheduler import Scheduler, SchedulerOutput, SequenceUpdate
from app.engine.sequence import FinishReason, Sequence
from app.engine.sessions import SessionBusyError, SessionManager
from app.engine.trace import StepTrace

if TYPE_CHECKING:  # xgrammar is imported only when a request uses a grammar
    from app.engine.grammar import CompiledGrammar, GrammarCompiler

log = logging.getLogger("splitfuse.engine")

__all__ = ["AsyncEngine", "RequestOutput", "SessionBusyError"]


class AsyncEngine:
    """Continuous-batching engine; `generate` streams deltas, `abort` frees a request at once."""

    def __init__(self, model: str | os.PathLike | None = None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="splitfuse-gpu")
        self.info, self.runner = self._executor.submit(build, model, self.config).result()
        self.config = self.config.replace(max_batch_size=self.info.max_batch_size)
        self.tokenizer = self.info.tokenizer
        self.max_model_len = self.info.max_model_len
        self.block_manager = BlockManager(
            self.info.num_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        sessions = SessionManager(
            self.block_manager, self.config.session_ttl, self.config.max_sessions
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_batch_size=self.config.max_batch_size,
            max_num_batched_tokens=self.config.max_prefill_token_num,
            max_model_len=self.max_model_len,
            eos_token_ids=self.info.eos_token_ids,
            sessions=sessions,
        )
        self._requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.last_error: str | None = None
        self.last_progress = time.monotonic()
        self._trace = StepTrace.from_env()
        self._queued: InFlight | None = None  # a step scheduled ahead, not yet counted on
        # Launching on the CPU is computing: on CUDA only the loop blocks for launches and steps
        # ahead launch before the tokens of the step they follow are collected.
        self._block_for_launch = self.runner.device.type == "cuda"
        # Start-up's objects (model, tokenizer, graphs) out of the collector's way until shutdown.
        self._gc_threshold = freeze_startup_heap()

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler for this model's tokenizer (made on first use, which
        reads the whole vocabulary: from the event loop, use `get_grammar_compiler`)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                from app.engine.grammar import GrammarCompiler

                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.info.vocab_size, stop_token_ids=self.info.eos_token_ids
                )
            return self._grammar_compiler

    async def get_grammar_compiler(self) -> GrammarCompiler:
        """`grammar_compiler`, made in a worker thread the first time."""
        if self._grammar_compiler is not None:
            return self._grammar_compiler
        return await asyncio.to_thread(lambda: self.grammar_compiler)

    # ----------------------------------------------------------------- lifecycle
    @property
    def model_name(self) -> str:
        return self.config.model_name or self.info.name

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the engine loop on the running asyncio loop (idempotent)."""
        if self.running:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        self.abort_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._queued = None  # the loop that would have run it is gone

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        release_startup_heap(self._gc_threshold)
        if self._trace is not None:
            self._trace.close()
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()

    # ------------------------------------------------------------------ requests
    def validate(
        self, prompt_ids: list[int], params: SamplingParams, session_id: int | None = None
    ) -> None:
        """Raise ValueError for a request the engine must refuse."""
        cfg = self.config
        params.validate(
            self.info.vocab_size,
            cfg.max_n,
            cfg.max_logprobs,
            cfg.max_stop_strings,
            cfg.max_stop_string_len,
        )
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        check_token_ids(prompt_ids, self.info.vocab_size)
        if session_id is None and len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, but the context is "
                f"{self.max_model_len} tokens (session_len)"
            )
        if session_id is not None and params.n != 1:
            raise ValueError("n > 1 is not supported in an interactive session")
        if session_id is not None and params.every_position:
            raise ValueError("a session turn cannot return every position's logprobs or rows")

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        session_id: int | None = None,
        grammar: CompiledGrammar | None = None,
        stream: bool = True,
        grammar_after: list[int] | tuple[int, ...] | None = None,
        reasoning_open: int | None = None,
        validated: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; leaving the iteration early aborts the request.

        `grammar` (from `grammar_compiler`) constrains every sample's output. With `stream`
        False each sample yields one output when it finishes, which costs the loop far less.
        With `grammar_after` (the token ids that close a reasoning section) the grammar applies
        only to what follows them; with `reasoning_open` as well, the section exists only if the
        model samples that token first, else the grammar applies from the start. `validated`
        says the caller has passed these arguments through `validate` already."""
        if not validated:
            self.validate(prompt_ids, params, session_id)
        self.start()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        state = self._admit(request_id, list(prompt_ids), params, session_id, grammar)
        state.stream = stream
        if grammar is not None and grammar_after:
            for sample in state.samples:
                if reasoning_open is None:
                    sample.seq.grammar_gate = tuple(grammar_after)
                else:
                    sample.seq.reasoning_open = (reasoning_open, tuple(grammar_after))
        try:
            while True:
                output = await state.queue.get()
                yield output
                if state.done and state.queue.empty():
                    return
        finally:
            if not state.done:
                self.abort(request_id)
            self._requests.pop(request_id, None)

    def _admit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        session_id: int | None,
        grammar: CompiledGrammar | None,
    ) -> RequestState:
        history: list[int] = []
        if session_id is not None:
            session = self.scheduler.sessions.begin_turn(session_id, request_id)
            history = session.history
        tokens = history + prompt_ids
        seqs: list[Sequence] = []
        for index in range(params.n):
            seqs.append(
                Sequence(
                    next(self._seq_ids),
                    request_id,
                    index,
                    tokens,
                    params,
                    session_id=session_id,
                    parent=seqs[0] if seqs else None,
                    grammar=None if grammar is None else grammar.matcher(),
                )
            )
        samples = [
            SampleState(
                seq,
                IncrementalDetokenizer(
                    self.tokenizer,
                    tokens,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop_strings=params.stop_strings,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_new_tokens,
                ),
            )
            for seq in seqs
        ]
        state = RequestState(request_id, samples, history_len=len(history))
        self._requests[request_id] = state
        if len(tokens) >= self.max_model_len:
            # A session turn past session_len ends at once, and says so.
            for seq in seqs:
                self.scheduler.finish(
                    seq,
                    FinishReason.LENGTH,
                    f"the session holds {len(tokens)} tokens, the limit is "
                    f"{self.max_model_len} (session_len)",
                )
            for sample in samples:
                state.emit(sample, "", [], None)
            return state
        self.scheduler.add(seqs)
        assert self._wake is not None
        self._wake.set()
        self._withdraw_ahead()
        return state

    def _withdraw_ahead(self) -> None:
        """A request that arrives while a step waits, scheduled ahead, behind the running one:
        take that step back if it had room for the request and the GPU thread has not started
        it, so that the request joins the next step instead of the one after (one step less to
        its first token). On a GPU the thread starts it as soon as it is free."""
        step = self._queued
        if (
            step is not None
            and step.out.admits_arrivals
            and self.scheduler.could_admit
            and step.gate.withdraw()
        ):
            self.scheduler.withdraw_ahead(step.out)
            self._queued = None

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its blocks return to the pool, its stream ends with `abort`."""
        state = self._requests.get(request_id)
        seqs = self.scheduler.abort(request_id)
        if state is not None:
            for sample in state.samples:
                if not sample.done and sample.seq.is_finished:
                    state.emit(sample, self._detokenize(sample.seq, sample), [], None)
        return bool(seqs)

    def abort_all(self) -> int:
        """Abort every request in flight; return how many there were."""
        request_ids = list(self._requests)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def session_tail(self, session_id: int) -> str | None:
        """The text of the last token a session holds (its end of turn, usually), for
        `ChatTemplate.render_turn`; None when the session holds no history."""
        session = self.scheduler.sessions.get(session_id)
        if session is None or not session.history:
            return None
        return self.tokenizer.decode(session.history[-1:], skip_special_tokens=False)

    def end_session(self, session_id: int) -> bool:
        """End an interactive session (aborting its running turn); True if it existed."""
        session = self.scheduler.sessions.get(session_id)
        if session is None:
            return False
        if session.busy_request is not None:
            self.abort(session.busy_request)
        self.scheduler.sessions.end(session_id)
        return True

    # --------------------------------------------------------------- engine loop
    async def _loop(self) -> None:
        """Schedule, launch, and while the GPU runs step N: schedule step N+1 ahead of N's
        tokens when nothing in it depends on them (on the GPU it is queued on the device before
        N's tokens come back, and runs right after N), and detokenize step N-1's tokens."""
        assert self._wake is not None
        pending: list[SequenceUpdate] = []  # sampled last step, not yet turned into text
        ahead: InFlight | None = None  # the next step, already submitted
        while True:
            if ahead is not None:
                current, ahead = ahead, None
            else:
                if pending and not self.scheduler.has_work:
                    self._process(pending)
                    pending = []
                    continue
                if not self.scheduler.has_work:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    self._expire_sessions()
                    self.last_progress = time.monotonic()
                    continue
                marks = {"t": time.perf_counter()} if self._trace is not None else None
                out = self.scheduler.schedule()
                if not out:
                    if pending:  # its stop strings may end sequences and free blocks
                        self._process(pending)
                        pending = []
                        continue
                    self._fail_unschedulable()
                    await asyncio.sleep(0)
                    continue
                current = submit(self._executor, self.runner, out, marks, self._block_for_launch)
            marks = current.marks
            failure = "engine step failed"
            try:
                await wait_launched(current, self._block_for_launch)
                if current.allowed is not None:  # the sampler needs it after the forward pass
                    fill_masks(current.masks, current.allowed, self.info.vocab_size)
                ahead_marks = {"t": time.perf_counter()} if self._trace is not None else None
                nxt = None
                if self.config.async_scheduling:
                    nxt = self.scheduler.schedule_ahead(current.out)
                if nxt is not None:
                    ahead = self._queued = submit(
                        self._executor, self.runner, nxt, ahead_marks, self._block_for_launch
                    )
                if pending:
                    # A sequence this finishes (a stop string) may be in the steps now running:
                    # its blocks are not reused before they end, and its extra tokens are
                    # dropped.
                    if marks is not None:
                        marks["process_start"] = time.perf_counter()
                    self._process(pending)
                    pending = []
                    if marks is not None:
                        marks["process_ms"] = (time.perf_counter() - marks["process_start"]) * 1e3
                step = await current.result(self._executor)
                if marks is not None:
                    marks["result"] = time.perf_counter()
                self._queued = None  # from here on the loop counts on it: no more withdrawing
                if ahead is not None and ahead.gate.withdrawn:
                    ahead = None
                if ahead is not None and self._block_for_launch:
                    await wait_launched(ahead, True)  # the GPU thread starts it now: launch first
                # From here on a failure is in the engine's own bookkeeping, not the step's.
                failure = "engine update failed"
                self.last_error = None
                self.last_progress = time.monotonic()
                if marks is not None:
                    marks["update_start"] = time.perf_counter()
                if step.errors:  # a request's own logits processor failed: that request ends
                    self._fail(self.scheduler.fail_sampled(current.out, step.errors))
                pending = self.scheduler.update(current.out, step)
                for update in pending:  # before the next step's grammar masks are filled
                    accept_token(self.scheduler, update.seq, update.token_id)
            except Exception as exc:
                await self._fail_in_flight(failure, exc, current.out, ahead)
                pending, ahead = [], None
                continue
            if self._trace is not None and marks is not None:
                waiting = len(self.scheduler.waiting)
                self._trace.step(current.out, marks, current.timing, waiting, len(self._requests))

    def _process(self, updates: list[SequenceUpdate]) -> None:
        """Turn sampled tokens into text (stop strings end sequences here) and hand them out."""
        now = time.monotonic()
        for update in updates:
            seq = update.seq
            state = self._requests.get(seq.request_id)
            if state is None:
                continue
            sample = state.samples[seq.index]
            if sample.done:  # aborted after this token was sampled
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            sample.undecoded.append(update.token_id)
            text = ""
            # Without streaming or stop strings, text is only needed once, at the end.
            if state.stream or seq.params.stop_strings or seq.is_finished:
                try:
                    text = self._detokenize(seq, sample)
                except Exception as exc:
                    log.exception("detokenization failed", extra={"request_id": seq.request_id})
                    self.scheduler.finish(seq, FinishReason.ERROR, f"detokenization failed: {exc}")
            logprobs = None
            if seq.params.logprobs is not None and update.logprob is not None:
                logprobs = [
                    TokenLogprob(update.token_id, update.logprob, update.top_logprobs or [])
                ]
            state.emit(sample, text, [update.token_id], logprobs)

    def _detokenize(self, seq: Sequence, sample: SampleState) -> str:
        tokens, sample.undecoded = sample.undecoded, []
        if seq.finish_reason is FinishReason.STOP and tokens:
            tokens = tokens[:-1]  # finished by a stop token (or a completed grammar): not text
        text = ""
        if tokens:
            text, stopped = sample.detokenizer.step(tokens)
            if stopped:
                self.scheduler.finish(seq, FinishReason.STOP)
                return text
        if seq.is_finished:
            text += sample.detokenizer.flush()
        return text

    def _fail(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            state = self._requests.get(seq.request_id)
            if state is not None:
                state.emit(state.samples[seq.index], "", [], None)

    async def _fail_in_flight(
        self, what: str, exc: Exception, out: SchedulerOutput, ahead: InFlight | None
    ) -> None:
        """After a step or its bookkeeping failed: fail every unfinished request (a step
        scheduled ahead's once it ends) and empty the prefix cache; the loop serves on."""
        ids = sorted({item.seq.request_id for item in out.scheduled})
        log.exception(what, extra={"request_ids": ids})
        self._queued = None
        if ahead is not None:  # its sequences fail with the rest
            with contextlib.suppress(Exception):
                await ahead.result(self._executor)
        self.last_error = f"{what}: {type(exc).__name__}"
        self._fail(self.scheduler.fail_all(self.last_error))
        self.block_manager.reset_prefix_cache()

    def _fail_unschedulable(self) -> None:
        """Nothing fits although nothing runs: the head request can never get its blocks."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        seq = self.scheduler.waiting[0]
        self.scheduler.finish(seq, FinishReason.ERROR, "the request does not fit in the KV cache")
        self._fail([seq])

    def _expire_sessions(self) -> None:
        for session_id in self.scheduler.sessions.expired():
            self.end_session(session_id)

    # --------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        bm, sched = self.block_manager, self.scheduler
        return {
            "num_requests_running": len(sched.running),
            "num_requests_waiting": len(sched.waiting),
            "kv_cache_usage_perc": bm.usage,
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "num_preemptions": sched.stats.num_preemptions,
            "prompt_tokens_computed": sched.stats.prompt_tokens_computed,
            "generation_tokens": sched.stats.generation_tokens,
            "num_sessions": len(sched.sessions),
        }
