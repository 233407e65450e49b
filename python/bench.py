#!/usr/bin/env python3
"""Benchmark of prefixkv_torch on CUDA at the LLaVA-1.5-7B shape (32 layers, 32 heads, head_dim 128, fp16), the
prefill's attention probabilities (1, 32, S, S) per layer given:

  step     the extension's whole step, prefixkv_torch.compress_ (accumulated attention -> curves -> exact solve ->
           selection -> in-place compaction of K and V, one status, no host sync) vs a PyTorch implementation of the
           PrefixKV algorithm as its reference code runs it: per-layer scores, sort, normalised cumulative sums, a
           bisection on the global threshold with a host round trip per iteration, then torch.gather of every
           layer's kept K/V rows into new tensors;
  compact  the compaction alone for the same kept indices: prefixkv_torch.gather (out of place) and gather_ (in
           place) vs torch.gather over all layers.

Times are medians of CUDA-event-timed runs (after warm-up), all in one process; ratios are baseline / prefixkv.

    python3 python/bench.py                  # S = 700 and 2048, evict ratio 0.5
    python3 python/bench.py --tokens 700 --evict-ratio 0.3 --reps 50
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefixkv_torch as pkv  # noqa: E402


def timed(fn, reps, warmup=3, setup=None):
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def reference_step(keys, values, probs, evict_ratio, sinks, recent, iters=32):
    """PrefixKV as its reference PyTorch code runs it (host-synchronised bisection on the global threshold)."""
    L = len(keys)
    S = keys[0].shape[2]
    scores = [p[0].float().sum(1).mean(0) for p in probs]  # (S,): summed over queries, averaged over heads
    cand = torch.ones(S, dtype=torch.bool, device=keys[0].device)
    cand[:sinks] = False
    cand[S - recent:] = False
    idx_c = torch.nonzero(cand).flatten()
    prot = torch.nonzero(~cand).flatten()
    sorted_idx, cums = [], []
    for s in scores:
        v, i = torch.sort(s[idx_c], descending=True)
        sorted_idx.append(idx_c[i])
        cums.append(torch.cumsum(v, 0) / v.sum())
    budget = idx_c.numel() * L - round(evict_ratio * S * L)
    lo, hi = 0.0, 1.0
    keep = None
    for _ in range(iters):  # every iteration reads the kept total back to the host
        p = (lo + hi) / 2
        keep = [int(torch.searchsorted(c, torch.tensor([p], device=c.device)).item()) + 1 for c in cums]
        total = sum(min(k, c.numel()) for k, c in zip(keep, cums))
        if total == budget:
            break
        if total > budget:
            hi = p
        else:
            lo = p
    new_k, new_v = [], []
    for l in range(L):
        kept = torch.sort(torch.cat([prot, sorted_idx[l][:keep[l]]])).values
        ix = kept.view(1, 1, -1, 1).expand(1, keys[l].shape[1], -1, keys[l].shape[3])
        new_k.append(torch.gather(keys[l], 2, ix))
        new_v.append(torch.gather(values[l], 2, ix))
    return new_k, new_v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, action="append", help="S (default: 700 and 2048)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--evict-ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py: needs a CUDA device")
    pkv.load()
    dev = torch.device("cuda")
    print("device: %s; torch %s; L=%d H=%d D=%d fp16, evict ratio %.2f, sinks 4, recent 1; median of %d runs (ms)"
          % (torch.cuda.get_device_name(), torch.__version__, a.layers, a.heads, a.head_dim, a.evict_ratio, a.reps))
    print("%6s  %-34s %9s %9s %7s" % ("S", "what", "prefixkv", "baseline", "ratio"))
    for S in a.tokens or [700, 2048]:
        L, H, D = a.layers, a.heads, a.head_dim
        keys0 = [torch.randn(1, H, S, D, device=dev, dtype=torch.float16) for _ in range(L)]
        values0 = [torch.randn(1, H, S, D, device=dev, dtype=torch.float16) for _ in range(L)]
        causal = torch.full((S, S), float("-inf"), device=dev).triu(1)
        probs = [torch.softmax(torch.randn(1, H, S, S, device=dev) + causal, -1).half() for _ in range(L)]
        keys = [t.clone() for t in keys0]
        values = [t.clone() for t in values0]
        lengths = torch.full((1,), S, dtype=torch.int32, device=dev)

        def restore():
            for t, t0 in zip(keys + values, keys0 + values0):
                t.copy_(t0)

        def ours():
            pkv.compress_(keys, values, attention=probs, evict_ratio=a.evict_ratio, lengths=lengths)

        t_ours = timed(ours, a.reps, setup=restore)
        t_ref = timed(lambda: reference_step(keys0, values0, probs, a.evict_ratio, 4, 1), a.reps)
        print("%6d  %-34s %9.3f %9.3f %6.2fx" % (S, "whole step vs reference PrefixKV", t_ours, t_ref, t_ref / t_ours))
        # the compaction alone: kept indices of one compress_ call, as a selection
        restore()
        n = pkv.compress_([t.clone() for t in keys0], [t.clone() for t in values0], attention=probs,
                          evict_ratio=a.evict_ratio, lengths=lengths)
        scores = torch.stack([p[0].float().sum(1).mean(0) for p in probs])  # (L, S)
        c = pkv.curves(scores, sinks=4, recent=1)
        sel = pkv.select(c, n.reshape(-1).long())
        kept = [sel.indices[int(sel.offsets[l]):int(sel.offsets[l + 1])].long() for l in range(L)]
        ix = [k.view(1, 1, -1, 1).expand(1, H, -1, D) for k in kept]
        outk = [torch.empty_like(t) for t in keys0]
        outv = [torch.empty_like(t) for t in values0]

        def torch_gather():
            return [torch.gather(keys0[l], 2, ix[l]) for l in range(L)] + \
                [torch.gather(values0[l], 2, ix[l]) for l in range(L)]

        t_tg = timed(torch_gather, a.reps)
        t_go = timed(lambda: pkv.gather(keys0, values0, sel, outk, outv), a.reps)
        t_gi = timed(lambda: pkv.gather_(keys, values, sel), a.reps, setup=restore)
        print("%6d  %-34s %9.3f %9.3f %6.2fx" % (S, "gather (out of place) vs torch.gather", t_go, t_tg, t_tg / t_go))
        print("%6d  %-34s %9.3f %9.3f %6.2fx" % (S, "gather_ (in place) vs torch.gather", t_gi, t_tg, t_tg / t_gi))
        del probs, keys0, values0, keys, values
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
