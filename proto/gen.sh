#!/usr/bin/env bash
# Regenerates the committed _pb2 / _pb2_grpc modules and their type stubs from the .proto files
# (the stubs by mypy-protobuf, a test dependency: typed messages and typed servicers/stubs for
# grpc.aio, which mypy checks the services against).
# Usage: proto/gen.sh [OUT_DIR]   (default: proto/, in place)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
mkdir -p "$out/pdserve/v1"
python -m grpc_tools.protoc -I "$here" --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" "$here"/pdserve/v1/*.proto
