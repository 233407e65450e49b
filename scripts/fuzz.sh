#!/usr/bin/env bash
# Bounded libFuzzer run over the .npy/JSON readers and the host solver (fuzz/fuzz_npy_solve.cpp).
#   scripts/fuzz.sh [SECONDS=60] [WORKDIR=build-fuzz]
# Exit: 0 = ran SECONDS without a finding; 77 = skipped (no clang++ or no libFuzzer); other = build failure or
# a crash / sanitizer report / invariant violation (the reproducer is left in WORKDIR).
set -u
secs=${1:-60}
work=${2:-build-fuzz}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cxx=${FUZZ_CXX:-clang++}
if ! command -v "$cxx" > /dev/null 2>&1; then
  echo "SKIPPED: $cxx not found"
  exit 77
fi
mkdir -p "$work/corpus" || exit 1
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$work/probe.cpp"
if ! "$cxx" -fsanitize=fuzzer "$work/probe.cpp" -o "$work/probe" > /dev/null 2>&1; then
  echo "SKIPPED: $cxx has no libFuzzer (-fsanitize=fuzzer)"
  exit 77
fi
"$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root/include" -I"$root/tests" "$root/fuzz/fuzz_npy_solve.cpp" -o "$work/fuzz_npy_solve" || exit 1
cd "$work" || exit 1
./fuzz_npy_solve -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=2048 -print_final_stats=1 \
  corpus "$root/fuzz/seeds" 2>&1 | tail -n 25
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "FUZZ FAILURE (exit $rc): reproducer in $(pwd)"
  exit 1
fi
echo "fuzz: no findings in ${secs}s"
exit 0
