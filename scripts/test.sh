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
# the PyTorch extension's tests (tests/python) use Debian's CPU PyTorch; PYTHON_TESTS=0 leaves them out
if [ "${PYTHON_TESTS:-1}" != 0 ]; then
  /usr/bin/python3 -c "import torch" >/dev/null 2>&1 || missing+=(python3-torch)
  /usr/bin/python3 -c "import pytest" >/dev/null 2>&1 || missing+=(python3-pytest)
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

# ---- host code again under AddressSanitizer + UndefinedBehaviorSanitizer ---------------------------------------
# The host twins, the .npy/JSON readers, the CLI and the demo's host backend are what CPU runtimes call: build
# them a second time with the sanitizers (CUDA off, so only the C++ compiler runs) and run the host tests.
# HOST_SANITIZERS=0 skips this stage.
if [ "${HOST_SANITIZERS:-1}" != 0 ]; then
  san_build=${build}-asan
  san_flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  san_gen=()
  command -v ninja >/dev/null && [ ! -f "$san_build/CMakeCache.txt" ] && san_gen=(-G Ninja)
  cmake -S . -B "$san_build" "${san_gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPREFIXKV_ENABLE_CUDA=OFF \
    -DPREFIXKV_BUILD_BENCHMARKS=OFF "-DCMAKE_CXX_FLAGS=$san_flags" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined
  cmake --build "$san_build" -j "$jobs"
  # consumer builds use their own flags, the fuzz target its own sanitizers and the Python extension links against
  # an uninstrumented PyTorch: all ran above
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$san_build" --output-on-failure -j "$jobs" -L host -LE "consumer|fuzz|python"
fi
