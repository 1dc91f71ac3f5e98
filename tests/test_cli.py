"""The `splitfuse` command line: list, env, bad flags, and the terminal chat (a real process)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "app.cli"]


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


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
        (["ui", "--port", "70000"], "--port/--server-port: 70000 is above 65535"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "setting port: 99999 is not a port number"),
        (["serve", "--port", "-1"], "setting port: -1 is not a port number"),
        (["serve", "--proxy-url", "notaurl"], "setting proxy_url: 'notaurl'"),
        (["serve", "--proxy-url", "http://proxy:8000", "--port", "0"], "needs node_url"),
        (["serve", "--chat-template", "nosuch"], "chat template 'nosuch' is neither"),
        (["chat", "--temperature", "-1"], "temperature must be >= 0"),
        (["chat", "--temperature", "nan"], "temperature must be a finite number"),
        (["chat", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["chat", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["chat", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["chat", "--chat-template", "nosuch"], "chat template 'nosuch' is neither"),
        (["serve", "--port", "0"], "model path does not exist"),  # 0: any free port
        (["serve", "--max-queued-requests", "0"], "max_queued_requests must be >= 1"),
        (["serve", "--shutdown-timeout", "nan"], "shutdown_timeout must be a finite number"),
    ],
)
def test_flags_are_checked_before_the_model_loads(args: list[str], message: str) -> None:
    # A check made after the load would report the missing model instead.
    result = run_cli(*args, "/no/such/model")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_a_port_in_use_is_refused_before_the_model_loads() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = str(sock.getsockname()[1])
        result = run_cli("serve", "/no/such/model", "--host", "127.0.0.1", "--port", port)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"splitfuse: error: cannot listen on 127.0.0.1 port {port}: Address already in use"
    )


def test_a_truncated_gguf_is_a_one_line_error(tmp_path: Path) -> None:
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    result = run_cli("serve", str(gguf), env={"SPLITFUSE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert result.stderr.startswith(f"splitfuse: error: {gguf} is truncated or corrupt")
    assert result.stderr.count("\n") == 1


@pytest.mark.slow
def test_truncated_safetensors_is_a_one_line_error(smollm2_dir: Path, tmp_path: Path) -> None:
    for file in smollm2_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    weights = tmp_path / "model.safetensors"
    with (smollm2_dir / "model.safetensors").open("rb") as full:
        weights.write_bytes(full.read(100_000))
    result = run_cli("serve", str(tmp_path))
    assert result.returncode == 2
    assert f"splitfuse: error: {weights} is not a valid safetensors file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "chat"])
def test_an_error_after_the_load_shuts_the_engine_down(
    command: str, smollm2_dir: Path, tmp_path: Path
) -> None:
    # The file exists, so only compiling it, after the load, finds the error.
    template = tmp_path / "broken.jinja"
    template.write_text("{% if %}")
    port = ["--port", "0"] if command == "serve" else []
    result = run_cli(command, str(smollm2_dir), "--chat-template", str(template), *port)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("splitfuse: error: invalid chat template")
    assert "leaked" not in result.stderr  # nanobind's report of objects never shut down


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
