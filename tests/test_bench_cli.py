"""The benchmark scripts start as their commands are written (`python bench/NAME.py`), run on
the bundled model, and refuse wrong arguments with a one-line usage error before any model is
built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.stem for path in (ROOT / "bench").glob("*.py") if "__main__" in path.read_text()
)


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, f"bench/{script}.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_script_is_found() -> None:
    assert {"kernels", "latency", "serving", "throughput"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script: str) -> None:
    result = run_bench(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("throughput", ["--num-prompts", "-5"], "--num-prompts: -5 is below 1"),
        ("throughput", ["--dtype", "int3"], "invalid choice"),
        ("latency", ["--runs", "0"], "--runs: 0 is below 1"),
        ("structured", ["--batch-sizes", "4", "0"], "--batch-sizes: 0 is below 1"),
        ("host_step", ["--batch", "x"], "--batch: 'x' is not a number"),
        ("serving", ["--request-rate", "nan"], "--request-rate: nan is not a finite number"),
        ("serving", ["--request-rate", "-1"], "--request-rate: -1 is below 0.0"),
        ("kernels", ["--kv", "3"], "--kv: '3' is not a KV cache"),
        ("kernels", ["--only", "decode,nothing"], "unknown --only groups ['nothing']"),
        ("kernels", ["--ragged", "1:2"], "'1:2' is not BATCH:SHORTEST:LONGEST"),
        ("kernels", ["--tiny", "--sweep-cases", "nope"], "unknown --sweep-cases ['nope']"),
    ],
)
def test_wrong_arguments_are_one_line_errors(script: str, args: list[str], message: str) -> None:
    result = run_bench(script, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


# Run from its own folder, a script must not let `bench/kernels.py` shadow the `kernels`
# package, which recent transformers import as they load a model.
def test_latency_on_the_bundled_model(smollm2_dir: Path) -> None:
    result = run_bench(
        "latency", "--model", str(smollm2_dir), "--runs", "1", "--input-len", "8",
        "--output-len", "4", "--skip-hf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ms/token" in result.stdout and "roofline" in result.stdout


def test_throughput_beside_transformers(smollm2_dir: Path) -> None:
    result = run_bench(
        "throughput", "--model", str(smollm2_dir), "--num-prompts", "3", "--input-len", "8",
        "--output-len", "4", "--hf-num-prompts", "2", "--hf-batch-size", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "splitfuse / transformers output tok/s" in result.stdout
