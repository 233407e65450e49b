#!/usr/bin/env bash
# Compress the KV cache of a real pretrained model with PrefixKV and print what happened: per-layer budgets,
# bytes before/after, time per stage, and how generation from the compressed cache compares.
# Uses the GPU when one is present (and prefixkv was built with CUDA), the host backend otherwise.
#   ./scripts/demo.sh [--evict-ratio R] [--prompt-tokens N] [--continue N]
# The model (stories260K, bundled in models/stories260K) is read from $PREFIXKV_MODEL_DIR if set.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
model=${PREFIXKV_MODEL_DIR:-models/stories260K}
if [ ! -f "$model/stories260K.bin" ]; then
  echo "demo.sh: model not found in $model (set PREFIXKV_MODEL_DIR)" >&2
  exit 2
fi
if [ ! -f "$build/CMakeCache.txt" ]; then
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
demo=prefixkv_demo
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
   && cmake --build "$build" --target prefixkv_demo_gpu >/dev/null 2>&1; then
  demo=prefixkv_demo_gpu
  echo "demo.sh: GPU found: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); running host and GPU pipelines"
else
  echo "demo.sh: no usable GPU; running the host backend"
  cmake --build "$build" --target prefixkv_demo >/dev/null
fi
exec "$build/bin/$demo" --model "$model" "$@"
