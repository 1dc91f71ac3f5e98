"""Processes for the deployment tests: started on free loopback ports, logged to files, stopped
by the tests themselves, and killed by the kernel if the test process dies first."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from processes import stop_process

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the test process goes away, however.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The status of GET `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@dataclass
class Process:
    """A started command whose output goes to `log_path`."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float) -> None:
        """Until GET `path` answers 200; fail with the log tail if the process dies first."""
        deadline = time.monotonic() + timeout
        while http_status(self.url + path) != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM (both the server and the UI shut down cleanly on it), then SIGKILL."""
        stop_process(self.proc)


def start(
    command: list[str], log_path: Path, port: int, env: dict[str, str] | None = None
) -> Process:
    """Start `command` (which listens on `port`), its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
            preexec_fn=_die_with_parent,
        )
    return Process(proc, log_path, f"http://127.0.0.1:{port}")
