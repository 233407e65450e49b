#!/usr/bin/env bash
# Set up what a fresh Debian 12 machine lacks, configure into build/ (or $BUILD_DIR), build, run every test.
# Exits non-zero on any failure. GPU tests report "Skipped" when the machine has no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- dependencies (Debian packages), installed only when missing -------------------------------------------
missing=()
[ -f /usr/include/doctest/doctest.h ] || missing+=(doctest-dev)
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v g++ >/dev/null || missing+=(g++)
if command -v clang++ >/dev/null && ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  missing+=(libclang-rt-dev)  # libFuzzer for the .npy/solver fuzz test (skipped when absent)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq || true
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "test.sh: please install: ${missing[*]}" >&2
    exit 1
  fi
fi

# ---- configure, build, test ----------------------------------------------------------------------------------
build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
if [ -f "$build/CMakeCache.txt" ]; then gen=(); fi  # keep the generator of an existing build dir
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs" ${CTEST_ARGS:-}
