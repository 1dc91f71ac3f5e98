"""The `splitfuse` command line: list, env, bad flags, and the terminal chat (a real process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "app.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_list_names_architectures_and_templates() -> None:
    result = run_cli("list")
    assert result.returncode == 0
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM", "chatml"):
        assert name in result.stdout


def test_env_reports_versions() -> None:
    result = run_cli("env")
    assert result.returncode == 0
    assert "torch:" in result.stdout and "python:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/no/such/model"], "does not exist"),
        (["serve", "--block-size", "48"], "power of two"),
        (["chat", "--dtype", "int3"], "invalid choice"),
        (["serve", "--quant-policy", "2"], "invalid choice: 2"),
        (["serve", "--backend", "turbomind"], "invalid choice: 'turbomind'"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["serve", "--server-name", "0.0.0.0", "--server-port", "23334", "--log-level", "INFO"],
            {"host": "0.0.0.0", "port": 23334, "log_level": "info"},
        ),
        (["serve", "--backend", "pytorch", "--port", "9"], {"backend": "pytorch", "port": 9}),
        (["ui", "--server-port", "7000"], {"port": 7000}),
        (
            ["proxy", "--server-name", "::1", "--log-level", "DEBUG"],
            {"host": "::1", "log_level": "debug"},
        ),
    ],
)
def test_lmdeploy_flag_names_are_accepted(args: list[str], expected: dict[str, object]) -> None:
    from app.cli import build_parser

    parsed = vars(build_parser().parse_args(args))
    assert {key: parsed[key] for key in expected} == expected


class Output:
    """Collects a process's output on a thread, so the test can wait for markers."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self.data = b""
        self.consumed = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            self.data += chunk

    def until(self, marker: str, timeout: float = 120) -> str:
        """Wait for `marker` after what earlier calls consumed; return the text up to it."""
        deadline = time.monotonic() + timeout
        needle = marker.encode()
        while (at := self.data.find(needle, self.consumed)) < 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = self.data[-500:].decode(errors="replace")
                raise AssertionError(f"{marker!r} never appeared; output ends with {tail!r}")
            time.sleep(0.05)
        text = self.data[self.consumed : at].decode(errors="replace")
        self.consumed = at + len(needle)
        return text


@pytest.mark.slow
def test_terminal_chat_streams_stops_and_resets(smollm2_dir: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["chat", str(smollm2_dir), "--temperature", "0", "--max-new-tokens", "400"]
    proc = subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out = Output(proc)

    def say(line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    try:
        out.until(">>> ")
        say("What is the capital of France? Answer in one word.")
        assert "Paris" in out.until(">>> ")
        say("Write a very long story about a dragon, at least 2000 words.")
        time.sleep(3)
        proc.send_signal(signal.SIGINT)  # stops the reply, not the chat
        out.until("(stopped)")
        say("What did I ask you first?")
        out.until(">>> ")
        say("/reset")
        out.until("(conversation reset)")
        say("/exit")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
