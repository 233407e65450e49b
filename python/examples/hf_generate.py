#!/usr/bin/env python3
"""Greedy generation with Hugging Face transformers on a prefixkv-compressed KV cache.

Loads a llama2.c checkpoint (default: the bundled stories260K), converts it to a LlamaForCausalLM (eager attention),
prefills the prompt, compresses the prompt's cache with prefixkv (accumulated attention from the prefill's attention
probabilities, PrefixKV's global threshold: every layer keeps its own number of tokens), then continues greedily in
a plain loop; new tokens take the positions they would have had without compression.

    python3 python/examples/hf_generate.py --prompt "Once upon a time" --evict-ratio 0.5

--backend torch runs the same steps on a minimal PyTorch forward pass instead (no transformers needed).
"""

import argparse
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "python"))

import prefixkv_torch as pkv  # noqa: E402
from prefixkv_torch import llama2c  # noqa: E402


def default_model_dir():
    for d in (os.path.join(REPO, "models", "stories260K"), os.path.join(REPO, "shared", "models", "stories260K"),
              os.path.join(REPO, "..", "shared", "models", "stories260K")):
        if os.path.exists(os.path.join(d, "stories260K.bin")):
            return d
    return os.path.join(REPO, "models", "stories260K")


def load(model_dir):
    cfg, w = llama2c.read_checkpoint(os.path.join(model_dir, "stories260K.bin"))
    tok = llama2c.Tokenizer(os.path.join(model_dir, "tok512.bin"), cfg.vocab_size)
    return cfg, w, tok


class HFRunner:
    """LlamaForCausalLM with a PrefixKVCache."""

    def __init__(self, cfg, w, device):
        import inspect

        from prefixkv_torch.hf import PrefixKVCache

        self.model = llama2c.hf_model(cfg, w, device)
        self.device = device
        self.cache = PrefixKVCache()
        self.pass_cache_position = "cache_position" in inspect.signature(self.model.model.forward).parameters

    def _forward(self, ids, positions, attentions=False):
        kw = dict(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache, use_cache=True,
                  position_ids=torch.tensor([positions], device=self.device))
        if self.pass_cache_position:
            kw["cache_position"] = torch.tensor(positions, device=self.device)
        if attentions:
            kw["output_attentions"] = True
        with torch.no_grad(), warnings.catch_warnings():
            # transformers warns that only its own eager names capture attentions; prefixkv_eager returns them too
            warnings.filterwarnings("ignore", message=".*output_attentions=True.*")
            return self.model(**kw)

    def prefill(self, tokens):
        out = self._forward(tokens, list(range(len(tokens))), attentions=True)
        attn = list(out.attentions) if out.attentions is not None else None
        if not attn or any(a is None for a in attn):
            raise RuntimeError("the model returned no attention probabilities (eager attention is needed)")
        return out.logits[0, -1].float(), attn

    def step(self, token, pos):
        return self._forward([token], [pos]).logits[0, -1].float()

    def compress_(self, attention, **kw):
        return self.cache.compress_(attention=attention, **kw)


class TorchRunner:
    """The minimal PyTorch forward pass of prefixkv_torch.llama2c (no transformers)."""

    def __init__(self, cfg, w, device):
        self.m = llama2c.TorchLlama(cfg, w, device)

    def prefill(self, tokens):
        return self.m.prefill(tokens)

    def step(self, token, pos):
        return self.m.step(token, pos)

    def compress_(self, attention, **kw):
        return self.m.compress_(pkv, attention, **kw)


def generate(runner, prompt, steps, seq_len, evict_ratio=None, sinks=4, recent=1):
    """Greedy continuation (stops at BOS/EOS, at `steps` tokens or at the end of the context), compressing the
    prompt's cache first when `evict_ratio` is given. Returns (token ids, kept tokens per layer or None)."""
    logits, attention = runner.prefill(prompt)
    kept = None
    if evict_ratio is not None:
        kept = runner.compress_(attention=[a.float() for a in attention], evict_ratio=evict_ratio, sinks=sinks,
                                recent=recent, scorer="attention", allocation="prefix")
    T, out = len(prompt), []
    for i in range(min(steps, seq_len)):
        tok = int(torch.argmax(logits))  # the first maximum on ties
        if tok in (llama2c.BOS, llama2c.EOS):
            break
        out.append(tok)
        if i + 1 == steps or T + i >= seq_len:
            break
        logits = runner.step(tok, T + i)
    return out, kept


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=default_model_dir())
    ap.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--evict-ratio", type=float, default=0.5, help="0 = keep the full cache")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=1)
    ap.add_argument("--backend", choices=["hf", "torch"], default="hf")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    cfg, w, tok = load(a.model_dir)
    runner = (HFRunner if a.backend == "hf" else TorchRunner)(cfg, w, a.device)
    prompt = tok.encode(a.prompt)
    ids, kept = generate(runner, prompt, a.steps, cfg.seq_len, a.evict_ratio if a.evict_ratio > 0 else None,
                         a.sinks, a.recent)
    sys.stderr.write("%d prompt tokens; kept per layer: %s\n" % (len(prompt), kept or "all"))
    sys.stdout.buffer.write(tok.decode(prompt[-1], ids) + b"\n")


if __name__ == "__main__":
    main()
