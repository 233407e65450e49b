#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs from a CUDA build made on a machine without a GPU, so that a GPU machine can
# run the suite and the sanitizers without building: the GPU test binaries (those ctest runs outside the sanitizer
# list too), prefixkv-llama (hf_check.py), the benchmarks, gpu_tests.txt and ctest's files. Unpack it into the same
# BUILD_DIR path on the GPU machine, then run
#   SKIP_BUILD=1 BUILD_DIR=<that path> ./scripts/gpu-check.sh
# Usage: scripts/pack-gpu-build.sh [BUILD_DIR (default build-gpu)] [OUT (default BUILD_DIR/gpu-build.tar.xz)]
set -euo pipefail
build=${1:-build-gpu}
out=${2:-$build/gpu-build.tar.xz}
[ -f "$build/gpu_tests.txt" ] ||
  { echo "pack-gpu-build: $build has no gpu_tests.txt (configure with CUDA first)" >&2; exit 2; }
files=(gpu_tests.txt)
while read -r t; do
  [ -n "$t" ] || continue
  [ -x "$build/bin/$t" ] || { echo "pack-gpu-build: $build/bin/$t is missing (build it first)" >&2; exit 2; }
  files+=("bin/$t")
done <"$build/gpu_tests.txt"
# GPU tests that ctest runs but the sanitizers leave out (test_dist_nccl_gpu)
for f in "$build"/bin/test_*_gpu; do
  if [ -x "$f" ] && ! grep -qx "${f##*/}" "$build/gpu_tests.txt"; then files+=("bin/${f##*/}"); fi
done
for f in "$build"/bin/prefixkv-llama "$build"/bin/bench_*; do if [ -x "$f" ]; then files+=("bin/${f##*/}"); fi; done
while IFS= read -r f; do files+=("${f#"$build"/}"); done < <(find "$build" -name CTestTestfile.cmake)
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
(cd "$build" && tar cf - "${files[@]}") | xz -6 -T0 >"$out_abs"
echo "$out: ${#files[@]} files, $(du -h "$out_abs" | cut -f1)"
