#!/bin/sh
# End to end on the CPU (ctest: python_llama_e2e): python/examples/hf_check.py with prefixkv_torch's minimal PyTorch
# forward pass (--backend torch) against prefixkv-llama ($1): 4 prompts, 64 greedy tokens, full cache and prefixkv
# at evict ratios 0.3 and 0.6, token for token. Uses the first Python that imports torch ($PYTHON, /usr/bin/python3,
# python3); exits 77 (ctest: skipped) when there is none.
cd "$(dirname "$0")/../.." || exit 1
for py in ${PYTHON:-} /usr/bin/python3 python3; do
  if "$py" -c "import torch" >/dev/null 2>&1; then
    exec "$py" python/examples/hf_check.py --backend torch --device cpu --llama-bin "$1"
  fi
done
echo "SKIPPED: no Python with torch (apt-get install python3-torch)"
exit 77
