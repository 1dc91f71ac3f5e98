"""The GPU-thread side: scheduler output -> input tensors -> forward -> sampled tokens.

Everything here runs in the engine's single executor thread; it is the only code that touches
the device. Input tensors are built in one place from Python lists and copied to the device
without blocking.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.engine.cuda_graphs import DecodeGraphs, MixedGraphs, capture_graphs
from app.engine.models.registry import KVCacheSpec
from app.engine.sampler import PendingSample, Sampler, SamplingRow, host_to_device
from app.engine.scheduler import ScheduledSequence, SchedulerOutput, StepOutput
from app.engine.sequence import Sequence
from app.kernels.attention import AttentionMetadata, new_kv_cache, token_layout


@dataclass
class ModelInput:
    """The tensors of one step, built from a SchedulerOutput."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attn: AttentionMetadata
    logit_rows: torch.Tensor  # int64 [R]: rows of the hidden states that need logits


# Most kept rows of one request in one step that go to the host without a wait, through pinned
# memory: a decode step's one row, not a prompt's every row (pinned memory is costly to grow).
STAGED_ROWS = 16


@dataclass
class KeptRows:
    """Rows of a step's logits that a sequence's request takes (output_logits, hidden states):
    `count` rows from `row`, for positions from `first_pos` on."""

    seq: Sequence
    first_pos: int
    row: int
    count: int = 1

    def read(
        self, logits: torch.Tensor, hidden: torch.Tensor | None, *, staged: bool = False
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(first position, logits, hidden states) as asked, float32 on the host; `hidden` is
        None after a graphed step, which requests for hidden states never take. `staged`: copied
        from a CUDA device into pinned memory without a wait (the step's `copied` event)."""
        params = self.seq.params
        if params.output_last_hidden_state and hidden is None:
            raise RuntimeError("hidden states were asked of a graphed step")
        rows = slice(self.row, self.row + self.count)

        def copy(t: torch.Tensor) -> torch.Tensor:  # never a view that holds the step's tensor
            if staged:
                return t[rows].float().to("cpu", non_blocking=True)
            return t[rows].to("cpu", torch.float32, copy=True)

        return (
            self.first_pos,
            copy(logits) if params.output_logits else None,
            copy(hidden) if params.output_last_hidden_state else None,
        )


class PendingStep:
    """A launched step; `result` waits for its samples (and prompt logprobs, kept rows) to reach
    the host."""

    def __init__(
        self,
        step: StepOutput,
        sample: PendingSample | None = None,
        sampling: list[Sequence] | None = None,
        prompt_logprobs: list[tuple[int, torch.Tensor]] | None = None,
        staged: list[int] | None = None,
        copied: torch.cuda.Event | None = None,
        timing: dict[str, Any] | None = None,
        events: tuple[torch.cuda.Event, ...] = (),
    ):
        self._step = step
        self._sample = sample
        self._sampling = sampling or []  # the sequences of the sampling rows, in order
        self._prompt_logprobs = prompt_logprobs or []  # (seq_id, host tensor being copied)
        self._staged = staged or []  # seq_ids whose kept rows are being copied to pinned memory
        self._copied = copied  # recorded after those copies (CUDA)
        self._timing = timing
        self._events = events

    def result(self) -> StepOutput:
        step = self._step
        if self._copied is not None:
            self._copied.synchronize()
        for seq_id, host in self._prompt_logprobs:
            step.prompt_logprobs[seq_id] = host.tolist()
        for seq_id in self._staged:  # into ordinary memory: requests keep their rows to the end
            first, *tensors = step.rows[seq_id]
            step.rows[seq_id] = (first, *(None if t is None else t.clone() for t in tensors))
        if self._sample is not None:
            sampled = self._sample.result()
            step.token_ids, step.logprobs = sampled.token_ids, sampled.logprobs
            step.top_logprobs = sampled.top_logprobs
            step.errors = {self._sampling[i].seq_id: e for i, e in sampled.errors.items()}
        if self._timing is not None:
            if self._events:
                self._events[1].synchronize()
                self._timing["device_ms"] = self._events[0].elapsed_time(self._events[1])
            self._timing["end"] = time.perf_counter()
        return step


def chunk_rows(item: ScheduledSequence) -> int:
    """How many of a scheduled chunk's rows before its sampling row need logits: all of them for
    a request that takes every position's logits or hidden states, the prompt's for prompt
    logprobs, else none."""
    params = item.seq.params
    if params.all_rows or (params.prompt_logprobs and item.start_pos < item.seq.num_prompt_tokens):
        return item.num_new_tokens - (1 if item.sample else 0)
    return 0


class ModelRunner:
    """Owns the model, the KV cache tensors, per-sequence generators and the sampler."""

    def __init__(
        self,
        model: nn.Module,
        kv_spec: KVCacheSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        quant_policy: int = 0,
    ):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        # One block past the pool is scratch space for CUDA-graph padding rows.
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, kv_spec.num_kv_heads, kv_spec.head_dim)
        self.kv_caches = [
            new_kv_cache(*shape, dtype, device, quant_policy) for _ in range(kv_spec.num_layers)
        ]
        self.sampler = Sampler()
        self._generators: dict[int, torch.Generator] = {}
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self._last_tokens: torch.Tensor | None = None  # the last step's samples, on the device

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int, max_tokens: int) -> None:
        """Capture decode and mixed-step graphs (CUDA only); afterwards the steps that fit them
        replay them. `max_tokens` is the step's token budget."""
        args = (self.model, self.kv_caches, max_batch_size)
        rest = (max_model_len, self.block_size, self.scratch_block, self.device)
        graphs = DecodeGraphs(*args, *rest)
        mixed = MixedGraphs(*args, max_tokens, *rest)
        capture_graphs([mixed, graphs] if mixed.buckets else [graphs], self.device)
        self.graphs = graphs
        self.mixed_graphs = mixed if mixed.buckets else None

    def _graph_logits(
        self, out: SchedulerOutput, input_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Logits from a decode graph, or None when the step is not a plain decode batch."""
        return None if self.graphs is None else self.graphs.run(out.scheduled, input_ids)

    def _ahead_input_ids(self, out: SchedulerOutput) -> torch.Tensor | None:
        """A step scheduled ahead takes its leading decodes' input ids from the previous step's
        samples, which never went through the host."""
        if out.ahead_rows is None:
            return None
        if self._last_tokens is None:
            raise RuntimeError("a step scheduled ahead must follow a sampling step")
        return self._last_tokens.index_select(0, self._tensor(out.ahead_rows, torch.int64))

    def _mixed_logits(
        self, out: SchedulerOutput, ahead_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Logits of the sampling rows from a mixed-step graph, or None when the step does not
        fit one (too many tokens, or a request that takes other rows: prompt logprobs, logits or
        hidden states)."""
        graphs = self.mixed_graphs
        if graphs is None:
            return None
        items = out.scheduled
        num_tokens = sum(item.num_new_tokens for item in items)
        width = max(len(item.block_table) for item in items)
        if not graphs.fits(len(items), num_tokens, width) or any(
            item.seq.params.needs_eager for item in items
        ):
            return None
        return self.model.compute_logits(graphs.run(items, num_tokens, ahead_ids))

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(data, self.device, dtype)

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        """Token ids and per-sequence numbers go to the device in two copies; every token's
        position and cache slot are derived there, with no per-token work on the host."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        tables: list[list[int]] = []
        for item in out.scheduled:
            start, n = item.start_pos, item.num_new_tokens
            row0 = len(input_ids)
            input_ids.extend(item.token_ids)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(item.block_table)
            logit_rows.extend(range(row0, row0 + chunk_rows(item)))
            if item.sample:
                logit_rows.append(row0 + n - 1)
        num_tokens, num_seqs = len(input_ids), len(query_lens)
        query_start = [0, *itertools.accumulate(query_lens)]
        packed = self._tensor(input_ids + query_start + seq_lens + logit_rows, torch.int64)
        width = max(len(t) for t in tables)
        block_tables = self._tensor([[*t, *([0] * (width - len(t)))] for t in tables], torch.int32)
        query_start_t = packed[num_tokens : num_tokens + num_seqs + 1]
        seq_lens_t = packed[num_tokens + num_seqs + 1 : num_tokens + 2 * num_seqs + 1]
        positions, slots = token_layout(
            query_start_t, seq_lens_t, block_tables, self.block_size, num_tokens
        )
        attn = AttentionMetadata(
            # Fresh int32 tensors, not views into `packed`: Triton specializes on alignment.
            query_start_loc=query_start_t.int(),
            seq_lens=seq_lens_t.int(),
            block_tables=block_tables,
            slot_mapping=slots,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return ModelInput(
            packed[:num_tokens], positions, attn, packed[num_tokens + 2 * num_seqs + 1 :]
        )

    @torch.inference_mode()
    def launch(
        self,
        out: SchedulerOutput,
        allowed: Future[torch.Tensor] | None = None,
        launched: Callable[[], None] | None = None,
        timing: dict[str, Any] | None = None,
    ) -> PendingStep:
        """Queue one step on the device, its sampling and the copies of its tokens to the host
        included; the returned step's `result` waits for those. A step scheduled ahead may be
        launched before that (its tokens come from this step's samples on the device), so the
        device never waits for the host between the two. `allowed`, when given, resolves
        (while the forward runs) to the grammar mask of the sampling rows: bool [rows, vocab].
        `launched` is called once the forward pass is on the device's queue. `timing`, when
        given, receives the step's host times (and its device span on CUDA)."""
        for seq_id in out.released_seq_ids:
            self._generators.pop(seq_id, None)
        step = StepOutput()
        if not out.scheduled:
            return PendingStep(step)
        events = self._start_timing(timing) if timing is not None else ()
        ahead_ids = self._ahead_input_ids(out)
        kind = "decode"
        hidden: torch.Tensor | None = None  # the logit rows' final hidden states (eager steps)
        logits = self._graph_logits(out, ahead_ids)
        if logits is None:
            kind = "mixed"
            logits = self._mixed_logits(out, ahead_ids)
        if logits is None:
            kind = "eager"
            inp = self.prepare(out)
            if ahead_ids is not None:  # the leading decodes' tokens, one row each
                inp.input_ids[: len(ahead_ids)].copy_(ahead_ids)
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn)
            hidden = hidden[inp.logit_rows]
            logits = self.model.compute_logits(hidden)
        if launched is not None:
            launched()
        if timing is not None:
            timing["launched"], timing["kind"] = time.perf_counter(), kind
            timing["launch_cpu_ms"] = (time.thread_time() - timing["cpu"]) * 1e3

        sample_rows: list[int] = []
        rows: list[SamplingRow] = []
        sampling: list[Sequence] = []
        prompt_logprobs: list[tuple[int, torch.Tensor]] = []
        kept: list[KeptRows] = []
        cursor = 0
        for item in out.scheduled:
            seq = item.seq
            params = seq.params
            extra = chunk_rows(item)
            if params.prompt_logprobs and item.start_pos < seq.num_prompt_tokens:
                prompt_logprobs.append(self._prompt_logprobs(item, logits[cursor : cursor + extra]))
            if params.output_logits or params.output_last_hidden_state:
                if params.all_rows:  # every row of the chunk, the sampling row included
                    taken = KeptRows(seq, item.start_pos, cursor, extra + (1 if item.sample else 0))
                else:  # the sampling row only
                    taken = KeptRows(seq, item.start_pos + item.num_new_tokens - 1, cursor + extra)
                if taken.count:
                    kept.append(taken)
            cursor += extra
            if item.sample:
                sample_rows.append(cursor)
                cursor += 1
                sampling.append(seq)
                rows.append(
                    SamplingRow(
                        seq.params,
                        seq.prompt_ids,
                        seq.output_ids,
                        self._generator(seq.seq_id, seq.params.seed, seq.index),
                        self.eos_token_ids,
                    )
                )
        all_logits = logits
        sample = None
        if rows:
            mask = None if allowed is None else allowed.result().to(self.device, non_blocking=True)
            if len(sample_rows) < len(logits):  # else every row samples, in order
                logits = logits[sample_rows]
            sample = self.sampler.launch(logits, rows, mask)  # leaves `all_logits` as they were
            self._last_tokens = sample.device_ids
        # Copied now, before a later step's graph overwrites the logits: a decode step's rows
        # without a wait, a prompt's many rows straight into ordinary memory (a wait).
        staged: list[int] = []
        for taken in kept:
            stage = self.device.type == "cuda" and taken.count <= STAGED_ROWS
            step.rows[taken.seq.seq_id] = taken.read(all_logits, hidden, staged=stage)
            if stage:
                staged.append(taken.seq.seq_id)
        copied = None
        if (prompt_logprobs or staged) and self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        if events:
            events[1].record()
        return PendingStep(step, sample, sampling, prompt_logprobs, staged, copied, timing, events)

    def _start_timing(self, timing: dict[str, float]) -> tuple[torch.cuda.Event, ...]:
        timing["start"], timing["cpu"] = time.perf_counter(), time.thread_time()
        if self.device.type != "cuda":
            return ()
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        return events

    def _prompt_logprobs(
        self, item: ScheduledSequence, logits: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """Log-probability of each next prompt token inside this chunk (`logits`: the chunk's
        rows before its sampling row), on its way to the host: (seq_id, host tensor)."""
        seq = item.seq
        n = len(logits)
        targets = seq.token_ids_slice(item.start_pos + 1, item.start_pos + 1 + n)
        rows = torch.log_softmax(logits.float(), dim=-1)
        picked = rows.gather(1, self._tensor(targets, torch.int64)[:, None])[:, 0]
        # A chunk that ends at the prompt's end computes the last prompt token's successor in the
        # sampling row, which belongs to the output, not the prompt.
        keep = max(0, seq.num_prompt_tokens - 1 - item.start_pos)
        return seq.seq_id, picked[:keep].to("cpu", non_blocking=True)

    def _generator(self, seq_id: int, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        generator = self._generators.get(seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed + index)
            self._generators[seq_id] = generator
        return generator
