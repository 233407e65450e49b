#!/usr/bin/env bash
# Run on a machine with a CUDA GPU: configure with CUDA, build, run the GPU test suite (no skipping allowed),
# then every GPU test binary under compute-sanitizer memcheck and racecheck, and (where python3 has CUDA-enabled
# torch) the PyTorch extension's tests and the transformers check. Prints one summary line per part and exits
# non-zero on any failure. Logs go to $LOG_DIR (default build-gpu/logs).
#   BUILD_DIR=build-gpu  LOG_DIR=...  BENCH=ON|OFF  TOOLS="memcheck racecheck"  SAN_TIMEOUT=900 (s per test case)
#   SAN_JOBS=nproc (sanitizer processes at a time)  ONLY="test_a_gpu test_b_gpu" (these binaries only;
#   "test_a_gpu:1,4" runs only test cases 1 and 4 of that binary under the sanitizers, in the order given)
#   SKIP_BUILD=1 (use BUILD_DIR as it is, e.g. built on another machine at the same path)
#   SAN_ARGS="..." (more compute-sanitizer options for every run, e.g. --kernel-name-exclude kns=cub)
#   SUITE=0 (leave out ctest -L gpu)
#   PYTHON_CHECK=0 (leave out the PyTorch extension's tests and python/examples/hf_check.py)
#   RACECHECK_SOLVE_VARIANTS=0,1,4: solver variants under racecheck (cluster path as chosen, cluster path forced to
#   2 CTAs next to the block path, sample-select); racecheck is slowest on the cluster kernel. Empty = all.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-gpu}
logs=${LOG_DIR:-$build/logs}
tools=${TOOLS:-memcheck racecheck}
mkdir -p "$logs"
status=0

