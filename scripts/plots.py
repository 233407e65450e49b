#!/usr/bin/env python3
"""Draws the pictures of README.md and docs/performance.md from docs/perf/results.json.

    python3 scripts/plots.py            # writes docs/img/{pipeline,stage_time,compact_bandwidth,layer_budgets}.png

Needs python3 with matplotlib (Debian: apt-get install python3-matplotlib). The numbers come from
docs/perf/results.json only, which names the device, date, commit and command of every entry; update that file
after a benchmark run and re-run this script.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "docs", "perf", "results.json")
OUT = os.path.join(ROOT, "docs", "img")
SAVE = {"dpi": 120, "metadata": {"Software": None}}  # no version string: the same inputs give the same bytes

BLUE, ORANGE, GREY = "#2b6cb0", "#dd6b20", "#718096"


def save(fig, name):
    path = os.path.join(OUT, name)
    fig.savefig(path, **SAVE)
    plt.close(fig)
    print("wrote", os.path.relpath(path, ROOT))


def pipeline():
    """score -> curve -> solve -> select -> compact, with what flows between the stages."""
    stages = [
        ("score", "score/", "importance of every\ncached token, per layer"),
        ("curve", "curve/", "rank candidates,\ncumulative mass"),
        ("solve", "solve/", "one global threshold p\nmeets the budget exactly"),
        ("select", "select/", "kept positions,\nascending"),
        ("compact", "compact/", "move the kept K/V rows\n(in place or out of place)"),
    ]
    flows = [
        "score rows\n(float, one per layer\n[, kv-head] and sequence)",
        "curve_set\n(ranked positions,\ncumulative mass)",
        "keep counts k_s\n(+ threshold p,\nstatus)",
        "selection\n(cu_seqlens offsets,\nkept positions)",
    ]
    inputs = [
        "attention probabilities,\nor Q, K (+ LSE), or K",
        "protect_policy\n(sinks, recent)",
        "budget (evict ratio or\nkept tokens), bounds",
        "",
        "the KV cache (strided\nor paged, all layers)",
    ]
    fig, ax = plt.subplots(figsize=(13, 3.6))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 3.6)
    ax.axis("off")
    w, h, y = 1.7, 1.0, 1.35
    xs = [0.3 + i * 2.6 for i in range(len(stages))]
    for x, (name, folder, what), extra in zip(xs, stages, inputs):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc="#ebf4ff", ec=BLUE, lw=1.5))
        ax.text(x + w / 2, y + 0.68, name, ha="center", va="center", fontsize=13, weight="bold", color=BLUE)
        ax.text(x + w / 2, y + 0.3, what, ha="center", va="center", fontsize=7.5)
        ax.text(x + w / 2, y - 0.14, "include/prefixkv/" + folder, ha="center", va="top", fontsize=7, color=GREY,
                family="monospace")
        if extra:
            ax.add_patch(FancyArrowPatch((x + w / 2, 3.25), (x + w / 2, y + h + 0.06), arrowstyle="-|>",
                                         mutation_scale=12, color=GREY))
            ax.text(x + w / 2, 3.3, extra, ha="center", va="bottom", fontsize=7.5, color=GREY)
    for i, label in enumerate(flows):
        x0, x1 = xs[i] + w + 0.05, xs[i + 1] - 0.05
        ax.add_patch(FancyArrowPatch((x0, y + h / 2), (x1, y + h / 2), arrowstyle="-|>", mutation_scale=14,
                                     color=ORANGE, lw=1.5))
        ax.text((x0 + x1) / 2, y - 0.5, label, ha="center", va="top", fontsize=7.5, color=ORANGE)
    ax.add_patch(FancyArrowPatch((xs[-1] + w + 0.05, y + h / 2), (12.95, y + h / 2), arrowstyle="-|>",
                                 mutation_scale=14, color=ORANGE, lw=1.5))
    ax.text(12.2, y - 0.5, "compacted cache\n+ lengths, cu_seqlens,\npages_in_use", ha="center", va="top",
            fontsize=7.5, color=ORANGE)
    fig.tight_layout()
    save(fig, "pipeline.png")


def stage_time(d):
    """Per-stage device time against each stage's baseline, Llama-3-8B-like shapes (log scale)."""
    c = {(r["mode"], r["tokens"], r["kept_pct"], r["check"]): r for r in d["compact"]["rows"]}
    sc = d["score"]["rows"][0]["ms"]
    cu = {r["shape"]: r for r in d["curve"]["rows"]}
    so = {r["shape"]: r for r in d["solve"]["rows"] if r["path"].startswith("default")}
    bars = [  # (label, prefixkv ms, baseline ms, baseline name)
        ("score\n(window, 1 layer,\n128K tokens)", sc["131072"], 0.0995, "read K once"),
        ("curve\n(80 x 128K)", cu["80 x 128K"]["ms"], cu["80 x 128K"]["baseline_ms"], "CUB segmented sort"),
        ("solve\n(32 x 4K)", so["1 x 32 x 4K"]["us"] / 1e3, so["1 x 32 x 4K"]["baseline_us"] / 1e3,
         "bisection (paper)"),
        ("solve\n(80 x 128K)", so["1 x 80 x 128K"]["us"] / 1e3, so["1 x 80 x 128K"]["baseline_us"] / 1e3,
         "bisection (paper)"),
        ("compact gather\n(32 L, 128K, 50 %)", c[("contig -> contig gather", 131072, 50, "device")]["median_ms"],
         c[("contig -> contig gather", 131072, 50, "device")]["memcpy_ms"], "cudaMemcpyAsync"),
        ("compact in place\n(32 L, 128K, 50 %)", c[("contig in place", 131072, 50, "device")]["median_ms"],
         c[("contig in place", 131072, 50, "device")]["memcpy_ms"], "cudaMemcpyAsync"),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, color=BLUE, label="prefixkv")
    ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, color=GREY, label="baseline (same run)")
    for x, b in zip(xs, bars):
        ax.text(x - 0.2, b[1] * 1.12, f"{b[1]:.3g}", ha="center", fontsize=8, color=BLUE)
        ax.text(x + 0.2, b[2] * 1.12, f"{b[2]:.3g}\n{b[3]}", ha="center", fontsize=7, color=GREY)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(0.004, 100)
    ax.set_ylabel("milliseconds (median, cold L2)")
    ax.set_title(f"Time per stage, {d['solve']['device'].split(' (')[0]}, {d['solve']['date']} "
                 "(docs/performance.md)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save(fig, "stage_time.png")


def compact_bandwidth(d):
    """Compaction bandwidth against cudaMemcpyAsync of the same bytes, per mode, 50 % kept."""
    rows = [r for r in d["compact"]["rows"] if r["check"] == "device" and r["kept_pct"] == 50]
    modes = ["contig -> contig gather", "paged (NHD, 16) -> contig gather", "contig in place",
             "paged (NHD, 16) in place"]
    tokens = [4096, 32768, 131072]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.18
    for i, m in enumerate(modes):
        ys = []
        for t in tokens:
            r = next(r for r in rows if r["mode"] == m and r["tokens"] == t)
            ys.append(r["ratio_vs_memcpy"])
        pos = [k + (i - 1.5) * width for k in range(len(tokens))]
        ax.bar(pos, ys, width, label=m)
        for p, v in zip(pos, ys):
            ax.text(p, v + 0.005, f"{v:.2f}", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.text(2.55, 1.003, "cudaMemcpyAsync", fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([f"{t // 1024}K tokens" for t in tokens])
    ax.set_ylim(0.7, 1.05)
    ax.set_ylabel("fraction of memcpy bandwidth")
    ax.set_title("Compaction, Llama-3-8B-like cache (32 layers, K+V, bf16), 50 % kept, device index check\n"
                 f"{d['compact']['device'].split(' (')[0]}, {d['compact']['date']}, commit {d['compact']['commit']}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, "compact_bandwidth.png")


def layer_budgets(d):
    """Tokens each layer keeps under one global threshold (the demo's model)."""
    lb = d["layer_budgets"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    layers = range(len(lb["kept"]))
    ax.bar(layers, lb["kept"], color=BLUE)
    ax.axhline(lb["tokens"] / 2, color=GREY, ls="--", lw=1)
    ax.text(len(lb["kept"]) - 0.5, lb["tokens"] / 2 + 3, "uniform 50 %", ha="right", fontsize=8, color=GREY)
    for x, k in zip(layers, lb["kept"]):
        ax.text(x, k + 2, str(k), ha="center", fontsize=8)
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"tokens kept of {lb['tokens']}")
    ax.set_ylim(0, lb["tokens"] * 0.7)
    ax.set_title("Per-layer budgets, stories260K, evict ratio 0.5 (./scripts/demo.sh)", fontsize=9)
    fig.tight_layout()
    save(fig, "layer_budgets.png")


def main():
    with open(DATA) as f:
        d = json.load(f)
    os.makedirs(OUT, exist_ok=True)
    pipeline()
    stage_time(d)
    compact_bandwidth(d)
    layer_budgets(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
