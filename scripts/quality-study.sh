#!/usr/bin/env bash
# The quality study: every budget allocation of prefixkv-llama (same scorer, same protected tokens, same total
# budget) against the full cache on stories260K — continuation perplexity, ROUGE-L and top-1 agreement.
#
#   ./scripts/quality-study.sh              # the published study: writes docs/quality.md and docs/img/quality_*.png
#   ./scripts/quality-study.sh --longgen    # only its long-generation section (decode-time upkeep: 200 stories,
#                                           # 32-token prompts, 256 new tokens, capped caches; a few minutes)
#   ./scripts/quality-study.sh --ci DIR     # reduced (2 + 2 stories, ratios 0 and 0.5; 2 long generations of 200
#                                           # tokens): checks the pipeline, that every method at ratio 0 and every
#                                           # cap never reached scores exactly as the full cache, and that every
#                                           # decode step kept its budget; report in DIR
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
elif [ "${1:-}" = "--longgen" ]; then
  mode=longgen
  work=${BUILD_DIR:-build}/quality_longgen
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
  long=(--count 2 --cont 200)
  longgen=(--gen 200 --caps 24,400 --policies fixed,score@16,score-ordered@16,amortised:16@16,rebalance:16@16)
else
  counts=(--count 100)
  ratios=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
  long=(--count 200 --cont 256)
  longgen=(--gen 256 --caps 32,64)
fi
common=(--model "$model/stories260K.bin" --tokenizer "$model/tok512.bin" --out "$work")
rm -rf "$work"
mkdir -p "$work"
start=$(date +%s)

# the long generations with decode-time upkeep: short prompts, long continuations, capped caches
run_longgen() {
  "$study" stories --set long --prompt-min 32 --prompt-max 32 "${long[@]}" "${common[@]}"
  local pids=()
  for ((i = 0; i < jobs; ++i)); do
    "$study" longgen "${longgen[@]}" --shard "$i/$jobs" "${common[@]}" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- examples include scripts 2>/dev/null || commit="$commit (with uncommitted changes)"
cpu_name=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')

# CPU seconds of the child processes (user + system) come from bash's `times`, run in this shell (a command
# substitution would only see its own children)
if [ "$mode" = longgen ]; then
  run_longgen
  times > "$work/times.txt"
  cpu=$(tail -1 "$work/times.txt" | awk '{ split($1, a, "m"); split($2, b, "m"); printf "%.0f", a[1] * 60 + a[2] + b[1] * 60 + b[2] }')
  exec "$py" scripts/quality_longgen.py "$work" --check --out docs --commit "$commit" --seconds $(($(date +%s) - start)) \
    --cpu-seconds "$cpu" --command "./scripts/quality-study.sh --longgen" --cpu "$cpu_name"
fi

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
times > "$work/times.txt"
cpu=$(tail -1 "$work/times.txt" | awk '{ split($1, a, "m"); split($2, b, "m"); printf "%.0f", a[1] * 60 + a[2] + b[1] * 60 + b[2] }')
start2=$(date +%s)
run_longgen
elapsed2=$(($(date +%s) - start2))
times > "$work/times.txt"
cpu2=$(tail -1 "$work/times.txt" | awk -v c="$cpu" '{ split($1, a, "m"); split($2, b, "m"); printf "%.0f", a[1] * 60 + a[2] + b[1] * 60 + b[2] - c }')

if [ "$mode" = ci ]; then
  "$py" scripts/quality_report.py "$work" --check --out "$work/report" --seconds "$elapsed" --cpu-seconds "$cpu" \
    --no-discussion
  exec "$py" scripts/quality_longgen.py "$work" --check --out "$work/report" --seconds "$elapsed2" --cpu-seconds "$cpu2" \
    --no-discussion
fi
"$py" scripts/quality_report.py "$work" --check --out docs --commit "$commit" --seconds "$elapsed" --cpu-seconds "$cpu" \
  --command "./scripts/quality-study.sh" --cpu "$cpu_name"
"$py" scripts/quality_longgen.py "$work" --check --out docs --commit "$commit" --seconds "$elapsed2" \
  --cpu-seconds "$cpu2" --command "./scripts/quality-study.sh" --cpu "$cpu_name"
