#!/usr/bin/env bash
# Device run for the compaction stage (build, tests, sanitizers, benches). Usage, from the repo root on the
# GPU machine:  source .device/env.sh && bash bench/compact/device_run.sh [tests|bench|all|perf]
# perf: builds only test_compact_gpu + bench_compact, runs the GPU tests, the C++ bench (BENCH_FILTER, default
# all) and both sanitizers with PREFIXKV_TEST_QUICK=1 (no torch script, no host test).
set -u -o pipefail
what=${1:-all}
R=$PWD
OUT=${OUT:-/tmp/out-compact}
mkdir -p "$OUT"
B=build-gpu-compact
cmake -S "$R" -B $B -G Ninja -DPREFIXKV_BUILD_BENCHMARKS=ON -DPREFIXKV_BUILD_EXAMPLES=OFF \
  -DCMAKE_BUILD_TYPE=Release > /tmp/cmake-compact.txt 2>&1 || { tail -30 /tmp/cmake-compact.txt; exit 1; }
if [ "$what" = perf ]; then tg="test_compact_gpu bench_compact"; else tg="test_compact_gpu test_compact_host bench_compact"; fi
cmake --build $B --target $tg -j16 2>&1 | tail -3 || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$what" != bench ]; then
  [ "$what" = perf ] || $B/bin/test_compact_host 2>&1 | tail -3
  $B/bin/test_compact_gpu > "$OUT/test_gpu.txt" 2>&1
  echo "test_compact_gpu rc=$?" | tee -a "$OUT/test_gpu.txt"; tail -4 "$OUT/test_gpu.txt"
fi
if [ "$what" != tests ]; then
  $B/bin/bench_compact --benchmark_filter="${BENCH_FILTER:-.}" --benchmark_out="$OUT/bench_compact.json" \
    --benchmark_out_format=json 2>&1 | tee "$OUT/bench.txt"
  [ "$what" = perf ] || python3 bench/compact/torch_gather.py 2>&1 | tee "$OUT/torch.txt"
fi
[ "$what" = perf ] && export PREFIXKV_TEST_QUICK=1
if [ "$what" != bench ]; then
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 1 $B/bin/test_compact_gpu 2>&1 | tail -12 > "$OUT/memcheck.txt"
  echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"; tail -4 "$OUT/memcheck.txt"
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool racecheck --error-exitcode 1 $B/bin/test_compact_gpu 2>&1 | tail -12 > "$OUT/racecheck.txt"
  echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"; tail -4 "$OUT/racecheck.txt"
fi
