"""Attention cases of `bench/kernels.py`: decode and prefill attention over paged caches in
the engine's layout (bf16, int8 or int4), their launch-setting sweeps, and GEMMs beside them."""

from __future__ import annotations

import itertools
import math
import sys

import torch
import triton

from app.kernels.attention import (
    AttentionMetadata,
    kv_bytes_per_token,
    new_kv_cache,
    paged_attention_ref,
    paged_attention_triton,
    quantize_kv,
    quantize_kv_int4,
)
from app.kernels.decode_attention import (
    MAX_SPLITS,
    _decode_split_kernel,
    _num_sms,
    decode_num_splits,
    decode_tiles,
    longest_first,
    paged_decode_attention,
)
from app.kernels.prefill_attention import paged_prefill_attention, prefill_tiles
from bench.kernel_cases import DECODE_GRID, PREFILL_GRID, PREFILL_QUANT_GRID, Batch
from bench.kernel_timing import (
    KernelBench,
    bench_time,
    compare,
    compiled_resources,
    graph_time,
    kv_label,
    timed_setting,
)


class AttentionBench(KernelBench):
    """The attention cases, on caches filled with random keys and values (NaN elsewhere)."""

    def metadata(self, batch: Batch, tables: torch.Tensor) -> AttentionMetadata:
        """One step's metadata for `batch` over the device block tables `[B, width]`."""
        bs = self.s.block_size
        lens, query_lens = [n for n, _ in batch], [q for _, q in batch]
        seq = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(query_lens))
        pos = torch.cat([torch.arange(n - q, n) for n, q in batch])
        seq, pos = seq.to(self.device), pos.to(self.device)
        ints = {"dtype": torch.int32, "device": self.device}
        return AttentionMetadata(
            query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], **ints),
            seq_lens=torch.tensor(lens, **ints),
            block_tables=tables,
            slot_mapping=tables[seq, pos // bs].long() * bs + pos % bs,
            query_lens_cpu=query_lens,
            seq_lens_cpu=lens,
            max_query_len=max(query_lens),
            max_seq_len=max(lens),
        )

    def paged(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Caches holding random K/V at every sequence position and NaN elsewhere, shuffled
        block tables (one spare block that no table names), and the step's metadata."""
        s = self.s
        need = [math.ceil(n / s.block_size) for n, _ in batch]
        pool = torch.randperm(sum(need) + 1, generator=self.host_gen).tolist()
        tables = [[pool.pop() for _ in range(k)] + [0] * (max(need) - k) for k in need]
        table_t = torch.tensor(tables, dtype=torch.int32, device=self.device)
        shape = (sum(need) + 1, s.block_size, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = self.nan(*shape), self.nan(*shape)
        every = self.metadata(tuple((n, n) for n, _ in batch), table_t).slot_mapping
        for cache in (k_cache, v_cache):
            rows = cache.view(-1, s.num_kv_heads, s.head_dim)
            rows[every] = self.randn(len(every), s.num_kv_heads, s.head_dim)
        return k_cache, v_cache, self.metadata(batch, table_t)

    def paged_caches(self, batch: Batch, quant_policy: int) -> tuple:
        """`paged`'s caches, quantized for quant_policy 8 or 4 with their scales, in the
        engine's layout (`new_kv_cache`: values slot-fastest, scales head-major within a
        block): k, v, kv_scales (None for a cache in the model's dtype), metadata."""
        k_cache, v_cache, meta = self.paged(batch)
        if not quant_policy:
            return k_cache, v_cache, None, meta
        quantize = quantize_kv_int4 if quant_policy == 4 else quantize_kv
        (k_q, k_scale), (v_q, v_scale) = quantize(k_cache), quantize(v_cache)
        shape = (*k_cache.shape[:3], self.s.head_dim)
        cache = new_kv_cache(*shape, self.dtype, self.device, quant_policy)
        for stored, computed in zip(cache, (k_q, v_q, k_scale, v_scale), strict=True):
            stored.copy_(computed)
        return cache[0], cache[1], (cache[2], cache[3]), meta

    def decode_inputs(self, batch_size: int, context: int, quant_policy: int) -> tuple:
        """q, the caches, their scales (None for a cache in the model's dtype) and metadata."""
        batch = ((context, 1),) * batch_size
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(batch_size, self.s.num_heads, self.s.head_dim)
        return q, k_cache, v_cache, kv_scales, meta

    def decode(
        self, batch_size: int, context: int, quant_policy: int = 0, *, sweep: bool = False
    ) -> None:
        """One decode-attention case; `sweep` times every DECODE_GRID setting on it instead."""
        s = self.s
        q, k_cache, v_cache, kv_scales, meta = self.decode_inputs(batch_size, context, quant_policy)
        scale = s.head_dim**-0.5
        out = self.nan(*q.shape)

        def run(tiles: tuple[int, int, int] | None = None) -> list[torch.Tensor]:
            args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
            return [paged_decode_attention(*args, kv_scales=kv_scales, tiles=tiles, out=out)]

        def run_ref() -> list[torch.Tensor]:
            return [paged_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales=kv_scales)]

        per_token = kv_bytes_per_token(s.num_kv_heads, s.head_dim, q.dtype, quant_policy)
        work = batch_size * context * per_token + 2 * q.numel() * q.element_size()
        case = f"batch {batch_size} ctx {context}" + kv_label(quant_policy)
        if not sweep:
            self.record("decode attn", case, run, run_ref, work, "GB/s")
            return
        ref = run_ref()
        chosen = decode_tiles(s.head_dim * q.element_size(), quant_policy, batch_size)
        timed = []
        for setting in DECODE_GRID:
            try:
                rel, ok = compare(run(setting), ref)
            except triton.runtime.errors.OutOfResources:
                continue  # its tiles do not fit in shared memory
            if not ok:
                print(f"  {setting}: wrong (rel err {rel:.2e})")
                continue
            timed_setting(timed, graph_time(lambda setting=setting: run(setting)), setting)
        self.print_sweep(f"decode sweep {case}", "decode_tiles", chosen, timed, work)

    def decode_ragged(
        self, batch_size: int, shortest: int, longest: int, quant_policy: int = 0
    ) -> None:
        """Decode attention over contexts of mixed lengths (most ending inside a key tile) at
        every split count up to 8 (and the one `decode_num_splits` picks for a block table as
        wide as the longest context), with the programs started in row order and longest
        first."""
        s = self.s
        lens = torch.randint(shortest, longest + 1, (batch_size,), generator=self.host_gen)
        batch = tuple((n, 1) for n in lens.tolist())
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(batch_size, s.num_heads, s.head_dim)
        scale = s.head_dim**-0.5
        ref = [paged_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales=kv_scales)]
        out = self.nan(*q.shape)
        order = longest_first(meta.seq_lens)
        per_token = kv_bytes_per_token(s.num_kv_heads, s.head_dim, q.dtype, quant_policy)
        work = int(lens.sum()) * per_token + 2 * q.numel() * q.element_size()
        width = meta.block_tables.shape[1] * s.block_size
        auto = decode_num_splits(batch_size, s.num_kv_heads, width, _num_sms(q.device))
        case = f"batch {batch_size} ctx {shortest}-{longest}" + kv_label(quant_policy)
        print(f"\ndecode ragged, {case} (mean {lens.float().mean():.0f}), picked {auto} split(s):")
        print(f"  {'splits':>6} {'order':<14} {'us':>8} {'GB/s':>8}")
        # MAX_SPLITS: what a CUDA graph's launch asks at batch 1, its splits counted for the
        # graph's block table (as wide as the context window).
        for splits in sorted({1, 2, 3, 4, 6, 8, auto, MAX_SPLITS}):
            for ordered in (None, order):

                def run(splits: int = splits, ordered: torch.Tensor | None = ordered) -> list:
                    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
                    opts = {"num_splits": splits, "order": ordered, "out": out}
                    return [paged_decode_attention(*args, kv_scales=kv_scales, **opts)]

                rel, ok = compare(run(), ref)
                if not ok:
                    sys.exit(f"decode ragged {case}, {splits} splits: wrong (rel err {rel:.2e})")
                ms = graph_time(run)
                name = "rows" if ordered is None else "longest first"
                print(f"  {splits:>6} {name:<14} {ms * 1e3:>8.1f} {work / ms / 1e6:>8.1f}")
        sort_ms = graph_time(lambda: longest_first(meta.seq_lens))
        print(f"  ordering the rows (once per step): {sort_ms * 1e3:.1f} us")
        for line in compiled_resources(_decode_split_kernel):
            print(f"  {line}")

    def prefill(
        self, name: str, batch: Batch, quant_policy: int = 0, *, sweep: bool = False
    ) -> None:
        """One prefill-attention case; `sweep` times every PREFILL_GRID setting on it instead
        (a batch of prompts and chunks only: no decodes)."""
        s = self.s
        k_cache, v_cache, kv_scales, meta = self.paged_caches(batch, quant_policy)
        q = self.randn(sum(meta.query_lens_cpu), s.num_heads, s.head_dim)
        scale = s.head_dim**-0.5
        out, ref = self.nan(*q.shape), torch.empty_like(q)
        # The reference pads every sequence to the longest query; run it on groups of equal
        # query length (all decodes together, each longer query alone) to keep memory bounded.
        starts = meta.query_start_loc.tolist()
        decodes = [i for i, (_, n) in enumerate(batch) if n == 1]
        groups = [decodes] * bool(decodes) + [[i] for i, (_, n) in enumerate(batch) if n > 1]
        parts = [
            self.metadata(tuple(batch[i] for i in g), meta.block_tables[torch.tensor(g)])
            for g in groups
        ]
        rows = [
            torch.cat([torch.arange(starts[i], starts[i + 1]) for i in g]).to(self.device)
            for g in groups
        ]

        def run() -> list[torch.Tensor]:
            return [
                paged_attention_triton(
                    q, k_cache, v_cache, meta, scale, kv_scales=kv_scales, out=out
                )
            ]

        def run_ref() -> list[torch.Tensor]:
            for part, idx in zip(parts, rows, strict=True):
                ref[idx] = paged_attention_ref(
                    q[idx], k_cache, v_cache, part, scale, kv_scales=kv_scales
                )
            return [ref]

        visible = sum(sum(range(n - k + 1, n + 1)) for n, k in batch)  # keys per query, summed
        work = 4 * visible * s.num_heads * s.head_dim
        name += kv_label(quant_policy)
        if not sweep:
            self.record("prefill attn", name, run, run_ref, work, "TFLOP/s")
            return
        ref_out = run_ref()  # `ref`, which no setting's run writes
        group = triton.next_power_of_2(s.num_heads // s.num_kv_heads)
        timed = []
        for rows_per_tile, *launch in PREFILL_QUANT_GRID if quant_policy else PREFILL_GRID:
            setting = (max(1, rows_per_tile // group), *launch)

            def run_setting(setting: tuple[int, ...] = setting) -> list[torch.Tensor]:
                args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens)
                opts = {"kv_scales": kv_scales, "tiles": setting, "out": out}
                return [paged_prefill_attention(*args, meta.query_start_loc, scale, **opts)]

            try:
                rel, ok = compare(run_setting(), ref_out)
            except triton.runtime.errors.OutOfResources:
                continue  # its tiles do not fit in shared memory
            if not ok:
                print(f"  {setting}: wrong (rel err {rel:.2e})")
                continue
            timed_setting(timed, bench_time(run_setting), setting)
        block_q, _, block_n, warps, stages = prefill_tiles(
            s.head_dim, s.num_heads // s.num_kv_heads, q.element_size(), quant_policy
        )
        rule = "prefill_tiles (query tokens, keys, warps, stages)"
        chosen = (block_q, block_n, warps, stages)
        self.print_sweep(f"prefill sweep {name}", rule, chosen, timed, work, unit="TFLOP/s")

    def overlap(self, batch_size: int, context: int, rows: int) -> None:
        """A layer's four GEMMs on `rows` tokens beside decode attention over `batch_size`
        sequences of `context`: one after the other, then on two streams at once, with cuBLAS
        given every SM or leaving some to the attention (torch's experimental SM carveout). Two
        micro-batches, each one's GEMMs running beside the other's attention, would take twice
        the concurrent time where the whole batch takes its GEMMs and attention in turn."""
        q, k_cache, v_cache, _, meta = self.decode_inputs(batch_size, context, 0)
        scale, out = self.s.head_dim**-0.5, self.nan(*q.shape)
        mats = [(self.randn(n, k) / k**0.5, k) for _, n, k in self.s.linears[:4]]
        x = {m: {k: self.randn(m, k) for _, k in mats} for m in (rows, 2 * rows)}
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        whole = self.decode_inputs(2 * batch_size, context, 0)
        whole_args = (whole[0], whole[1], whole[2], whole[4].block_tables, whole[4].seq_lens)
        whole_out = self.nan(*whole[0].shape)

        def gemms(m: int = rows) -> None:
            for w, k in mats:
                torch.nn.functional.linear(x[m][k], w)

        def attend() -> None:
            paged_decode_attention(*args, out=out)

        def whole_step() -> None:
            gemms(2 * rows)
            paged_decode_attention(*whole_args, scale, out=whole_out)

        side = [torch.cuda.Stream() for _ in range(2)] if q.is_cuda else []

        def concurrent() -> None:
            if not side:
                gemms()
                return attend()
            main = torch.cuda.current_stream()
            for stream, work in zip(side, (gemms, attend), strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    work()
            for stream in side:
                main.wait_stream(stream)

        attention, both = bench_time(attend), bench_time(whole_step)
        print(
            f"overlap: {rows} GEMM rows beside {batch_size} x {context} decode attention "
            f"({attention * 1e3:.0f} us); the whole batch ({2 * rows} rows, {2 * batch_size} "
            f"sequences) in turn {both * 1e3:.0f} us",
            flush=True,
        )
        for carveout in (0, 16, 32, 48, 64) if side else (0,):
            torch._C._set_sm_carveout_experimental(carveout or None)
            alone, paired = bench_time(gemms), bench_time(concurrent)
            print(
                f"  cuBLAS leaving {carveout:>2} SMs: GEMMs {alone * 1e3:.0f} us, in turn with "
                f"the attention {(alone + attention) * 1e3:.0f} us, on two streams "
                f"{paired * 1e3:.0f} us ({paired / (alone + attention):.2f}); two micro-batches "
                f"{2 * paired * 1e3:.0f} us against the whole batch ({2 * paired / both:.2f})",
                flush=True,
            )
        torch._C._set_sm_carveout_experimental(None)
