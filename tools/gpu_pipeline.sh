#!/usr/bin/env bash
# On a CUDA machine where mlx_primitives imports (e.g. PYTHONPATH=$PWD): build this chip's
# pretuned database (the default preset), run the benchmark against it, then the GPU tests.
# Everything goes into DIR (default ./gpu-results); DIR/status gets a line per finished step.
#   bash tools/gpu_pipeline.sh [DIR] [pytest args...]
set -uo pipefail
out=${1:-gpu-results}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {
  local name=$1
  shift
  "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? at $(date +%T)" >>"$out/status"
}
echo "start $(date +%T)" >"$out/status"
step pretune python3 tools/pretune.py --db "$out/tuning.sqlite" --out "$out"
step bench env MLXP_TUNING_DB="$out/tuning.sqlite" python3 -m benchmarks.runner --suite norms \
  -o "$out/norms.json"
step gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_gpu.py "$@"
echo done >>"$out/status"
