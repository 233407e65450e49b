#!/usr/bin/env bash
# On a machine with two or more GPUs: the sharded compressor over NCCL, one process per GPU.
#   1. configure with CUDA into build-gpu/ (BUILD_DIR), build prefixkv_dist_nccl and the single-GPU sharded tests;
#   2. the single-GPU sharded tests (ctest -R test_dist, no skipping);
#   3. two processes over NCCL: tensor parallel (TP 2) and pipeline parallel (PP 2), then TP 2 x PP 2 when four GPUs
#      are visible — every scorer x granularity x allocation, each rank against the unsharded compressor;
#   4. the benchmark: time per call with NCCL and without communication, for layer and head granularity
#      (BENCH=0 skips it; BATCH, TOKENS size it).
# NCCL_NVLS_ENABLE=0 (NVLink multicast off) in every launch. Logs in $LOG_DIR (default build-gpu/logs/multigpu);
# exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-gpu}
logs=${LOG_DIR:-$build/logs/multigpu}
mkdir -p "$logs"
export NCCL_NVLS_ENABLE=0
status=0

gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${gpus:-0}" -lt 2 ]; then
  echo "multigpu-check: needs 2 or more GPUs (nvidia-smi sees ${gpus:-0})"
  exit 1
fi

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$logs/configure.log" 2>&1 \
  || { echo "configure failed"; tail -30 "$logs/configure.log"; exit 1; }
grep -q "prefixkv: NCCL: ON" "$logs/configure.log" || { echo "NCCL not found (see $logs/configure.log)"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target prefixkv_dist_nccl test_dist_gpu test_dist_nccl_gpu \
  >"$logs/build.log" 2>&1 || { echo "build failed"; grep -E "error" -A3 "$logs/build.log" | head -60; exit 1; }

if PREFIXKV_REQUIRE_GPU=1 ctest --test-dir "$build" -R "^test_dist_(gpu|nccl_gpu)$" --output-on-failure \
  >"$logs/ctest.log" 2>&1; then
  echo "single-GPU sharded tests: $(grep -E 'tests passed' "$logs/ctest.log")"
else
  status=1
  echo "single-GPU sharded tests: FAILED (see $logs/ctest.log)"
  grep -E "tests passed|Failed|\*\*\*" "$logs/ctest.log" | head -20
fi

bin="$build/bin/prefixkv_dist_nccl"
# run NAME RANKS TP [args...]: RANKS processes, one GPU each; prints rank 0's summary lines
run() {
  local name=$1 n=$2 tp=$3
  shift 3
  local id="$logs/$name.id"
  rm -f "$id" "$id.tmp"
  local pids=() rc=0
  for r in $(seq 0 $((n - 1))); do
    timeout "${RUN_TIMEOUT:-900}" "$bin" --rank "$r" --ranks "$n" --tp "$tp" --id-file "$id" "$@" \
      >"$logs/$name.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -E "^(PASS|FAIL|PASSED|FAILED|BENCH)" "$logs/$name.rank0.log" | sed "s/^/  [$name] /" | grep -v "^  \[$name\] PASS " || true
  if [ "$rc" -ne 0 ]; then
    status=1
    echo "  [$name] FAILED (exit codes; logs: $logs/$name.rank*.log)"
    for r in $(seq 0 $((n - 1))); do tail -5 "$logs/$name.rank$r.log" | sed "s/^/    rank $r: /"; done
  fi
}

run tp2 2 2
run pp2 2 1
if [ "$gpus" -ge 4 ]; then run tp2xpp2 4 2; fi
if [ "${BENCH:-1}" != 0 ]; then
  run bench-tp2 2 2 --bench --batch "${BATCH:-4}" --tokens "${TOKENS:-4096}"
  run bench-pp2 2 1 --bench --batch "${BATCH:-4}" --tokens "${TOKENS:-4096}"
fi
[ "$status" -eq 0 ] && echo "multigpu-check: PASSED" || echo "multigpu-check: FAILED"
exit "$status"
