# syntax=docker/dockerfile:1
# splitfuse: the OpenAI-compatible server with the bundled SmolLM2 model, ready to serve.
#   docker build -t splitfuse .                        CUDA image (run with --gpus all)
#   docker build -t splitfuse:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 23333:23333 splitfuse     serves the bundled model
#   docker run --gpus all -p 23333:23333 -v "$PWD/models:/models:ro" splitfuse serve /models/NAME
# Settings come from SPLITFUSE_* variables (SPLITFUSE_MAX_BATCH_SIZE=64, ...) or flags after
# `serve`. The same image runs `proxy` and `ui` (see docker-compose.yml).
ARG VARIANT=cuda

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base-cuda
# gcc and the Python headers: Triton compiles its kernel launchers on first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.12-slim AS base-cpu

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
# Where torch comes from; empty: PyPI (the CUDA build) for cuda, PyTorch's CPU-only index for cpu.
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    SPLITFUSE_CACHE_DIR=/var/cache/splitfuse \
    SPLITFUSE_LOG_FORMAT=json

WORKDIR /opt/splitfuse
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY config config
COPY app app
# The same install script CI runs in a fresh virtual environment; --ui adds gradio for `ui`.
RUN --mount=type=cache,target=/root/.cache/pip \
    index="$TORCH_INDEX_URL" \
    && if [ -z "$index" ] && [ "$VARIANT" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi \
    && python3.12 -m venv /opt/venv \
    && PYTHON=/opt/venv/bin/python TORCH_INDEX_URL="$index" bash scripts/install.sh --ui

# A numeric non-root user, so Kubernetes can verify runAsNonRoot.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin splitfuse \
    && mkdir -p /models "$SPLITFUSE_CACHE_DIR" \
    && chown splitfuse:splitfuse /models "$SPLITFUSE_CACHE_DIR"
USER 10001:10001
# Convert the bundled GGUF model now, so a container starts serving in seconds.
RUN python -c "from app.engine.loader import resolve_model_dir; print(resolve_model_dir(None))"

EXPOSE 23333
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SPLITFUSE_PORT', '23333'), timeout=4)"]
ENTRYPOINT ["splitfuse"]
CMD ["serve", "--host", "0.0.0.0"]
