"""Runs `splitfuse serve` for the tests: it dies with the test process, and injects faults.

Started as `python launcher.py PARENT_PID serve ...`. A watchdog thread exits the server when
the test process that started it is gone, so a killed pytest never leaves servers behind.

Faults (test-only, never hooks in app/): with SPLITFUSE_TEST_FAULT_DIR set, the engine is patched
before serving so that the tests can trigger faults by creating files in that directory:
- `forward-error`: the next forward pass raises (the file is consumed);
- `broken`: every forward pass raises while the file exists;
- `stall`: the next forward pass sleeps for the number of seconds the file holds (consumed);
- `hold`: forward passes wait while the file exists (the engine freezes with its queues as they
  are);
a request whose id starts with `poison-` fails in detokenization (a per-request fault), and
SPLITFUSE_TEST_STEP_DELAY (seconds) slows every forward pass, so that requests last long enough
to be caught in flight.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

POISON_PREFIX = "poison-"


def watch_parent(parent_pid: int) -> None:
    """Exit at once when the parent goes away (we get re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(3)


def _take(path: Path) -> str | None:
    """Consume a trigger file; None when it is not there."""
    try:
        text = path.read_text()
        path.unlink()
    except FileNotFoundError:
        return None
    return text


def install_faults(fault_dir: Path, step_delay: float) -> None:
    from app.engine.engine import AsyncEngine
    from app.engine.model_runner import ModelRunner

    launch = ModelRunner.launch
    detokenize = AsyncEngine._detokenize

    def faulty_launch(self: ModelRunner, *args: Any, **kwargs: Any) -> Any:
        if _take(fault_dir / "forward-error") is not None or (fault_dir / "broken").exists():
            raise RuntimeError("injected forward-pass failure")
        while (fault_dir / "hold").exists():
            time.sleep(0.02)
        stall = _take(fault_dir / "stall")
        if stall is not None:
            time.sleep(float(stall))
        time.sleep(step_delay)
        return launch(self, *args, **kwargs)

    def faulty_detokenize(self: AsyncEngine, seq: Any, *args: Any, **kwargs: Any) -> str:
        if seq.request_id.startswith(POISON_PREFIX):
            raise ValueError("injected detokenizer failure")
        return detokenize(self, seq, *args, **kwargs)

    ModelRunner.launch = faulty_launch  # type: ignore[method-assign]
    AsyncEngine._detokenize = faulty_detokenize  # type: ignore[method-assign]


def main() -> None:
    parent_pid, argv = int(sys.argv[1]), sys.argv[2:]
    threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True).start()
    fault_dir = os.environ.get("SPLITFUSE_TEST_FAULT_DIR")
    if fault_dir:
        install_faults(Path(fault_dir), float(os.environ.get("SPLITFUSE_TEST_STEP_DELAY", "0")))
    from app.cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
