#!/usr/bin/env bash
# Install what the tests need, lint, and run the whole test suite (the README's test command).
# pytest exits non-zero (5) when it collects no tests, so an empty run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh --dev --ui
# The web UI's browser test drives Debian's chromium through its chromedriver (no downloads).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
"$PY" -m ruff check app tests bench
"$PY" -m ruff format --check app tests bench
# Triton kernels run under its interpreter on machines without a GPU (read when kernels load).
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
"$PY" -m pytest "$@"
