#!/usr/bin/env python3
"""The long-generation part of the quality study (prefixkv-llama-study longgen's longgen_*.jsonl): a table per
prefill, a plot and a CSV, spliced into docs/quality.md as its "Long generations" section.

    quality_longgen.py WORKDIR --out DIR [--check] [--commit C] [--command CMD] [--seconds S] [--cpu-seconds S]
                       [--cpu NAME] [--cores N] [--no-discussion]

Per point (prefill, cap, decode policy): the mean over stories of the continuation perplexity's increase over the
full cache (paired, percent; 95% percentile bootstrap interval over stories), ROUGE-L F1 of the greedy generation
against the full cache's and top-1 agreement, and the cached rows per (layer, kv head) (mean over the teacher-forced
steps). The section replaces the text between the markers below in DIR/quality.md (inserted before "## Reproduce"
the first time). --check fails (exit 1) unless every run kept its budget at every step, every configuration has one
run per story, runs without upkeep grew by one row per token, and runs whose cap is never reached score exactly as
the full cache.
"""
import argparse
import datetime
import glob
import json
import os
import sys

import numpy as np

BEGIN, END = "<!-- longgen:begin -->", "<!-- longgen:end -->"
BOOT = 2000
DISCUSSION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_longgen_discussion.md")
PREFILL_TITLE = {"full": "prompt cached whole, then capped: the same cap for every layer",
                 "prefixkv": "prompt compressed by prefixkv, then capped: each layer keeps its prefill fraction"}
COLORS = {"fixed": "#d62728", "fixed:4": "#999999", "score": "#9467bd", "score@16": "#1f77b4",
          "score-ordered@16": "#17becf", "amortised:16": "#bcbd22", "amortised:16@16": "#2ca02c",
          "rebalance:16@16": "#ff7f0e", "none": "#000000"}


def load(work):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "longgen_*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"quality_longgen.py: no longgen_*.jsonl in {work}")
    return rows


class Study:
    def __init__(self, rows):
        self.rows = rows
        self.stories = sorted({r["story"] for r in rows})
        self.sidx = {s: i for i, s in enumerate(self.stories)}
        self.full = {r["story"]: r for r in rows if r["policy"] == "full"}
        self.prefills = [p for p in ("full", "prefixkv") if any(r["prefill"] == p and r["policy"] != "full"
                                                                  for r in rows)]
        self.caps = sorted({r["cap"] for r in rows if r["cap"] > 0})
        seen = []
        for r in rows:
            if r["policy"] not in seen and r["policy"] not in ("full", "none"):
                seen.append(r["policy"])
        self.policies = seen
        self.values = {}
        for r in rows:
            if r["policy"] == "full":
                continue
            key = (r["prefill"], r["cap"], r["policy"])
            if key not in self.values:
                self.values[key] = {m: np.full(len(self.stories), np.nan) for m in
                                    ("ppl", "rouge_l", "top1", "rows_mean", "rows_peak")}
            for m in self.values[key]:
                self.values[key][m][self.sidx[r["story"]]] = r[m]
        self.full_ppl = np.array([self.full[s]["ppl"] for s in self.stories])
        self.full_rows = np.array([self.full[s]["rows_mean"] for s in self.stories])
        rng = np.random.default_rng(20241205)
        self.boot = rng.integers(0, len(self.stories), size=(BOOT, len(self.stories)))

    def get(self, prefill, cap, policy, metric):
        v = self.values.get((prefill, cap, policy))
        return None if v is None else v[metric]

    def ppl_increase(self, prefill, cap, policy):
        x = self.get(prefill, cap, policy, "ppl")
        return None if x is None else 100.0 * (x / self.full_ppl - 1.0)

    def ci(self, x):
        means = x[self.boot].mean(axis=1)
        return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

    def paired_vs(self, prefill, cap, policy, other):
        """PPL increase of `other` minus `policy` (> 0: policy better), bootstrap interval."""
        a, b = self.ppl_increase(prefill, cap, policy), self.ppl_increase(prefill, cap, other)
        if a is None or b is None:
            return None
        return self.ci(b - a)


