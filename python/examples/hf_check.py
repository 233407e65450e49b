#!/usr/bin/env python3
"""End-to-end check: Hugging Face transformers + prefixkv_torch against prefixkv-llama, token for token.

For each of 4 prompts and each configuration — the full cache, and prefixkv at evict ratios 0.3 and 0.6 (accumulated
attention, 4 sinks, 1 recent token) — it generates 64 greedy tokens with LlamaForCausalLM (converted from the
llama2.c checkpoint, eager attention, float32, cache compressed by prefixkv_torch.compress_) and with the
prefixkv-llama command-line runtime, and compares the two continuations byte for byte. Prints one PASS/FAIL line per
prompt and configuration and a verdict; exits 0 only when every line passes.

    python3 python/examples/hf_check.py                # HF on CUDA when available, then on CPU
    python3 python/examples/hf_check.py --device cpu --llama-bin build/bin/prefixkv-llama

prefixkv-llama is looked up in build*/bin/ (or --llama-bin); when absent it is built into build-llama/ (host-only
CMake build of the prefixkv_llama target). --backend torch replaces transformers by prefixkv_torch's minimal PyTorch
forward pass (for machines without transformers).
"""

import argparse
import glob
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import hf_generate as ex  # noqa: E402

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.",
    "Tom had a big red ball. He liked to throw it high in the sky. One day, the ball went over the fence and",
    "The sun was shining and the birds were singing. Sam and his mom went to the store to buy some food for",
    "There was a small cat who lived in a big house. The cat was very hungry, so it looked for something to eat.",
]
CONFIGS = [("full", None), ("prefixkv", 0.3), ("prefixkv", 0.6)]


def find_llama_bin(explicit):
    if explicit:
        return explicit
    for p in sorted(glob.glob(os.path.join(REPO, "build*", "bin", "prefixkv-llama"))):
        if os.access(p, os.X_OK):
            return p
    build = os.path.join(REPO, "build-llama")
    print("hf_check: building prefixkv-llama into %s" % build, flush=True)
    subprocess.run(["cmake", "-S", REPO, "-B", build, "-DPREFIXKV_ENABLE_CUDA=OFF", "-DPREFIXKV_BUILD_TESTS=OFF",
                    "-DPREFIXKV_BUILD_BENCHMARKS=OFF", "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "--target", "prefixkv_llama", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(build, "bin", "prefixkv-llama")


def run_llama(binary, model_dir, prompt, steps, method, ratio, sinks, recent):
    cmd = [binary, "--model", os.path.join(model_dir, "stories260K.bin"), "--tokenizer",
           os.path.join(model_dir, "tok512.bin"), "--prompt", prompt, "--steps", str(steps), "--method", method,
           "--verbose"]
    if ratio is not None:
        cmd += ["--evict-ratio", repr(ratio), "--scorer", "attention", "--sinks", str(sinks), "--recent", str(recent)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise RuntimeError("prefixkv-llama failed (%d): %s" % (r.returncode, r.stderr.decode(errors="replace")))
    text = r.stdout[:-1] if r.stdout.endswith(b"\n") else r.stdout
    return text, r.stderr.decode(errors="replace").strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=ex.default_model_dir())
    ap.add_argument("--llama-bin", default=None)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=1)
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cuda when available, and cpu)")
    ap.add_argument("--backend", choices=["hf", "torch"], default="hf")
    a = ap.parse_args()
    devices = a.device or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    cfg, w, tok = ex.load(a.model_dir)
    binary = find_llama_bin(a.llama_bin)
    print("hf_check: model %s (%r), reference %s, backend %s, torch %s" % (a.model_dir, cfg, binary, a.backend,
                                                                         torch.__version__))
    if a.backend == "hf":
        import transformers

        print("hf_check: transformers %s" % transformers.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    refs = {}
    for pi, prompt in enumerate(PROMPTS):
        for method, ratio in CONFIGS:
            refs[(pi, method, ratio)] = run_llama(binary, a.model_dir, prompt, a.steps, method, ratio, a.sinks,
                                                  a.recent)
    failures = total = 0
    for dev in devices:
        t0 = time.time()
        for pi, prompt in enumerate(PROMPTS):
            ids = tok.encode(prompt)
            for method, ratio in CONFIGS:
                runner = (ex.HFRunner if a.backend == "hf" else ex.TorchRunner)(cfg, w, dev)
                out, kept = ex.generate(runner, ids, a.steps, cfg.seq_len, ratio, a.sinks, a.recent)
                got = tok.decode(ids[-1], out)
                want, info = refs[(pi, method, ratio)]
                ok = got == want
                total += 1
                failures += 0 if ok else 1
                label = "full" if ratio is None else "prefixkv %.1f" % ratio
                print("%s  %-5s prompt %d (%d tokens)  %-12s  %d tokens%s" % (
                    "PASS" if ok else "FAIL", dev, pi, len(ids), label, len(out),
                    "" if kept is None else "  kept per layer %s" % kept), flush=True)
                if not ok:
                    print("      prefixkv-llama: %s" % info.splitlines()[-1] if info else "")
                    print("      want: %r" % want)
                    print("      got:  %r" % got)
        print("hf_check: %s done in %.1f s" % (dev, time.time() - t0))
    verdict = "PASS" if failures == 0 else "FAIL"
    print("hf_check: %s — %d of %d continuations equal prefixkv-llama's" % (verdict, total - failures, total))
    sys.exit(0 if failures == 0 else 1)


if __name__ == "__main__":
    main()
