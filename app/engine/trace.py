"""Step trace: one JSON line per engine step and per garbage-collector pause, written when
`SPLITFUSE_STEP_TRACE` names a file; `bench/trace_report.py` turns it into a timeline summary."""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

from app.engine.scheduler import SchedulerOutput

TRACE_ENV = "SPLITFUSE_STEP_TRACE"


class StepTrace:
    """Appends timing records to a file; `from_env` gives None unless tracing was asked for."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 (lives with the engine)
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def step(
        self,
        out: SchedulerOutput,
        marks: dict[str, float],
        timing: dict[str, Any] | None,
        waiting: int,
        requests: int,
    ) -> None:
        """One step's line: the loop's times (schedule start `t`, `submit`, `process_start` of
        the step before's tokens, `result` in hand, `update_start` once the step queued behind
        it has launched, `done` updating), the GPU thread's
        `timing` (`start`, `launched`, `end` with the tokens on the host) and the batch."""
        self.write(
            {
                **marks,
                "done": time.perf_counter(),
                "ahead": out.ahead_rows is not None,
                "seqs": len(out.scheduled),
                "tokens": sum(item.num_new_tokens for item in out.scheduled),
                "decodes": sum(item.num_new_tokens == 1 for item in out.scheduled),
                "waiting": waiting,
                "requests": requests,
                **(timing or {}),
            }
        )

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._gc_start) * 1e3
            self.write({"gc": info["generation"], "t": self._gc_start, "ms": ms})

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._file.close()
