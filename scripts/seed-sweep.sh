#!/usr/bin/env bash
# Run the randomised tests under many fresh seeds: a test whose expectation holds only for most random inputs
# (a generator that can draw an empty or too-short case) fails here long before it fails CI once in fifty runs.
# Every failing seed is printed with its first error lines; replay one with PREFIXKV_TEST_SEED=<seed> <binary>.
#
#   scripts/seed-sweep.sh [runs-per-binary] [binary...]
#
# Defaults: 200 runs of every host test binary (and of the GPU ones when nvidia-smi finds a device) in
# $BUILD_DIR (default build/), which must already be built (scripts/test.sh). Exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
runs=${1:-200}
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  for b in "$build"/bin/test_*_host "$build"/bin/test_cli; do [ -x "$b" ] && bins+=("$b"); done
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    for b in "$build"/bin/test_*_gpu; do [ -x "$b" ] && bins+=("$b"); done
  fi
fi
[ ${#bins[@]} -gt 0 ] || { echo "seed-sweep: no test binaries under $build/bin (build first)" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
for b in "${bins[@]}"; do
  exe=$(realpath "$b")
  fails=0
  for ((i = 0; i < runs; ++i)); do
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    # test_cli writes its scratch files into the working directory: run every binary from the build directory
    if ! (cd "$build" && PREFIXKV_TEST_SEED=$seed "$exe" >"$log" 2>&1); then
      fails=$((fails + 1))
      echo "FAIL $b PREFIXKV_TEST_SEED=$seed"
      grep -m 4 -E "ERROR|error" "$log" | sed 's/^/    /'
    fi
  done
  echo "$(basename "$b"): $runs seeds, $fails failed"
  failed=$((failed + fails))
done
[ "$failed" -eq 0 ]
