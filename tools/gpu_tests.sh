#!/usr/bin/env bash
# On a CUDA machine where mlx_primitives imports (e.g. PYTHONPATH=$PWD): the tests marked
# `gpu`, split into SHARDS runs of pytest at once. NVRTC compiles on the CPU dominate them, so
# 8 shards on 16 cores take minutes where one run takes over twenty.
#   [SHARDS=8] bash tools/gpu_tests.sh [DIR] [pytest args that select tests...]
# DIR (default ./gpu-tests) gets the test ids, one log per shard (each failure's report also in
# shard.NN.failures as it happens), a status line per shard and summary.json (device, MLX
# version, date, commit, counts: tools/test_summary.py; commit it as
# tests/results/gpu-<chip>.json); the exit status is 1 when the collection or any shard failed,
# or no test was collected.
set -uo pipefail
shopt -s nullglob
out=${1:-gpu-tests}
shift || true
shards=${SHARDS:-8}
if ! [[ $shards =~ ^[1-9][0-9]?$ ]]; then
  echo "SHARDS must be 1 to 99, not '$shards'" >&2
  exit 1
fi
mkdir -p "$out"
rm -f "$out"/shard.* "$out/status"
python3 -m pytest -m gpu --collect-only -q -p no:cacheprovider "$@" >"$out/collect.log" 2>&1
collected=$?
grep '::' "$out/collect.log" >"$out/ids"
count=$(wc -l <"$out/ids")
# A module that fails to import is a collection error, not a smaller suite.
if ((collected != 0 || count == 0)); then
  echo "collection failed (pytest exit $collected, $count tests): see $out/collect.log" |
    tee "$out/status"
  exit 1
fi
# Contiguous slices keep one op's tests (and the kernels they compile) in one process.
split -l $(((count + shards - 1) / shards)) -d "$out/ids" "$out/shard."
for ids in "$out"/shard.??; do
  (
    mapfile -t args <"$ids"
    MLXP_FAILURES="$ids.failures" python3 -m pytest -m gpu -q -p no:cacheprovider -rf \
      "${args[@]}" >"$ids.log" 2>&1
    rc=$?
    echo "${ids##*/}: exit $rc $(tail -n 1 "$ids.log")" >>"$out/status"
  ) &
done
wait
cat "$out/status"
python3 "$(dirname "$0")/test_summary.py" "$out" || true
! grep -qv ': exit 0 ' "$out/status"
