"""`bench/kernels.py`'s sweeps at tiny shapes (under the Triton interpreter without a GPU): each
candidate kernel setting is checked against its reference before a GPU call times it, so a
broken candidate or sweep shows up here rather than in scarce device time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_sweeps_check_every_candidate() -> None:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [
            sys.executable, "bench/kernels.py", "--tiny", "--only", "decode-ragged,prefill-sweep",
            "--kv", "0",  # the quantized caches' launch settings: test_triton_attention.py
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "wrong" not in proc.stdout
    for heading in ("decode ragged, batch 5", "prefill sweep prompts"):
        assert heading in proc.stdout
