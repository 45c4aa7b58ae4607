#!/usr/bin/env bash
# On a CUDA machine where mlx_primitives imports (e.g. PYTHONPATH=$PWD): the tests marked
# `gpu`, split into SHARDS runs of pytest at once. NVRTC compiles on the CPU dominate them, so
# 8 shards on 16 cores take minutes where one run takes about half an hour.
#   [SHARDS=8] bash tools/gpu_tests.sh [DIR] [pytest args that select tests...]
# DIR (default ./gpu-tests) gets the test ids, one log per shard and a status line per shard;
# the exit status is 1 when any shard failed or no test was collected.
set -uo pipefail
out=${1:-gpu-tests}
shift || true
mkdir -p "$out"
rm -f "$out"/shard.* "$out/status"
python3 -m pytest -m gpu --collect-only -q -p no:cacheprovider "$@" | grep '::' >"$out/ids"
count=$(wc -l <"$out/ids")
if ((count == 0)); then
  echo "no gpu tests collected" | tee "$out/status"
  exit 1
fi
shards=${SHARDS:-8}
# Contiguous slices keep one op's tests (and the kernels they compile) in one process.
split -l $(((count + shards - 1) / shards)) -d "$out/ids" "$out/shard."
for ids in "$out"/shard.??; do
  (
    mapfile -t args <"$ids"
    python3 -m pytest -m gpu -q -p no:cacheprovider -rf "${args[@]}" >"$ids.log" 2>&1
    echo "$(basename "$ids"): exit $? $(tail -n 1 "$ids.log")" >>"$out/status"
  ) &
done
wait
cat "$out/status"
! grep -qv ': exit 0 ' "$out/status"
