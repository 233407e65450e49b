#!/usr/bin/env python3
"""PyTorch baseline for bench_compact: gather the kept rows of a Llama-3-8B-like cache (32 layers, 8 kv-heads,
head_dim 128, bf16, batch 1) with torch.gather / index_select, timed with CUDA events (cold L2, median).

Same shapes and kept fractions as bench/compact/bench_compact.cu. Each variant moves all layers' K and V in
ONE torch call on a stacked [2L, H, T, D] tensor (the most favourable form for torch), plus the paged
variant (pool [2L, pages, 16, H, D] -> [2L, kept, H, D] by advanced indexing).

Usage: python3 bench/compact/torch_gather.py [--reps 15] [--json out.json]
"""
import argparse
import json

import torch

L, H, D, P = 32, 8, 128, 16


def flush_l2(buf):
    buf.zero_()


def median_ms(fn, reps, flush):
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        flush_l2(flush)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device=dev)
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    rows = []
    for T in (4096, 32768, 131072):
        cache = torch.empty(2 * L, H, T, D, device=dev, dtype=torch.bfloat16).normal_()
        for pct in (25, 50, 75):
            kept = T * pct // 100
            # one kept list per layer (shared by heads), ascending
            idx = torch.stack([torch.randperm(T, device=dev)[:kept].sort().values for _ in range(L)])
            idx2 = idx.repeat_interleave(2, dim=0)  # K and V of a layer share the list
            gidx = idx2[:, None, :, None].expand(2 * L, H, kept, D)
            out = torch.empty(2 * L, H, kept, D, dtype=cache.dtype, device=dev)
            kept_bytes = 2 * L * H * kept * D * 2
            src = torch.empty(kept_bytes, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            t_copy = median_ms(lambda: dst.copy_(src), args.reps, flush)
            del src, dst
            t_gather = median_ms(lambda: torch.gather(cache, 2, gidx, out=out), args.reps, flush)
            # index_select needs one list per call: per layer-kind slice (64 calls), the usual HF-style loop
            def isel():
                for i in range(2 * L):
                    torch.index_select(cache[i], 1, idx2[i], out=out[i])
            t_isel = median_ms(isel, args.reps, flush)
            rows.append(dict(tokens=T, kept_pct=pct, layout="contiguous", op="torch.gather", ms=t_gather,
                             memcpy_ms=t_copy, GBps=2 * kept_bytes / t_gather / 1e6))
            rows.append(dict(tokens=T, kept_pct=pct, layout="contiguous", op="index_select x64", ms=t_isel,
                             memcpy_ms=t_copy, GBps=2 * kept_bytes / t_isel / 1e6))
            del out, gidx
            # paged -> contiguous: pool [2L, pages, P, H, D] (NHD pages), shuffled block table
            pages = (T + P - 1) // P
            pool = cache.view(2 * L, H, pages, P, D).permute(0, 2, 3, 1, 4).contiguous()
            table = torch.randperm(pages, device=dev)
            pid = table[idx2 // P]
            slot = idx2 % P
            lay = torch.arange(2 * L, device=dev)[:, None]
            t_paged = median_ms(lambda: pool[lay, pid, slot], args.reps, flush)
            rows.append(dict(tokens=T, kept_pct=pct, layout="paged16->contiguous", op="advanced indexing", ms=t_paged,
                             memcpy_ms=t_copy, GBps=2 * kept_bytes / t_paged / 1e6))
            del pool
            for r in rows[-3:]:
                print(f"T={r['tokens']:6d} kept={r['kept_pct']}% {r['layout']:20s} {r['op']:18s} "
                      f"median {r['ms']:.3f} ms  {r['GBps']:.0f} GB/s  (memcpy {r['memcpy_ms']:.3f} ms, "
                      f"ratio {r['memcpy_ms'] / r['ms']:.2f})")
        del cache
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
