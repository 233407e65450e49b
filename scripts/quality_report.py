#!/usr/bin/env python3
"""Aggregate the quality study (prefixkv-llama-study's eval_*.jsonl) into tables, plots and docs/quality.md.

    quality_report.py WORKDIR --out DIR [--check] [--commit C] [--command CMD] [--seconds S] [--cpu NAME]

Per point (scorer, method, evict ratio): the mean over evaluation stories of continuation perplexity, ROUGE-L F1
and top-1 agreement, with a 95% percentile bootstrap interval (resampling stories, 2000 resamples, fixed seed);
paired bootstrap intervals of prefixkv's difference to every other allocation. --check fails (exit 1) unless every
method at ratio 0 scores exactly as the full cache and every method kept the budget the compressor promises.
"""
import argparse
import datetime
import glob
import json
import math
import os
import sys

import numpy as np

METHODS = ["streaming", "uniform", "pyramid", "adakv", "prefixkv", "prefixkv-head", "profile"]
SCORERS = ["attention", "window"]
METRICS = [("ppl", "continuation perplexity", "lower is better", -1),
           ("rouge_l", "ROUGE-L F1 vs full-cache generation", "higher is better", +1),
           ("top1", "top-1 agreement with the full cache", "higher is better", +1)]
COLORS = {"streaming": "#999999", "uniform": "#1f77b4", "pyramid": "#9467bd", "adakv": "#2ca02c",
          "prefixkv": "#d62728", "prefixkv-head": "#ff7f0e", "profile": "#8c564b"}
BOOT = 2000


def load(work):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "eval_*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"quality_report.py: no eval_*.jsonl in {work}")
    return rows


def scorer_of(row, scorer):
    """Rows of one scorer's panel: streaming (scorer 'recency') belongs to every panel."""
    return row["scorer"] == scorer or row["scorer"] == "recency"


class Study:
    def __init__(self, rows):
        self.rows = rows
        self.stories = sorted({r["story"] for r in rows})
        self.sidx = {s: i for i, s in enumerate(self.stories)}
        self.ratios = sorted({r["ratio"] for r in rows if r["method"] != "full"})
        self.full = {r["story"]: r for r in rows if r["method"] == "full"}
        self.methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        # values[(scorer, method, ratio, metric)] = array over stories (NaN where missing)
        self.values = {}
        for r in rows:
            if r["method"] == "full":
                continue
            for sc in SCORERS:
                if not scorer_of(r, sc):
                    continue
                for metric, *_ in METRICS:
                    key = (sc, r["method"], r["ratio"], metric)
                    if key not in self.values:
                        self.values[key] = np.full(len(self.stories), np.nan)
                    self.values[key][self.sidx[r["story"]]] = r[metric]
        self.full_ppl = np.array([self.full[s]["ppl"] for s in self.stories])
        rng = np.random.default_rng(20241204)
        self.boot = rng.integers(0, len(self.stories), size=(BOOT, len(self.stories)))

    def get(self, sc, m, r, metric):
        return self.values.get((sc, m, r, metric))

    def ci(self, x):
        means = x[self.boot].mean(axis=1)
        return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

    def rows_of(self, method, ratio, scorer):
        return [r for r in self.rows if r["method"] == method and r["ratio"] == ratio and scorer_of(r, scorer)]


# ---- checks ----------------------------------------------------------------------------------------------------
def load_profiles(work):
    """{(scorer, ratio): fractions} from WORK/profiles/SCORER_RATIO.json."""
    out = {}
    for path in glob.glob(os.path.join(work, "profiles", "*.json")):
        name = os.path.basename(path)[:-5]
        sc, r = name.rsplit("_", 1)
        with open(path) as f:
            out[(sc, float(r))] = json.load(f)
    return out


