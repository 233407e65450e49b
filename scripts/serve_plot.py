#!/usr/bin/env python3
"""The picture and the table of docs/serving.md, from the output of scripts/serve-bench.sh.

    python3 scripts/serve_plot.py OUT/serve_bench.csv [--update-doc docs/serving.md] [--png docs/img/serving.png]

Reads the CSV (one row per evict ratio, comment lines naming the device, date and commit) and, beside it, the
serve_<ratio>.jsonl of every ratio (the summary line holds the pool's timeline). Draws peak concurrent requests,
tokens per second and pages in use over time; prints the markdown table; with --update-doc, writes the table
between the <!-- serve-table --> and <!-- /serve-table --> markers of that file. Needs matplotlib.
"""
import argparse
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVE = {"dpi": 120, "metadata": {"Software": None}}  # no version string: the same inputs give the same bytes
COLORS = ["#718096", "#2b6cb0", "#dd6b20", "#2f855a", "#805ad5"]


def read(csv_path):
    meta, rows = [], []
    with open(csv_path) as f:
        lines = f.read().splitlines()
    meta = [l[1:].strip() for l in lines if l.startswith("#")]
    body = [l for l in lines if l and not l.startswith("#")]
    for r in csv.DictReader(body):
        rows.append(r)
    timelines = {}
    for r in rows:
        path = os.path.join(os.path.dirname(csv_path), "serve_%s.jsonl" % r["evict_ratio"])
        if os.path.exists(path):
            with open(path) as f:
                last = f.read().splitlines()[-1]
            timelines[r["evict_ratio"]] = json.loads(last)["summary"]["timeline"]
    return meta, rows, timelines


def table(meta, rows):
    out = []
    out.append("| evict ratio | method | peak concurrent requests | peak pages in use | tokens/s | "
               "generated tokens | loop iterations | seconds |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append("| %s | %s | %s | %s of %s | %.0f | %s | %s | %.3f |" % (
            r["evict_ratio"], r["method"], r["peak_active"], r["peak_pages"], r["pool_pages"],
            float(r["tokens_per_s"]), r["generated_tokens"], r["iterations"], float(r["seconds"])))
    out.append("")
    out.extend(meta)
    return "\n".join(out)


def plot(rows, timelines, png):
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = ["%s\n(%s)" % (r["evict_ratio"], r["method"]) for r in rows]
    x = range(len(rows))
    ax[0].bar(x, [int(r["peak_active"]) for r in rows], color=COLORS[1])
    ax[0].set_xticks(list(x), labels)
    ax[0].set_xlabel("evict ratio")
    ax[0].set_title("peak concurrent requests")
    ax[1].bar(x, [float(r["tokens_per_s"]) for r in rows], color=COLORS[2])
    ax[1].set_xticks(list(x), labels)
    ax[1].set_xlabel("evict ratio")
    ax[1].set_title("generated tokens per second")
    for i, r in enumerate(rows):
        t = timelines.get(r["evict_ratio"])
        if t:
            ax[2].plot(t["seconds"], t["pages_in_use"], color=COLORS[i % len(COLORS)], lw=1.2,
                       label="evict ratio %s" % r["evict_ratio"])
    if rows:
        ax[2].axhline(int(rows[0]["pool_pages"]), color="black", lw=0.8, ls="--", label="pool")
    ax[2].set_xlabel("seconds")
    ax[2].set_title("pages in use")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, **SAVE)
    plt.close(fig)
    print("wrote", os.path.relpath(png, ROOT))


def update_doc(path, text):
    with open(path) as f:
        doc = f.read()
    a, b = "<!-- serve-table -->", "<!-- /serve-table -->"
    i, j = doc.find(a), doc.find(b)
    if i < 0 or j < i:
        sys.exit("%s: no %s ... %s markers" % (path, a, b))
    doc = doc[:i + len(a)] + "\n" + text + "\n" + doc[j:]
    with open(path, "w") as f:
        f.write(doc)
    print("wrote the table into", os.path.relpath(path, ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "img", "serving.png"))
    p.add_argument("--update-doc", default=None)
    a = p.parse_args()
    meta, rows, timelines = read(a.csv)
    if not rows:
        sys.exit("%s: no rows" % a.csv)
    plot(rows, timelines, a.png)
    t = table(meta, rows)
    print(t)
    if a.update_doc:
        update_doc(a.update_doc, t)


if __name__ == "__main__":
    main()
