#!/usr/bin/env python3
"""Prints a bench_compact JSON (--benchmark_out) one line per case: name, median ms, ratio vs memcpy.
Usage: python3 bench/compact/summarize.py bench_compact.json"""
import json
import sys

d = json.load(open(sys.argv[1]))
for b in d["benchmarks"]:
    n = b["name"].replace("BM_", "").replace("/iterations:15/manual_time", "")
    print(f"{n:80s} {b.get('median_ms', 0):8.4f} {b.get('ratio', 0):6.3f}")
