#!/usr/bin/env bash
# The serving benchmark of docs/serving.md: `prefixkv-llama --serve` on stories260K with one fixed pool of pages,
# evict ratios 0 (full cache), 0.25, 0.5 and 0.75 (method prefixkv, accumulated-attention scorer), the same requests
# every time: peak concurrent requests, tokens per second, pages in use over time.
#
#   ./scripts/serve-bench.sh            # on a machine with a CUDA GPU (--device cuda)
#   DEVICE=cpu ./scripts/serve-bench.sh # the same loop on the host
#
# Writes $OUT/serve_bench.csv (one row per evict ratio: the median of $REPEATS runs, with the device, date and commit
# as comment lines) and $OUT/serve_<ratio>.jsonl (the last run's output: one line per request, then the summary with
# the timeline); then, where python3 has matplotlib, scripts/serve_plot.py draws docs/img/serving.png and prints the
# table of docs/serving.md (`scripts/serve_plot.py CSV --update-doc docs/serving.md` writes it there).
#
# Environment: BUILD_DIR (default build-gpu, configured and built here), OUT (default $BUILD_DIR/serve-bench),
# DEVICE (cuda), REQUESTS (256 stories sampled from the model, prompts of 200-380 tokens), STEPS (64 generated tokens
# per request), POOL_PAGES (1024 pages of 16 tokens, K and V, shared by the 5 layers), MAX_PREFILL (8), REPEATS (3),
# PREFIXKV_MODEL_DIR (default models/stories260K).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build=${BUILD_DIR:-build-gpu}
out=${OUT:-$build/serve-bench}
device=${DEVICE:-cuda}
requests=${REQUESTS:-256}
steps=${STEPS:-64}
pool=${POOL_PAGES:-1024}
max_prefill=${MAX_PREFILL:-8}
repeats=${REPEATS:-3}
model=${PREFIXKV_MODEL_DIR:-$root/models/stories260K}
ratios=(0 0.25 0.5 0.75)

[ -f "$model/stories260K.bin" ] || { echo "serve-bench.sh: no model in $model (set PREFIXKV_MODEL_DIR)" >&2; exit 2; }
if [ ! -f "$build/CMakeCache.txt" ]; then
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_BUILD_BENCHMARKS=OFF >/dev/null
fi
cmake --build "$build" --target prefixkv_llama prefixkv_llama_study -j "$(nproc)" >/dev/null
llama=$build/bin/prefixkv-llama
study=$build/bin/prefixkv-llama-study
mkdir -p "$out"

# The requests: stories sampled from the model (fixed seeds), their prompts only.
if [ ! -f "$out/stories/stories_eval.jsonl" ] || [ "$(wc -l <"$out/stories/stories_eval.jsonl")" -ne "$requests" ]; then
  "$study" stories --set eval --count "$requests" --prompt-min 200 --prompt-max 380 --cont 20 \
    --model "$model/stories260K.bin" --tokenizer "$model/tok512.bin" --out "$out/stories" 2>/dev/null
fi
requests_for() {  # ratio -> a requests file on stdout
  local method=prefixkv
  [ "$1" = 0 ] && method=full
  sed -E 's/^\{"index": [0-9]+, "seed": [0-9]+, "prompt_tokens": [0-9]+, ("prompt": "([^"\\]|\\.)*"), .*$/{\1, '"\"method\": \"$method\", \"evict_ratio\": $1, \"steps\": $steps}/" \
    "$out/stories/stories_eval.jsonl"
}
field() {  # summary line, key -> number
  sed -E 's/.*"'"$2"'": ([-0-9.e+]+).*/\1/' <<<"$1"
}

device_name=$device
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
  device_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
fi
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
csv=$out/serve_bench.csv
{
  echo "# prefixkv-llama --serve on stories260K: $requests requests, $steps steps each, pool $pool pages of 16 tokens, --max-prefill $max_prefill, median of $repeats runs"
  echo "# device: $device_name ($device); date: $(date -u +%Y-%m-%d); commit: $commit; command: scripts/serve-bench.sh"
  echo "evict_ratio,method,requests,completed,pool_pages,peak_active,peak_pages,prompt_tokens,generated_tokens,iterations,seconds,tokens_per_s"
} >"$csv"
for r in "${ratios[@]}"; do
  requests_for "$r" >"$out/requests_$r.jsonl"
  runs=()
  for ((i = 0; i < repeats; ++i)); do
    "$llama" --model "$model/stories260K.bin" --tokenizer "$model/tok512.bin" --serve "$out/requests_$r.jsonl" \
      --pool-pages "$pool" --max-prefill "$max_prefill" --device "$device" >"$out/serve_$r.jsonl"
    s=$(tail -1 "$out/serve_$r.jsonl")
    runs+=("$(field "$s" tokens_per_s) $(field "$s" seconds)")
  done
  # the run with the median tokens/s (the loop's decisions, hence every count, are the same in every run)
  med=$(printf '%s\n' "${runs[@]}" | sort -g | sed -n "$(((repeats + 1) / 2))p")
  method=prefixkv
  [ "$r" = 0 ] && method=full
  echo "$r,$method,$(field "$s" requests),$(field "$s" completed),$(field "$s" pool_pages),$(field "$s" peak_active),$(field "$s" peak_pages),$(field "$s" prompt_tokens),$(field "$s" generated_tokens),$(field "$s" iterations),${med#* },${med%% *}" >>"$csv"
  echo "evict ratio $r: peak $(field "$s" peak_active) concurrent requests, ${med%% *} tokens/s"
done
echo "wrote $csv"
py=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import matplotlib' 2>/dev/null; then py=$p; break; fi
done
if [ -n "$py" ]; then
  "$py" scripts/serve_plot.py "$csv"
else
  echo "no python3 with matplotlib here: run  python3 scripts/serve_plot.py $csv --update-doc docs/serving.md  where there is one"
fi
