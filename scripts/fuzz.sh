#!/usr/bin/env bash
# libFuzzer runs over every host entry point that takes untrusted sizes (fuzz/fuzz_*.cpp): views and segments,
# curves, solver, selection, compaction (strided and paged, gather and in place), .npy/JSON readers, profiles
# and the scorers' host twins.
#   scripts/fuzz.sh [SECONDS=60] [WORKDIR=build-fuzz] [HARNESS...]
# HARNESS names drop the fuzz_ prefix (views curves solve select compact profile score npy_solve); default: all.
# Each harness is built with clang++ -fsanitize=fuzzer,address,undefined (rebuilt when a source or header is
# newer than its binary), then run for SECONDS with its corpus in WORKDIR/<harness>/corpus; one line per harness
# reports its executions. Large allocations count as findings (-malloc_limit_mb=512).
# Exit: 0 = no finding; 77 = skipped (no clang++ or no libFuzzer); 1 = build failure, crash, sanitizer report or
# violated invariant (the reproducer is left in WORKDIR/<harness>/).
set -u
secs=${1:-60}
work=${2:-build-fuzz}
shift $(( $# < 2 ? $# : 2 ))
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cxx=${FUZZ_CXX:-clang++}
all=(views curves solve select compact profile score npy_solve)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")

if ! command -v "$cxx" > /dev/null 2>&1; then
  echo "SKIPPED: $cxx not found"
  exit 77
fi
mkdir -p "$work" || exit 1
work=$(cd "$work" && pwd)
probe="$work/probe.$$"
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$probe.cpp"
if ! "$cxx" -fsanitize=fuzzer "$probe.cpp" -o "$probe" > /dev/null 2>&1; then
  rm -f "$probe.cpp" "$probe"
  echo "SKIPPED: $cxx has no libFuzzer (-fsanitize=fuzzer)"
  exit 77
fi
rm -f "$probe.cpp" "$probe"

status=0
for name in "${names[@]}"; do
  src="$root/fuzz/fuzz_$name.cpp"
  if [ ! -f "$src" ]; then
    echo "fuzz_$name: no such harness ($src)"
    exit 1
  fi
  dir="$work/$name"
  bin="$dir/fuzz_$name"
  mkdir -p "$dir/corpus" || exit 1
  # rebuild when the binary is missing or older than any harness source or library header
  if [ ! -x "$bin" ] || [ -n "$(find "$root/fuzz" "$root/include" "$root/tests/solve/solve_oracle.hpp" -newer "$bin" -type f | head -n 1)" ]; then
    if ! "$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
        -I"$root/include" -I"$root/tests" "$src" -o "$bin.tmp.$$"; then
      echo "fuzz_$name: BUILD FAILED"
      exit 1
    fi
    mv -f "$bin.tmp.$$" "$bin"
  fi
  seeds=()
  case "$name" in npy_solve|profile) seeds=("$root/fuzz/seeds") ;; esac
  log="$dir/last_run.log"
  ( cd "$dir" && ./"fuzz_$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
      -max_len=4096 -print_final_stats=1 -artifact_prefix="$dir/" corpus "${seeds[@]}" ) > "$log" 2>&1
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log"
    echo "fuzz_$name: FINDING (exit $rc) after ${runs:-?} runs; reproducer and log in $dir"
    status=1
  else
    echo "fuzz_$name: ${runs:-?} runs in ${secs}s, no findings"
  fi
done
exit $status