def check(st):
    bad = []
    counts = {}
    for r in st.rows:
        key = (r["prefill"], r["cap"], r["policy"])
        counts[key] = counts.get(key, 0) + 1
        if not r["budget_ok"]:
            bad.append(f"story {r['story']} {key}: a step left a segment off its budget")
        if r["policy"] == "none":  # no upkeep: one more row per teacher-forced token
            want = [k + r["tokens"] - 1 for k in r["keep0"]]
            if r["rows_end"] != want:
                bad.append(f"story {r['story']} {key}: rows_end {r['rows_end']}, want {want}")
        if r["policy"] == "full" and (r["top1"] != 1 or r["rouge_l"] != 1):
            bad.append(f"story {r['story']}: the full cache does not agree with itself")
        never = r["prefill"] == "full" and r["policy"] != "full" and r["horizon"] >= r["prompt_tokens"] + max(
            r["tokens"], r["gen"])
        if never:  # the cap is never reached: nothing evicted, the same bits as the full cache
            f = st.full[r["story"]]
            if r["nll_mean"] != f["nll_mean"] or r["rouge_l"] != 1 or r["top1"] != 1:
                bad.append(f"story {r['story']} {key}: a cap never reached changed the result")
    if len(set(counts.values())) != 1 or set(counts.values()).pop() != len(st.stories):
        bad.append(f"unequal run counts per configuration: {sorted(set(counts.values()))}")
    for b in bad[:20]:
        print("CHECK FAILED:", b, file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"quality_longgen.py: checks passed ({len(st.rows)} runs, {len(st.stories)} stories, {len(counts)} "
          "configurations; every step within budget)")


def policy_label(p):
    """(name, protected recent rows; — for the fixed-position policies, which have no protected window)"""
    name, _, recent = p.partition("@")
    return f"`{name}`", ("—" if name.startswith("fixed") else recent if recent else "1")


def mark(ci):
    if ci is None:
        return ""
    return " (+)" if ci[1] > 0 else " (−)" if ci[2] < 0 else ""


def table(st, prefill):
    caps = st.caps
    head = "| policy | recent | " + " | ".join(f"C={c}: PPL +% | C={c}: ROUGE-L | C={c}: top-1 | C={c}: rows"
                                               for c in caps) + " |"
    lines = [head, "|---|---|" + "---|" * (4 * len(caps))]
    for p in st.policies:
        name, recent = policy_label(p)
        cells = []
        for c in caps:
            x = st.ppl_increase(prefill, c, p)
            if x is None:
                cells += ["—"] * 4
                continue
            m, lo, hi = st.ci(x)
            vs = "" if p == "fixed" else mark(st.paired_vs(prefill, c, p, "fixed"))
            cells += [f"{m:.1f} [{lo:.1f}, {hi:.1f}]{vs}", f"{np.mean(st.get(prefill, c, p, 'rouge_l')):.3f}",
                      f"{np.mean(st.get(prefill, c, p, 'top1')):.3f}",
                      f"{np.mean(st.get(prefill, c, p, 'rows_mean')):.1f}"]
        lines.append(f"| {name} | {recent} | " + " | ".join(cells) + " |")
    none = st.ppl_increase(prefill, 0, "none")
    if none is not None:
        m, lo, hi = st.ci(none)
        cell = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]", f"{np.mean(st.get(prefill, 0, 'none', 'rouge_l')):.3f}",
                f"{np.mean(st.get(prefill, 0, 'none', 'top1')):.3f}",
                f"{np.mean(st.get(prefill, 0, 'none', 'rows_mean')):.1f}"]
        lines.append("| no upkeep (the cache grows) | — | " + " | ".join(cell + ["″"] * 4 * (len(caps) - 1)) + " |")
    return "\n".join(lines)