def check(st, work, sinks=4, recent=1):
    bad = []
    profiles = load_profiles(work)
    n_cfg = {}
    for r in st.rows:
        k = (r["scorer"], r["method"], r["ratio"])
        n_cfg[k] = n_cfg.get(k, 0) + 1
        T = r["prompt_tokens"]
        L = len(r["keep"])
        if r["method"] != "full" and r["ratio"] == 0.0:
            f = st.full[r["story"]]
            for key in ("ppl", "nll_mean"):
                if r[key] != f[key]:
                    bad.append(f"story {r['story']} {r['method']}/{r['scorer']} ratio 0: {key} {r[key]} != full {f[key]}")
            if r["top1"] != 1 or r["rouge_l"] != 1:
                bad.append(f"story {r['story']} {r['method']}/{r['scorer']} ratio 0: top1/rouge not 1")
        # budgets: rint(r * N) candidates evicted (N summed over the segments); profile: per layer
        if r["method"] == "full":
            continue
        if r["method"] == "profile":  # rint(f_l * T) candidates of layer l, clipped to its candidates
            f = profiles.get((r["scorer"], r["ratio"]))
            if f is None:
                bad.append(f"no profile for {r['scorer']} {r['ratio']}")
                continue
            prot = min(sinks, T) + min(recent, T)
            cand = T - min(prot, T)
            want = [T - min(cand, max(0, round(x * T))) for x in f]
            if r["keep"] != want:
                bad.append(f"story {r['story']} profile/{r['scorer']} ratio {r['ratio']}: kept {r['keep']}, want {want}")
            continue
        if "keep_heads" in r:
            H = len(r["keep_heads"][0])
            kept, N = sum(sum(h) for h in r["keep_heads"]), L * H * T
        else:
            kept, N = sum(r["keep"]), L * T
        want = N - round(r["ratio"] * N)  # Python's round is half to even, as rint
        if kept != want:
            bad.append(f"story {r['story']} {r['method']}/{r['scorer']} ratio {r['ratio']}: kept {kept}, want {want}")
    counts = set(n_cfg.values())
    if len(counts) != 1 or counts.pop() != len(st.stories):
        bad.append(f"unequal row counts per configuration: {sorted(set(n_cfg.values()))}")
    for b in bad[:20]:
        print("CHECK FAILED:", b, file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"quality_report.py: checks passed ({len(st.rows)} rows, {len(st.stories)} stories, "
          f"{len(n_cfg)} configurations; every method at ratio 0 equals the full cache)")


# ---- tables ----------------------------------------------------------------------------------------------------
def fmt(m, lo, hi, metric):
    if metric == "ppl":
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def metric_table(st, sc, metric):
    ratios = [r for r in st.ratios if r > 0]
    head = "| method | " + " | ".join(f"{r:.1f}" for r in ratios) + " |"
    sep = "|---|" + "---|" * len(ratios)
    lines = [head, sep]
    for m in st.methods:
        cells = []
        for r in ratios:
            x = st.get(sc, m, r, metric)
            if x is None:
                cells.append("—")
                continue
            mean, lo, hi = st.ci(x)
            cells.append(fmt(mean, lo, hi, metric))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(st, sc, other, r, metric, sign):
    """prefixkv minus other, oriented so that > 0 means prefixkv is better; (mean, lo, hi)."""
    a, b = st.get(sc, "prefixkv", r, metric), st.get(sc, other, r, metric)
    if a is None or b is None:
        return None
    d = (a - b) * sign
    return st.ci(d)


def verdict(ci):
    mean, lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "tie"