if [ "${SKIP_BUILD:-0}" = 0 ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_BUILD_BENCHMARKS=${BENCH:-ON} >"$logs/configure.log" 2>&1 \
    || { echo "configure failed"; tail -30 "$logs/configure.log"; exit 1; }
  cmake --build "$build" -j "$(nproc)" >"$logs/build.log" 2>&1 || { echo "build failed"; grep -E "error" -A3 "$logs/build.log" | head -60; exit 1; }
fi

# The PyTorch extension on CUDA (tests/python) and the end-to-end check inside transformers, in the background
# while the GPU suite and the sanitizers run; skipped (and said so) where python3 has no CUDA-enabled torch.
# PYTHON_CHECK=0 leaves them out.
pypid=""
if [ "${PYTHON_CHECK:-1}" != 0 ]; then
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    backend=hf
    python3 -c "import transformers" >/dev/null 2>&1 || backend=torch
    (
      python3 tests/python/minirun.py >"$logs/python-tests.log" 2>&1
      echo $? >"$logs/python-tests.rc"
      python3 python/examples/hf_check.py --backend "$backend" --llama-bin "$build/bin/prefixkv-llama" \
        >"$logs/hf-check.log" 2>&1
      echo $? >"$logs/hf-check.rc"
    ) &
    pypid=$!
  else
    echo "python: skipped (python3 has no CUDA-enabled torch)"
  fi
fi

export PREFIXKV_REQUIRE_GPU=1
if [ "${SUITE:-1}" = 0 ]; then
  echo "ctest -L gpu: left out (SUITE=0)"
elif ctest --test-dir "$build" -L gpu --output-on-failure >"$logs/ctest-gpu.log" 2>&1; then
  echo "ctest -L gpu: $(grep -E 'tests passed' "$logs/ctest-gpu.log")"
else
  status=1
  echo "ctest -L gpu: FAILED"; grep -E "tests passed|Failed|\*\*\*" "$logs/ctest-gpu.log" | head -20
fi

command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer: not found"; exit 1; }
# PREFIXKV_TEST_QUICK shrinks the largest test cases (every code path stays covered): sanitizers run 10-100x
# slower than the plain suite; racecheck, the slowest, gets PREFIXKV_TEST_QUICK=2 (random-case loops shrink to a few
# rounds). Every (tool, binary, test case) runs as its own process (doctest --first/--last), SAN_JOBS at a time.
run_one() {  # tool binary case -> writes $logs/$tool-$binary-$case.log and .rc
  local variants="" quick=1
  if [ "$1" = racecheck ]; then variants=${RACECHECK_SOLVE_VARIANTS-0,1,4}; quick=2; fi
  local t0=$SECONDS rc
  PREFIXKV_TEST_QUICK=$quick PREFIXKV_SOLVE_VARIANTS=$variants timeout "${SAN_TIMEOUT:-900}" \
    compute-sanitizer --tool "$1" ${SAN_ARGS:-} --error-exitcode 99 --print-limit 50 \
    "$build/bin/$2" --first="$3" --last="$3" >"$logs/$1-$2-$3.log" 2>&1
  rc=$?
  echo "gpu-check.sh: exit $rc after $((SECONDS - t0)) s" >>"$logs/$1-$2-$3.log"
  echo $rc >"$logs/$1-$2-$3.rc"
}
cases_of() {  # binary -> number of test cases
  "$build/bin/$1" --count </dev/null 2>/dev/null | grep -Eo "filters: [0-9]+" | grep -Eo "[0-9]+" | tail -1
}
rm -f "$logs"/memcheck-*.rc "$logs"/racecheck-*.rc
list="$logs/gpu_tests.list"
if [ -n "${ONLY:-}" ]; then printf '%s\n' $ONLY >"$list"; else cp "$build/gpu_tests.txt" "$list"; fi
jobs_max=${SAN_JOBS:-$(nproc)}
# binary by binary (in the list's order), each with every tool; "binary:1,4" picks test cases
while IFS=: read -r t picked; do
  [ -n "$t" ] || continue
  n=$(cases_of "$t")
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "  $t: could not count its test cases"; status=1; continue; }
  if [ -n "$picked" ]; then cases=${picked//,/ }; else cases=$(seq 1 "$n"); fi
  for tool in $tools; do
    for i in $cases; do
      if ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -lt 1 ] || [ "$i" -gt "$n" ]; then
        echo "  $t: no test case $i (it has $n)"; status=1; continue
      fi
      while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
      run_one "$tool" "$t" "$i" </dev/null &
    done
  done
done <"$list"
wait
for tool in $tools; do
  errors=0; failed=0; n=0; runs=0
  while IFS=: read -r t _; do
    [ -n "$t" ] || continue
    n=$((n + 1))
    for rcf in "$logs/$tool-$t"-*.rc; do
      [ -f "$rcf" ] || continue
      runs=$((runs + 1))
      log="${rcf%.rc}.log"
      rc=$(cat "$rcf")
      # memcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)"
      e=$( { grep -Eo "ERROR SUMMARY: [0-9]+" "$log"; grep -Eo "\([0-9]+ errors" "$log"; } | grep -Eo "[0-9]+" | tail -1)
      [ -n "$e" ] && errors=$((errors + e))
      if [ "$rc" -ne 0 ]; then failed=$((failed + 1)); echo "  $tool $t: exit $rc (see $log)"; tail -5 "$log"; fi
    done
  done <"$list"
  echo "compute-sanitizer $tool: $n binaries, $runs test cases, $errors errors, $failed failed"
  [ $errors -eq 0 ] && [ $failed -eq 0 ] || status=1
done
if [ -n "$pypid" ]; then
  wait "$pypid"
  for part in python-tests hf-check; do
    rc=$(cat "$logs/$part.rc" 2>/dev/null || echo 1)
    echo "$part: $(grep -v '^ ' "$logs/$part.log" | tail -1) (exit $rc, log $logs/$part.log)"
    [ "$rc" -eq 0 ] || status=1
  done
fi
exit $status
