"""Where a process's threads spend their wall time: a sampler thread reads the other threads'
Python stacks every few milliseconds and counts the innermost frames.

A thread waiting inside C (a device synchronization, a lock, I/O) usually holds no GIL, so the
sampler sees it there; one running Python delays the sample by up to the switch interval.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from pathlib import Path


class StackSampler:
    """Samples every thread's stack; `report` prints each thread's most frequent stacks."""

    def __init__(self, interval_s: float = 0.002, depth: int = 4) -> None:
        self.interval_s = interval_s
        self.depth = depth
        self.counts: dict[str, Counter[tuple[str, ...]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack: list[str] = []
                while frame is not None and len(stack) < self.depth:
                    code = frame.f_code
                    stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                name = names.get(ident, str(ident))
                self.counts.setdefault(name, Counter())[tuple(stack)] += 1

    def report(self, top: int = 8) -> None:
        for name, counter in sorted(self.counts.items(), key=lambda kv: -kv[1].total()):
            total = counter.total()
            print(f"thread {name}: {total} samples (~{total * self.interval_s:.1f} s)")
            for stack, n in counter.most_common(top):
                print(f"  {n / total:6.1%}  {' <- '.join(stack)}")
