#!/usr/bin/env bash
# The quality study: every budget allocation of prefixkv-llama (same scorer, same protected tokens, same total
# budget) against the full cache on stories260K — continuation perplexity, ROUGE-L and top-1 agreement.
#
#   ./scripts/quality-study.sh              # the published study: writes docs/quality.md and docs/img/quality_*.png
#   ./scripts/quality-study.sh --ci DIR     # reduced (2 + 2 stories, ratios 0 and 0.5): checks the pipeline and that
#                                           # every method at ratio 0 scores exactly as the full cache; report in DIR
#
# Environment: BUILD_DIR (default build; the study binary is built there unless LLAMA_STUDY names one),
# LLAMA_STUDY (path of prefixkv-llama-study), PREFIXKV_MODEL_DIR (default models/stories260K), JOBS (default 2:
# evaluation shards run in parallel). Exit 77 (skipped) when the model or python3 with numpy/matplotlib is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=full
work=${BUILD_DIR:-build}/quality
if [ "${1:-}" = "--ci" ]; then
  mode=ci
  work=${2:?"--ci needs a directory"}
fi
model=${PREFIXKV_MODEL_DIR:-$root/models/stories260K}
jobs=${JOBS:-2}

if [ ! -f "$model/stories260K.bin" ] || [ ! -f "$model/tok512.bin" ]; then
  echo "quality-study.sh: SKIPPED: no model in $model (set PREFIXKV_MODEL_DIR)" >&2
  exit 77
fi
py=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import numpy' 2>/dev/null; then py=$p; break; fi
done
if [ -z "$py" ]; then
  echo "quality-study.sh: SKIPPED: no python3 with numpy" >&2
  exit 77
fi

study=${LLAMA_STUDY:-}
if [ -z "$study" ]; then
  build=${BUILD_DIR:-build}
  if [ ! -f "$build/CMakeCache.txt" ]; then
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  cmake --build "$build" --target prefixkv_llama_study >/dev/null
  study=$build/bin/prefixkv-llama-study
fi

if [ "$mode" = ci ]; then
  counts=(--count 2)
  ratios=0,0.5
else
  counts=(--count 100)
  ratios=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
fi
common=(--model "$model/stories260K.bin" --tokenizer "$model/tok512.bin" --out "$work")
rm -rf "$work"
mkdir -p "$work"
start=$(date +%s)

"$study" stories --set calib "${counts[@]}" "${common[@]}" &
p1=$!
"$study" stories --set eval "${counts[@]}" "${common[@]}" &
p2=$!
wait $p1
wait $p2
"$study" calibrate --ratios "$ratios" --scorers attention,window "${common[@]}"
pids=()
for ((i = 0; i < jobs; ++i)); do
  "$study" evaluate --ratios "$ratios" --scorers attention,window --shard "$i/$jobs" "${common[@]}" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
elapsed=$(($(date +%s) - start))
# CPU seconds of every child process (user + system), from bash's `times`
times > "$work/times.txt"  # in this shell: a command substitution would only see its own children
cpu=$(tail -1 "$work/times.txt" | awk '{ split($1, a, "m"); split($2, b, "m"); printf "%.0f", a[1] * 60 + a[2] + b[1] * 60 + b[2] }')

if [ "$mode" = ci ]; then
  exec "$py" scripts/quality_report.py "$work" --check --out "$work/report" --seconds "$elapsed" --cpu-seconds "$cpu" \
    --no-discussion
fi
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- examples include scripts 2>/dev/null || commit="$commit (with uncommitted changes)"
"$py" scripts/quality_report.py "$work" --check --out docs --commit "$commit" --seconds "$elapsed" --cpu-seconds "$cpu" \
  --command "./scripts/quality-study.sh" --cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