def paired_table(st, sc, metric, sign):
    ratios = [r for r in st.ratios if r > 0]
    lines = ["| prefixkv vs | " + " | ".join(f"{r:.1f}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for m in st.methods:
        if m == "prefixkv":
            continue
        cells = []
        for r in ratios:
            ci = paired(st, sc, m, r, metric, sign)
            if ci is None:
                cells.append("—")
                continue
            v = verdict(ci)
            mark = {"better": "**+**", "worse": "**−**", "tie": "="}[v]
            cells.append(f"{mark} {ci[0]:+.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_wins(st):
    """{(scorer, other): {metric: [verdict per ratio]}}"""
    out = {}
    for sc in SCORERS:
        for m in st.methods:
            if m == "prefixkv":
                continue
            for metric, _, _, sign in METRICS:
                out.setdefault((sc, m), {})[metric] = [
                    (r, verdict(ci)) for r in st.ratios if r > 0
                    for ci in [paired(st, sc, m, r, metric, sign)] if ci is not None]
    return out


def ratio_ranges(rs, all_ratios):
    """'0.1-0.3, 0.6' for runs of consecutive study ratios; '—' for none."""
    if not rs:
        return "—"
    order = [r for r in all_ratios if r > 0]
    runs, cur = [], [rs[0]]
    for r in rs[1:]:
        if order.index(r) == order.index(cur[-1]) + 1:
            cur.append(r)
        else:
            runs.append(cur)
            cur = [r]
    runs.append(cur)
    return ", ".join(f"{c[0]:.1f}" if len(c) == 1 else f"{c[0]:.1f}–{c[-1]:.1f}" for c in runs)


def verdict_table(st, sc):
    wins = summarize_wins(st)
    lines = ["| prefixkv vs | " + " | ".join(f"{label}: better / worse" for _, label, _, _ in
                                           [("ppl", "PPL", 0, 0), ("rouge_l", "ROUGE-L", 0, 0), ("top1", "top-1", 0, 0)]) + " |",
             "|---|---|---|---|"]
    for m in st.methods:
        if m == "prefixkv":
            continue
        per = wins[(sc, m)]
        cells = []
        for metric, *_ in METRICS:
            v = per[metric]
            better = ratio_ranges([r for r, x in v if x == "better"], st.ratios)
            worse = ratio_ranges([r for r, x in v if x == "worse"], st.ratios)
            cells.append(f"{better} / {worse}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(st, ratio):
    head = "| method | " + " | ".join(f"{sc}: PPL +% | {sc}: ROUGE-L | {sc}: top-1" for sc in SCORERS) + " |"
    lines = [head, "|---|" + "---|" * (3 * len(SCORERS))]
    for m in st.methods:
        cells = []
        for sc in SCORERS:
            x = st.get(sc, m, ratio, "ppl")
            if x is None:
                cells += ["—"] * 3
                continue
            inc = 100.0 * (x / st.full_ppl - 1.0)
            cells += [f"{inc.mean():.2f}", f"{st.get(sc, m, ratio, 'rouge_l').mean():.3f}",
                      f"{st.get(sc, m, ratio, 'top1').mean():.3f}"]
        name = f"**{m}**" if m == "prefixkv" else m
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(st, sc, ratio):
    lines = ["| method | kept % (all layers) | " + " | ".join(f"layer {l}" for l in range(n_layers(st))) + " |",
             "|---|---|" + "---|" * n_layers(st)]
    for m in st.methods:
        rows = st.rows_of(m, ratio, sc)
        if not rows:
            continue
        frac = np.array([[k / r["prompt_tokens"] for k in r["keep"]] for r in rows])
        lines.append(f"| {m} | {100 * frac.mean():.1f} | " +
                     " | ".join(f"{100 * x:.1f}" for x in frac.mean(axis=0)) + " |")
    return "\n".join(lines)


def recent_table(st):
    show = [r for r in (0.3, 0.5, 0.7, 0.9) if r in st.ratios]
    lines = ["| method | " + " | ".join(f"{sc} {r:.1f}" for sc in SCORERS for r in show) + " |",
             "|---|" + "---|" * (len(show) * len(SCORERS))]
    for m in st.methods:
        cells = []
        for sc in SCORERS:
            for r in show:
                rows = st.rows_of(m, r, sc)
                cells.append(f"{np.mean([q['recent_kept'] for q in rows]):.2f}" if rows and "recent_kept" in rows[0]
                             else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def n_layers(st):
    return len(st.rows[0]["keep"])


# ---- plots -----------------------------------------------------------------------------------------------------
def plots(st, img):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(img, exist_ok=True)
    ratios = [r for r in st.ratios if r > 0]
    files = []
    for metric, label, better, _ in METRICS:
        fig, axes = plt.subplots(1, len(SCORERS), figsize=(11, 4.2), sharey=True)
        for ax, sc in zip(axes, SCORERS):
            for m in st.methods:
                pts = []
                for r in ratios:
                    x = st.get(sc, m, r, metric)
                    if x is None:
                        continue
                    if metric == "ppl":  # paired with the full cache: the increase in percent
                        x = 100.0 * (x / st.full_ppl - 1.0)
                    pts.append((r, *st.ci(x)))
                if not pts:
                    continue
                x, y, lo, hi = map(np.array, zip(*pts))
                lw = 2.2 if m.startswith("prefixkv") else 1.3
                ax.plot(x, y, "o-", color=COLORS[m], label=m, lw=lw, ms=3.5)
                ax.fill_between(x, lo, hi, color=COLORS[m], alpha=0.15, lw=0)
            if metric == "ppl":
                ax.axhline(0.0, color="k", ls="--", lw=1, label="full cache")
            ax.set_title(f"scorer: {sc}")
            ax.set_xlabel("evict ratio")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("PPL increase over the full cache, % (lower is better)" if metric == "ppl"
                           else f"{label} ({better})")
        axes[-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"stories260K, {len(st.stories)} evaluation stories: mean and 95% bootstrap interval")
        fig.tight_layout()
        name = f"quality_{metric}.png"
        fig.savefig(os.path.join(img, name), dpi=110)
        plt.close(fig)
        files.append(name)
    # prefixkv minus each other allocation, PPL (relative) and ROUGE-L
    fig, axes = plt.subplots(2, len(SCORERS), figsize=(11, 7), sharex=True)
    for col, sc in enumerate(SCORERS):
        for row, (metric, label, _, sign) in enumerate([METRICS[0], METRICS[1]]):
            ax = axes[row][col]
            for m in st.methods:
                if m == "prefixkv":
                    continue
                pts = []
                for r in ratios:
                    a, b = st.get(sc, "prefixkv", r, metric), st.get(sc, m, r, metric)
                    if a is None or b is None:
                        continue
                    d = (np.log(a) - np.log(b)) * sign if metric == "ppl" else (a - b) * sign
                    pts.append((r, *st.ci(d)))
                if not pts:
                    continue
                x, y, lo, hi = map(np.array, zip(*pts))
                ax.plot(x, y, "o-", color=COLORS[m], label=f"vs {m}", ms=3.5)
                ax.fill_between(x, lo, hi, color=COLORS[m], alpha=0.15, lw=0)
            ax.axhline(0, color="k", lw=1)
            ax.grid(alpha=0.3)
            ax.set_title(f"scorer: {sc}")
            ax.set_ylabel("log PPL(other) − log PPL(prefixkv)" if metric == "ppl" else "ROUGE-L(prefixkv) − ROUGE-L(other)")
            if row == 1:
                ax.set_xlabel("evict ratio")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("prefixkv's advantage (> 0: prefixkv better), paired over stories, 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(os.path.join(img, "quality_vs_prefixkv.png"), dpi=110)
    plt.close(fig)
    files.append("quality_vs_prefixkv.png")
    # per-layer budgets
    show = [r for r in (0.3, 0.5, 0.7, 0.9) if r in st.ratios] or ratios[:1]
    L = n_layers(st)
    fig, axes = plt.subplots(len(SCORERS), len(show), figsize=(3.2 * len(show) + 1, 6.5), sharey=True, squeeze=False)
    layer_methods = [m for m in st.methods if m != "streaming"]
    w = 0.8 / len(layer_methods)
    for i, sc in enumerate(SCORERS):
        for j, r in enumerate(show):
            ax = axes[i][j]
            for k, m in enumerate(layer_methods):
                rows = st.rows_of(m, r, sc)
                if not rows:
                    continue
                frac = np.array([[x / q["prompt_tokens"] for x in q["keep"]] for q in rows]).mean(axis=0)
                ax.bar(np.arange(L) + (k - (len(layer_methods) - 1) / 2) * w, frac, w, color=COLORS[m], label=m)
            ax.set_title(f"{sc}, evict {r:.1f}")
            ax.set_xticks(range(L))
            if i == len(SCORERS) - 1:
                ax.set_xlabel("layer")
            if j == 0:
                ax.set_ylabel("kept fraction of the prompt")
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("tokens kept per layer (mean over stories; head methods: mean over kv heads)")
    fig.tight_layout()
    fig.savefig(os.path.join(img, "quality_budgets.png"), dpi=110)
    plt.close(fig)
    files.append("quality_budgets.png")
    # per-head budgets
    head_methods = [m for m in ("adakv", "prefixkv-head") if m in st.methods]
    r = 0.5 if 0.5 in st.ratios else ratios[0]
    if head_methods:
        fig, axes = plt.subplots(len(SCORERS), len(head_methods), figsize=(4.2 * len(head_methods) + 1.5, 7),
                                 squeeze=False, constrained_layout=True)
        for i, sc in enumerate(SCORERS):
            for j, m in enumerate(head_methods):
                rows = st.rows_of(m, r, sc)
                frac = np.array([np.array(q["keep_heads"]) / q["prompt_tokens"] for q in rows]).mean(axis=0)
                ax = axes[i][j]
                im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                for (a, b), v in np.ndenumerate(frac):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
                ax.set_title(f"{m}, {sc}, evict {r:.1f}")
                ax.set_xticks(range(frac.shape[1]))
                ax.set_yticks(range(frac.shape[0]))
                ax.set_xlabel("kv head")
                ax.set_ylabel("layer")
        fig.colorbar(im, ax=axes, shrink=0.8, label="kept fraction of the prompt")
        fig.suptitle("tokens kept per (layer, kv head), mean over stories")
        fig.savefig(os.path.join(img, "quality_budgets_heads.png"), dpi=110)
        plt.close(fig)
        files.append("quality_budgets_heads.png")
    return files


# ---- the document ----------------------------------------------------------------------------------------------
DISCUSSION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_discussion.md")


def document(st, args, files, work):
    today = datetime.date.today().isoformat()
    with open(os.path.join(work, "stories_eval.txt")) as f:
        prompt_lens = [int(l.split()[2]) for l in f if l.strip() and not l.startswith("#")]
    calib = 0
    p = os.path.join(work, "stories_calib.txt")
    if os.path.exists(p):
        with open(p) as f:
            calib = sum(1 for l in f if l.strip() and not l.startswith("#"))
    cont = st.rows[0]
    out = []
    w = out.append
    w("# Quality: every budget allocation against the full cache (stories260K)\n")
    w("PrefixKV's claim is about quality at a fixed budget: one cumulative-importance threshold shared by all layers "
      "should keep generation closer to the full cache than the same budget spread by a fixed rule. This page measures "
      "that claim with `prefixkv-llama` (examples/llama/) on a real pretrained model that nobody here trained, against "
      "every other allocation, all with the **same scorer, the same protected tokens and the same total budget**.\n")
    w(f"Measured {today} on the tree at commit `{args.commit}` with `{args.command}`; the setup is under "
      "[How the numbers were made](#how-the-numbers-were-made). [Long generations with a capped cache]"
      "(#long-generations-with-a-capped-cache-decode-time-upkeep) measures the decode-time upkeep.\n")
    w("## Headline numbers\n")
    w(f"{len(st.stories)} evaluation stories; full cache: mean PPL {st.full_ppl.mean():.3f} "
      f"[{st.ci(st.full_ppl)[1]:.3f}, {st.ci(st.full_ppl)[2]:.3f}]. Means of the PPL increase over the full cache "
      "(paired, percent), ROUGE-L F1 and top-1 agreement against the full cache.\n")
    for r in [x for x in (0.5, 0.8) if x in st.ratios]:
        w(f"**Evict ratio {r:.1f}**\n")
        w(headline_table(st, r) + "\n")
    if os.path.exists(DISCUSSION_FILE) and not args.no_discussion:
        with open(DISCUSSION_FILE) as f:
            w(f.read().rstrip() + "\n")
    w("## Where prefixkv beats each other allocation (paired, 95%)\n")
    w("Evict ratios at which prefixkv is significantly better / worse than the named allocation (the paired bootstrap "
      "interval of the difference excludes 0); every other ratio is a tie.\n")
    for sc in SCORERS:
        w(f"**scorer {sc}**\n")
        w(verdict_table(st, sc) + "\n")
    w("## How the numbers were made\n")
    w(f"- Date {today}; the tree at commit `{args.commit}`; command `{args.command}` "
      f"({args.seconds:.0f} s wall and {args.cpu_seconds:.0f} CPU seconds on {args.cores} cores of "
      f"{args.cpu or 'the CPU'}; 2 evaluation processes).")
    w("- Model: stories260K (llama2.c format; 5 layers, 8 query / 4 kv heads, head size 8, context 512), "
      "host backend of `prefixkv-llama` (fp32), compressor `prefixkv::compress_host`.")
    w(f"- Texts: stories sampled from the full-cache model at temperature 1 with fixed seeds (calibration: seeds "
      f"1000000 + k, evaluation: 2000000 + k; stories that end before 350 tokens are skipped). {calib} calibration and "
      f"{len(st.stories)} evaluation stories; each is split into a prompt (BOS + {min(prompt_lens) - 1}-"
      f"{max(prompt_lens) - 1} tokens, mean {np.mean(prompt_lens) - 1:.0f}) and a continuation of 100 tokens that the "
      "compression never sees.")
    w("- Per story the prompt is prefilled once with the full cache; for every (scorer, method, evict ratio) a copy "
      "of that cache is compressed, then (1) the continuation is fed token by token (teacher forcing) at positions "
      "prompt_len, prompt_len + 1, ... — **PPL** = exp(mean NLL over the 100 tokens; the first one is predicted by the "
      "prompt's last, uncompressed logits, as `--score-continuation` does) and **top-1** = share of the 99 later "
      "positions whose argmax equals the full cache's; (2) 64 tokens are generated greedily — **ROUGE-L** = F1 of "
      "their longest common subsequence (tokens as units) with the full cache's 64 tokens.")
    w("- Budget: evict ratio R evicts rint(R x N) candidates (round half to even, as the `prefixkv` CLI), N = cached "
      "tokens summed over the segments (layers, or (layer, kv head) pairs for head granularity); the first 4 (sinks) "
      "and the last 1 token of every segment are protected and count as kept. `profile` evicts rint(f_l x N_l) per "
      "layer with fractions f_l calibrated on the calibration stories (`profile_accumulator` over prefixkv's "
      "solutions at the same ratio and scorer), so its total matches R only on average. The check that every method "
      "kept exactly this budget, and that every method at R = 0 scores bit-identically to the full cache, passed for "
      "every story.")
    w("- Scorers: `attention` = prefill attention probabilities summed over the prompt's query rows, averaged over "
      "query heads (the paper's); `window` = attention of the last 16 prompt queries over the cached keys. "
      "`streaming` keeps sinks + the most recent tokens and ignores the scorer (the same curve in both panels).")
    w("- Statistics: mean over stories with a 95% percentile bootstrap interval (2000 resamples of stories); "
      "comparisons are paired (the same stories), and \"better\"/\"worse\" on this page means the paired interval excludes 0.\n")
    w("| method | allocation over layers | granularity |\n|---|---|---|")
    w("| streaming | uniform, recency scorer | layer |")
    w("| uniform | same count per layer | layer |")
    w("| pyramid | PyramidKV's linear schedule (first layer 39x the last) | layer |")
    w("| adakv | same count per layer, spread over kv heads by one threshold per layer (Ada-KV) | head |")
    w("| prefixkv | one global cumulative-importance threshold over layers (the paper) | layer |")
    w("| prefixkv-head | one global threshold over all (layer, kv head) segments | head |")
    w("| profile | per-layer fractions calibrated offline (the paper's serving mode) | layer |\n")
    for metric, label, better, sign in METRICS:
        name = f"quality_{metric}.png"
        w(f"## {label[0].upper() + label[1:]} ({better})\n")
        if name in files:
            w(f"![{label}](img/{name})\n")
        for sc in SCORERS:
            w(f"**scorer {sc}** — mean [95% interval]\n")
            w(metric_table(st, sc, metric) + "\n")
            w(f"prefixkv minus the other allocation, oriented so that + is better for prefixkv (**+** / **−**: the "
              f"paired interval excludes 0, =: it does not):\n")
            w(paired_table(st, sc, metric, sign) + "\n")
    if "quality_vs_prefixkv.png" in files:
        w("## prefixkv's paired advantage\n")
        w("![paired differences](img/quality_vs_prefixkv.png)\n")
    w("## The budgets each method chose\n")
    if "quality_budgets.png" in files:
        w("![per-layer budgets](img/quality_budgets.png)\n")
    if "quality_budgets_heads.png" in files:
        w("![per-head budgets](img/quality_budgets_heads.png)\n")
    if "recent_kept" in st.rows[0]:
        w("Share of the prompt's last 64 tokens that the compressed caches still hold (mean over layers, kv heads and "
          "stories; columns: scorer and evict ratio):\n")
        w(recent_table(st) + "\n")
    for sc in SCORERS:
        for r in [x for x in (0.5, 0.9) if x in st.ratios]:
            w(f"Kept share of the prompt per layer, scorer {sc}, evict ratio {r:.1f} (mean over stories):\n")
            w(budget_table(st, sc, r) + "\n")
    w("## Reproduce\n")
    w("```sh\n./scripts/quality-study.sh           # writes this page, docs/quality_summary.csv and docs/img/quality_*.png\n"
      "./scripts/quality-study.sh --longgen # only the long-generation section (a few minutes)\n"
      "./scripts/quality-study.sh --ci DIR  # the reduced run CI does (ctest -R quality_study_ci)\n```\n")
    w("Single points with the command line (one JSON line, see examples/llama/main.cpp):\n")
    w("```sh\nbuild/bin/prefixkv-llama --prompt \"Once upon a time, there was a little girl named Lily. She loved to "
      "play outside in the park.\" \\\n    --method prefixkv --scorer window --evict-ratio 0.5 "
      "--score-continuation \" One day, she saw a big, red ball.\"\n```")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--commit", default="(not recorded)")
    ap.add_argument("--command", default="./scripts/quality-study.sh")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--cpu", default="")
    ap.add_argument("--cpu-seconds", type=float, default=0.0)
    ap.add_argument("--cores", default=str(os.cpu_count()))
    ap.add_argument("--no-discussion", action="store_true")
    args = ap.parse_args()
    st = Study(load(args.work))
    if args.check:
        check(st, args.work)
    os.makedirs(args.out, exist_ok=True)
    try:
        files = plots(st, os.path.join(args.out, "img"))
    except ImportError:
        files = []
        print("quality_report.py: matplotlib missing, no plots", file=sys.stderr)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(document(st, args, files, args.work))
    # the aggregated numbers, one line per point
    with open(os.path.join(args.out, "quality_summary.csv"), "w") as f:
        f.write("scorer,method,ratio,stories," + ",".join(f"{m},{m}_lo,{m}_hi" for m, *_ in METRICS) + ",kept_share\n")
        for sc in SCORERS:
            for m in st.methods:
                for r in st.ratios:
                    if st.get(sc, m, r, "ppl") is None:
                        continue
                    cells = []
                    for metric, *_ in METRICS:
                        cells += [f"{v:.6g}" for v in st.ci(st.get(sc, m, r, metric))]
                    rows = st.rows_of(m, r, sc)
                    kept = np.mean([sum(q["keep"]) / (len(q["keep"]) * q["prompt_tokens"]) for q in rows])
                    f.write(f"{sc},{m},{r:.1f},{len(rows)}," + ",".join(cells) + f",{kept:.4f}\n")
    print(f"quality_report.py: wrote {os.path.join(args.out, 'quality.md')} and {len(files)} plots")


if __name__ == "__main__":
    main()