def plot(st, img):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(img, exist_ok=True)
    fig, axes = plt.subplots(2, len(st.prefills), figsize=(6 * len(st.prefills) + 1, 9), squeeze=False, sharey="row")
    for col, prefill in enumerate(st.prefills):
        for row, metric in enumerate(("ppl", "rouge_l")):
            ax = axes[row][col]
            for p in st.policies:
                pts = []
                for c in st.caps:
                    x = st.ppl_increase(prefill, c, p) if metric == "ppl" else st.get(prefill, c, p, metric)
                    if x is None:
                        continue
                    pts.append((np.mean(st.get(prefill, c, p, "rows_mean")), *st.ci(x)))
                if not pts:
                    continue
                x, y, lo, hi = map(np.array, zip(*pts))
                ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", color=COLORS.get(p, "#444444"), ms=4.5, lw=1.4,
                            capsize=2, label=p)
            none = st.ppl_increase(prefill, 0, "none") if metric == "ppl" else st.get(prefill, 0, "none", metric)
            if none is not None:
                rows = np.mean(st.get(prefill, 0, "none", "rows_mean"))
                ax.axhline(np.mean(none), color="k", ls="--", lw=1,
                           label=f"no upkeep ({rows:.0f} rows; the cache grows)")
            if metric == "ppl":
                ax.set_yscale("log")
                if col == 0:
                    ax.set_ylabel("PPL increase over the full cache, %\n(log scale; lower is better)")
            elif col == 0:
                ax.set_ylabel("ROUGE-L F1 vs the full cache's text\n(higher is better)")
            ax.set_title(f"prefill {prefill}: " + ("whole prompt, same cap per layer" if prefill == "full"
                                                   else "prefixkv-compressed prompt, layer shares kept"), fontsize=10)
            ax.set_xlabel(f"cached rows per (layer, kv head), mean over the generation (full cache: "
                          f"{st.full_rows.mean():.0f})")
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8.5, frameon=False)
    r0 = st.rows[0]
    fig.suptitle(f"stories260K, {len(st.stories)} stories: {r0['prompt_tokens'] - 1}-token prompts, {r0['tokens']} new "
                 f"tokens, caps "
                 f"C = {', '.join(str(c) for c in st.caps)} rows per layer (mean and 95% bootstrap interval)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(os.path.join(img, "quality_longgen.png"), dpi=110)
    plt.close(fig)
    return "quality_longgen.png"


def section(st, args, img_name):
    today = datetime.date.today().isoformat()
    r0 = st.rows[0]
    T, N, G = r0["prompt_tokens"], r0["tokens"], r0["gen"]
    out = []
    w = out.append
    w("## Long generations with a capped cache (decode-time upkeep)\n")
    w(f"Compression at prefill does not bound memory during a long generation: every new token adds a row to every "
      f"layer. Here {len(st.stories)} stories (seeds 3000000 + k) are cut after BOS + {T - 1} tokens, and the model "
      f"continues for {N} tokens with its cache capped at C rows per (layer, kv head) on average — C = "
      f"{' and '.join(str(c) for c in st.caps)}, of up to {T + N - 1} tokens — kept there after every token by "
      "`prefixkv::decode_step_host` (`prefixkv-llama --decode-budget cap:H --decode-policy P`, docs/decode.md). "
      "Budgets: `cap:H` lets every layer keep its prefill fraction of min(N, H) tokens. With the whole prompt cached "
      "(prefill `full`, H = C) every layer gets C rows; with the prompt compressed by prefixkv at evict ratio "
      f"{1 - st_keep(st):.1f} (window scorer, prefill `prefixkv`, H = C / {st_keep(st):.1f}) the layers keep the "
      "shares the prefill solve chose, about C rows per layer on average.\n")
    w(f"Measured {today} on the tree at commit `{args.commit}` with `{args.command}` ({args.seconds:.0f} s wall and "
      f"{args.cpu_seconds:.0f} CPU seconds on {args.cores} cores of {args.cpu or 'the CPU'}; 2 processes).\n")
    w(f"**PPL**: teacher forcing over the full-cache model's own {N}-token continuation (sampled at temperature 1, "
      f"as every story of this page); **top-1**: agreement of the argmax with the full cache's over those positions; "
      f"**ROUGE-L**: F1 of {G} greedy tokens against the full cache's {G} greedy tokens; **rows**: cached rows per "
      "(layer, kv head), mean over the teacher-forced steps (the full cache: "
      f"{st.full_rows.mean():.1f}; the amortised policies overshoot by up to the slack between compressions). "
      "Policies (`@R`: `--decode-recent R`, a protected window of the R newest rows; otherwise 1 row; 4 sinks "
      "always): `fixed` — the paper's code, the first n0 - 25 rows (n0 / 2 when n0 < 26) of the prefill cache "
      "stay and the rest is a sliding window; `fixed:4` — 4 sinks + a sliding window (StreamingLLM); `score` — "
      "running accumulated attention of every cached token, the lowest evicted (`score-ordered`: the same, rows "
      "kept in token order); `amortised:16` — the same scores, the cache overshoots by up to 16 rows, then one "
      "compression of every layer; `rebalance:16` — amortised, each compression re-solving PrefixKV's global "
      "threshold across layers. (+) / (−): PPL significantly better / worse than `fixed` (paired 95% interval of the "
      "difference excludes 0). Every run kept its budget at every step (checked by the study).\n")
    for prefill in st.prefills:
        w(f"**Prefill `{prefill}`** — {PREFILL_TITLE[prefill]}. Mean PPL increase over the full cache in % "
          "[95% interval], ROUGE-L, top-1, rows:\n")
        w(table(st, prefill) + "\n")
    if img_name:
        w(f"![long generations: quality against cache size](img/{img_name})\n")
    if os.path.exists(DISCUSSION_FILE) and not args.no_discussion:
        with open(DISCUSSION_FILE) as f:
            w(f.read().rstrip() + "\n")
    w("Reproduce: `./scripts/quality-study.sh --longgen` (this section, docs/quality_longgen.csv and "
      "docs/img/quality_longgen.png); one run from the command line:\n")
    w("```sh\nbuild/bin/prefixkv-llama --prompt \"Once upon a time, there was a little boy named Tim.\" --steps 256 \\\n"
      "    --method prefixkv --scorer window --evict-ratio 0.5 --decode-budget cap:64 --decode-policy score "
      "--decode-recent 16 --verbose\n```")
    return "\n".join(out) + "\n"


def st_keep(st):
    """Kept fraction of the compressed prefill (the horizon's divisor): the cap's horizon over C."""
    for r in st.rows:
        if r["prefill"] == "prefixkv" and r["cap"] > 0:
            return r["cap"] / r["horizon"]
    return 1.0


def splice(page, text):
    block = BEGIN + "\n" + text + END + "\n"
    if BEGIN in page and END in page:
        a, b = page.index(BEGIN), page.index(END) + len(END)
        return page[:a] + block.rstrip("\n") + page[b:]
    at = page.find("\n## Reproduce")
    if at < 0:
        return page.rstrip("\n") + "\n\n" + block
    return page[:at + 1] + block + "\n" + page[at + 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--commit", default="(not recorded)")
    ap.add_argument("--command", default="./scripts/quality-study.sh --longgen")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--cpu-seconds", type=float, default=0.0)
    ap.add_argument("--cpu", default="")
    ap.add_argument("--cores", default=str(os.cpu_count()))
    ap.add_argument("--no-discussion", action="store_true")
    args = ap.parse_args()
    st = Study(load(args.work))
    if args.check:
        check(st)
    os.makedirs(args.out, exist_ok=True)
    try:
        img = plot(st, os.path.join(args.out, "img"))
    except ImportError:
        img = None
        print("quality_longgen.py: matplotlib missing, no plot", file=sys.stderr)
    page_path = os.path.join(args.out, "quality.md")
    page = open(page_path).read() if os.path.exists(page_path) else "# Quality\n"
    with open(page_path, "w") as f:
        f.write(splice(page, section(st, args, img)))
    with open(os.path.join(args.out, "quality_longgen.csv"), "w") as f:
        f.write("prefill,cap,horizon,policy,stories,ppl_increase_pct,ppl_increase_lo,ppl_increase_hi,rouge_l,top1,"
                "rows_mean,rows_peak\n")
        for prefill in st.prefills:
            for c in [0] + st.caps:
                for p in (["none"] if c == 0 else st.policies):
                    x = st.ppl_increase(prefill, c, p)
                    if x is None:
                        continue
                    h = next(r["horizon"] for r in st.rows if r["prefill"] == prefill and r["cap"] == c
                             and r["policy"] == p)
                    m, lo, hi = st.ci(x)
                    f.write(f"{prefill},{c},{h},{p},{len(x)},{m:.4f},{lo:.4f},{hi:.4f},"
                            f"{np.mean(st.get(prefill, c, p, 'rouge_l')):.4f},{np.mean(st.get(prefill, c, p, 'top1')):.4f},"
                            f"{np.mean(st.get(prefill, c, p, 'rows_mean')):.2f},"
                            f"{int(np.max(st.get(prefill, c, p, 'rows_peak')))}\n")
    print(f"quality_longgen.py: wrote the long-generation section of {page_path}" + (f" and img/{img}" if img else ""))


if __name__ == "__main__":
    main()
