#!/usr/bin/env python3
"""PyTorch baseline for bench_decode: the paper's decode-time eviction, one torch.cat per layer and tensor kind per
generated token (k = cat([k[:, :, :p], k[:, :, p + 1:]], dim=2)), timed with CUDA events (cold L2, median).

Same shape as bench/decode/bench_decode.cu: Llama-3-8B (32 layers, 8 kv heads, head_dim 128, bf16), batch 8,
32K tokens seen, layer l keeping 0.3 + 0.4 l / 31 of them (~16K rows per layer and sequence). Every step evicts
one row per layer at p = n - 25 (the official code's default distance), as the official code does when a layer is
over its budget. (The Hugging Face attention of the paper's code also rebuilds the cache with torch.cat to append
the new token, a second copy per step not counted here.)

Usage: python3 bench/decode/torch_cat.py [--steps 20] [--json out.json]
"""
import argparse
import json

import torch

L, H, D, B, N0 = 32, 8, 128, 8, 32768


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device=dev)
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    kept = [round((0.3 + 0.4 * l / (L - 1)) * N0) for l in range(L)]
    cache = [[torch.empty(B, H, n, D, device=dev, dtype=torch.bfloat16).normal_() for _ in range(2)] for n in kept]
    live = sum(2 * B * H * n * D * 2 for n in kept)

    def step():
        for l in range(L):
            for kind in range(2):
                t = cache[l][kind]
                p = t.shape[2] - 25
                cache[l][kind] = torch.cat([t[:, :, :p], t[:, :, p + 1:]], dim=2)

    step()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(args.steps):
        flush.zero_()
        start.record()
        step()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    ts.sort()
    ms = ts[len(ts) // 2]
    row = {"torch_cat_ms_per_token": ms, "live_GB": live / 1e9, "GB_per_s": 2 * live / 1e9 / (ms / 1e3)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
