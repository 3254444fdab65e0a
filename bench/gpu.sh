#!/usr/bin/env bash
# One-shot GPU run for a lent H200 (about ten minutes): set up with a CUDA torch, run the GPU
# tests and the engine benchmark in bfloat16, write everything under ${OUT:-gpu-results}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
TORCH_SPEC=${TORCH_SPEC:-torch} scripts/setup.sh --test > "$out/setup.log" 2>&1
.venv/bin/python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" \
  > "$out/device.txt" 2>&1
timeout 300 .venv/bin/python bench/bench_engine.py --device cuda --dtype bfloat16 \
  --batches 1,16,64 > "$out/bench_engine_cuda.txt" 2>&1
timeout 200 .venv/bin/python -m pytest -q -m gpu tests > "$out/gpu_tests.txt" 2>&1
tail -n 20 "$out"/*.txt
