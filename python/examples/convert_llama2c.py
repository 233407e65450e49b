#!/usr/bin/env python3
"""Convert a llama2.c checkpoint to a Hugging Face LlamaForCausalLM directory (config + safetensors weights).

llama2.c applies RoPE to pairs of adjacent dimensions of every head, Hugging Face's Llama to dimension pairs (j,
j + head_size / 2): the rows of wq and wk are permuted within each head (row 2j -> j, row 2j + 1 -> j + head_size/2),
which leaves every q . k unchanged. The result loads with LlamaForCausalLM.from_pretrained(out_dir).

    python3 python/examples/convert_llama2c.py --checkpoint models/stories260K/stories260K.bin --out /tmp/stories260K-hf
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from prefixkv_torch import llama2c  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="llama2.c .bin")
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args()
    cfg, w = llama2c.read_checkpoint(a.checkpoint)
    model = llama2c.hf_model(cfg, w)
    model.save_pretrained(a.out)
    print("converted %s (%r) to %s" % (a.checkpoint, cfg, a.out))


if __name__ == "__main__":
    main()
