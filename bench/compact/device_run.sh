#!/usr/bin/env bash
# Device run for the compaction stage (build, tests, sanitizers, benches). Usage, from the repo root on the
# GPU machine:  source .device/env.sh && bash bench/compact/device_run.sh [tests|bench|all|perf|explore]
# perf:    builds only test_compact_gpu + bench_compact, runs the GPU tests, the C++ bench (BENCH_FILTER, default
#          all) and both sanitizers with PREFIXKV_TEST_QUICK=1 (no torch script, no host test).
# explore: GPU tests, then bench_compact with PREFIXKV_BENCH_EXPLORE=1 (every move-kernel variant and the plain
#          copy-kernel diagnostic, one process); no sanitizers.
set -u -o pipefail
what=${1:-all}
R=$PWD
OUT=${OUT:-/tmp/out-compact}
mkdir -p "$OUT"
B=build-gpu-compact
cmake -S "$R" -B $B -G Ninja -DPREFIXKV_BUILD_BENCHMARKS=ON -DPREFIXKV_BUILD_EXAMPLES=OFF \
  -DCMAKE_BUILD_TYPE=Release > /tmp/cmake-compact.txt 2>&1 || { tail -30 /tmp/cmake-compact.txt; exit 1; }
case "$what" in perf|explore) tg="test_compact_gpu bench_compact" ;; *) tg="test_compact_gpu test_compact_host bench_compact" ;; esac
cmake --build $B --target $tg -j16 2>&1 | tail -3 || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$what" != bench ]; then
  case "$what" in perf|explore) ;; *) $B/bin/test_compact_host 2>&1 | tail -3 ;; esac
  $B/bin/test_compact_gpu > "$OUT/test_gpu.txt" 2>&1
  echo "test_compact_gpu rc=$?" | tee -a "$OUT/test_gpu.txt"; tail -4 "$OUT/test_gpu.txt"
fi
[ "$what" = explore ] && export PREFIXKV_BENCH_EXPLORE=1
if [ "$what" != tests ]; then
  $B/bin/bench_compact --benchmark_filter="${BENCH_FILTER:-.}" --benchmark_out="$OUT/bench_compact.json" \
    --benchmark_out_format=json > "$OUT/bench.txt" 2>&1
  echo "bench_compact rc=$?"
  case "$what" in perf|explore) ;; *) timeout ${TORCH_TIMEOUT:-150} python3 bench/compact/torch_gather.py > "$OUT/torch.txt" 2>&1; echo "torch rc=$?" ;; esac
fi
[ "$what" = explore ] && exit 0
export PREFIXKV_TEST_QUICK=1  # sanitizers: quick test sizes
if [ "$what" != bench ]; then
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 1 $B/bin/test_compact_gpu 2>&1 | tail -12 > "$OUT/memcheck.txt"
  echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"; tail -4 "$OUT/memcheck.txt"
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 $B/bin/test_compact_gpu 2>&1 | tail -12 > "$OUT/racecheck.txt"
  echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"; tail -4 "$OUT/racecheck.txt"
fi
