#!/usr/bin/env bash
# On a CUDA machine where mlx_primitives imports (e.g. PYTHONPATH=$PWD): build this chip's
# pretuned database (the default preset), run the benchmarks against it, then the GPU tests.
# Everything goes into DIR (default ./gpu-results); DIR/status gets a line per finished step.
#   [OPS="op ..."] [SUITES="norms attention"] bash tools/gpu_pipeline.sh [DIR] [pytest args...]
# The GPU tests run in parallel shards (tools/gpu_tests.sh); pytest args select them.
# With OPS, only those ops are tuned, on top of the shipped records of this chip.
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
pretune=(python3 tools/pretune.py --db "$out/tuning.sqlite" --out "$out")
if [[ -n ${OPS:-} ]]; then
  slug=$(python3 -c "from mlx_primitives.hardware import detect_chip; print(detect_chip().slug)")
  if [[ -f tuning_db/$slug.json ]]; then
    step import python3 -m mlx_primitives.tuning.cli import "tuning_db/$slug.json" \
      --db "$out/tuning.sqlite"
  fi
  for name in $OPS; do pretune+=(--op "$name"); done
fi
step pretune "${pretune[@]}"
for suite in ${SUITES:-norms attention}; do
  step "bench_$suite" env MLXP_TUNING_DB="$out/tuning.sqlite" python3 -m benchmarks.runner \
    --suite "$suite" -o "$out/$suite.json"
done
step gpu_tests bash tools/gpu_tests.sh "$out/gpu_tests" "$@"
echo done >>"$out/status"
