"""What the Docker image does, done without Docker: the install script it runs, in a fresh virtual
environment, installs a server that answers a chat request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from deploy_harness import REPO, start
from processes import free_port

# The Dockerfile's own command line; the test below runs the same.
INSTALL = "bash scripts/install.sh --ui"


def test_the_dockerfile_runs_the_install_script() -> None:
    assert INSTALL in (REPO / "Dockerfile").read_text()


@pytest.mark.slow
def test_install_script_in_a_fresh_venv_serves_a_chat(tmp_path: Path, smollm2_dir: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    installed = subprocess.run(
        INSTALL.split(),
        cwd=REPO,
        env={**env, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    where = subprocess.run(
        [str(python), "-c", "import fastapi, gradio, torch; print(torch.__file__)"],
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.startswith(str(venv)), where.stdout  # the venv's own torch

    port = free_port()
    command = [str(venv / "bin" / "splitfuse"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    # smollm2_dir is CACHE/gguf/NAME: reuse the converted bundled model instead of converting again.
    server = start(
        command, tmp_path / "server.log", port, {"SPLITFUSE_CACHE_DIR": str(smollm2_dir.parents[1])}
    )
    try:
        server.wait_ready("/health", timeout=180)
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        request = urllib.request.Request(
            server.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:  # loopback only
            answer = json.loads(response.read())
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
    finally:
        server.stop()
