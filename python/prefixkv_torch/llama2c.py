"""llama2.c checkpoints and tokenizers in PyTorch, their conversion to Hugging Face's LlamaForCausalLM, and a
minimal PyTorch forward pass in llama2.c's own conventions (used where transformers is absent, and by the tests to
check the conversion).

Checkpoint (little-endian): 7 x int32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}, then
float32 tensors: token embedding (vocab, dim); RMSNorm of attention (L, dim); wq (L, dim, dim); wk (L, kv_dim, dim);
wv (L, kv_dim, dim); wo (L, dim, dim); RMSNorm of the feed-forward (L, dim); w1 (L, hidden, dim); w2 (L, dim,
hidden); w3 (L, hidden, dim); final RMSNorm (dim); two legacy RoPE tables (seq_len, head_size / 2); the classifier
(vocab, dim) only when vocab_size is negative (positive: it shares the embedding).

RoPE: llama2.c rotates pairs of adjacent dimensions (2j, 2j + 1) of every head with frequency theta^(-2j / hs);
Hugging Face's Llama rotates dimensions j and j + hs / 2 with the same frequency. Permuting the rows of every head
of wq and wk (row 2j -> j, row 2j + 1 -> j + hs / 2) turns one into the other: q . k is unchanged because both sides
are permuted alike, and V is not rotated.
"""

import re
import struct

import torch

ROPE_THETA = 10000.0
RMS_EPS = 1e-5
BOS, EOS = 1, 2


class Config:
    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier):
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len = n_heads, n_kv_heads, vocab_size, seq_len
        self.shared_classifier = shared_classifier
        self.head_size = dim // n_heads
        self.kv_dim = self.head_size * n_kv_heads

    def __repr__(self):
        return ("Config(dim=%d, hidden_dim=%d, n_layers=%d, n_heads=%d, n_kv_heads=%d, vocab_size=%d, seq_len=%d)"
                % (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size,
                   self.seq_len))


def read_checkpoint(path):
    """(Config, dict of float32 tensors) of a llama2.c checkpoint; ValueError on a malformed file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 28:
        raise ValueError("%s: shorter than the 28-byte header" % path)
    dim, hidden, L, H, Hk, V, S = struct.unpack_from("<7i", data, 0)
    cfg = Config(dim, hidden, L, H, Hk, abs(V), S, V > 0)
    if min(dim, hidden, L, H, Hk, abs(V), S) <= 0 or dim % H or H % Hk or (dim // H) % 2:
        raise ValueError("%s: bad header %r" % (path, (dim, hidden, L, H, Hk, V, S)))
    kv = cfg.kv_dim
    shapes = [("emb", (cfg.vocab_size, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
              ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("rope", (2, S, cfg.head_size // 2))]
    if not cfg.shared_classifier:
        shapes.append(("wcls", (cfg.vocab_size, dim)))
    total = sum(_numel(s) for _, s in shapes)
    if len(data) != 28 + 4 * total:
        raise ValueError("%s: %d bytes, the header announces %d" % (path, len(data), 28 + 4 * total))
    flat = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    w, at = {}, 0
    for name, shape in shapes:
        n = _numel(shape)
        w[name] = flat[at:at + n].reshape(shape).clone()
        at += n
    del w["rope"]
    if cfg.shared_classifier:
        w["wcls"] = w["emb"]
    return cfg, w


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class Tokenizer:
    """llama2.c's tokenizer: BOS, a dummy space, code points (byte fallback at id byte + 3), merges by score."""

    def __init__(self, path, vocab_size):
        with open(path, "rb") as f:
            data = f.read()
        (self.max_len,) = struct.unpack_from("<i", data, 0)
        at = 4
        self.vocab, self.scores = [], []
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, at)
            at += 8
            self.vocab.append(data[at:at + n])
            self.scores.append(score)
            at += n
        self.ids = {}
        for i in range(vocab_size - 1, -1, -1):  # the lowest id wins on duplicates
            self.ids[self.vocab[i]] = i

    def encode(self, text, bos=True, dummy_space=True):
        s = text.encode("utf-8")
        t = [BOS] if bos else []
        if dummy_space and s:
            t.append(self.ids.get(b" ", 3 + 32))
        i = 0
        while i < len(s):
            j = i + 1
            while j < len(s) and j - i < 4 and (s[j] & 0xC0) == 0x80:
                j += 1
            piece = s[i:j]
            if piece in self.ids:
                t.append(self.ids[piece])
            else:
                t.extend(3 + b for b in piece)
            i = j
        while True:
            best, best_id, best_at = float("-inf"), -1, 0
            for k in range(len(t) - 1):
                tid = self.ids.get(self.vocab[t[k]] + self.vocab[t[k + 1]])
                if tid is not None and self.scores[tid] > best:
                    best, best_id, best_at = self.scores[tid], tid, k
            if best_id < 0:
                break
            t[best_at] = best_id
            del t[best_at + 1]
        return t

    def piece(self, prev, token):
        s = self.vocab[token]
        if prev == BOS and s[:1] == b" ":
            s = s[1:]
        m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", s)
        return bytes([int(m.group(1), 16)]) if m else s

    def decode(self, prev, tokens):
        """The bytes of `tokens` following token `prev` (as llama2.c prints them)."""
        out = b""
        for t in tokens:
            out += self.piece(prev, t)
            prev = t
        return out


# ---- Hugging Face -------------------------------------------------------------------------------------------------

def permute_rope_rows(w, heads):
    """Rows of every head reordered from adjacent pairs (2j, 2j + 1) to halves (j, j + hs / 2)."""
    out_dim, in_dim = w.shape
    hs = out_dim // heads
    return w.reshape(heads, hs // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim).contiguous()


def hf_state_dict(cfg, w):
    """The weights of a llama2.c checkpoint under LlamaForCausalLM's parameter names (wq / wk permuted)."""
    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"], "lm_head.weight": w["wcls"]}
    for l in range(cfg.n_layers):
        p = "model.layers.%d." % l
        sd[p + "input_layernorm.weight"] = w["rms_att"][l]
        sd[p + "self_attn.q_proj.weight"] = permute_rope_rows(w["wq"][l], cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_rope_rows(w["wk"][l], cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][l]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][l]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][l]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][l]
        sd[p + "mlp.up_proj.weight"] = w["w3"][l]
        sd[p + "mlp.down_proj.weight"] = w["w2"][l]
    return sd


def hf_config(cfg, attn_implementation="eager"):
    """A transformers LlamaConfig for the checkpoint (imports transformers)."""
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_size, max_position_embeddings=cfg.seq_len,
                    rms_norm_eps=RMS_EPS, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    tie_word_embeddings=cfg.shared_classifier, bos_token_id=BOS, eos_token_id=EOS,
                    attn_implementation=attn_implementation)
    return c


def hf_model(cfg, w, device="cpu", dtype=torch.float32):
    """LlamaForCausalLM with the checkpoint's weights, eager attention (attention probabilities available)."""
    from transformers import LlamaForCausalLM

    config = hf_config(cfg)
    model = LlamaForCausalLM(config)
    sd = hf_state_dict(cfg, w)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError("conversion: missing %s, unexpected %s" % (missing, unexpected))
    from .hf import attention_implementation

    attn = attention_implementation()  # eager, with a causal mask per layer's own number of keys
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:
        model.config._attn_implementation = attn
    model = model.to(device=device, dtype=dtype).eval()
    # the rotary frequencies must be llama2.c's (theta 10000 over the head size)
    inv = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    if inv is not None:
        want = 1.0 / (ROPE_THETA ** (torch.arange(0, cfg.head_size, 2, dtype=torch.float32) / cfg.head_size))
        if not torch.allclose(inv.float().cpu(), want, rtol=1e-6, atol=0):
            raise RuntimeError("conversion: the model's RoPE frequencies are not theta 10000 over the head size")
    return model


# ---- a minimal forward pass in llama2.c's conventions -------------------------------------------------------------

class TorchLlama:
    """llama2.c's forward pass in PyTorch (adjacent-pair RoPE, unpermuted weights), one token at a time, with
    per-layer K/V caches [1, n_kv_heads, capacity, head_size] whose layers may hold different numbers of tokens."""

    def __init__(self, cfg, w, device="cpu"):
        self.cfg, self.device = cfg, device
        self.w = {k: v.to(device) for k, v in w.items()}
        hs = cfg.head_size
        self.inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, hs, 2, dtype=torch.float32, device=device) / hs))
        cap = cfg.seq_len
        self.k = [torch.zeros(1, cfg.n_kv_heads, cap, hs, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(1, cfg.n_kv_heads, cap, hs, device=device) for _ in range(cfg.n_layers)]
        self.lengths = [0] * cfg.n_layers

    def _rope(self, x, pos):  # x: (heads, hs)
        ang = pos * self.inv_freq
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = x[:, 0::2], x[:, 1::2]
        out = torch.empty_like(x)
        out[:, 0::2] = a * c - b * s
        out[:, 1::2] = a * s + b * c
        return out

    @staticmethod
    def _rms(x, w):
        return w * (x * torch.rsqrt((x * x).mean() + RMS_EPS))

    def step(self, token, pos, probs=None):
        """Logits of `token` at RoPE position `pos`; appends its K/V. probs[l]: receives (n_heads, n) attention."""
        cfg, w = self.cfg, self.w
        hs, G = cfg.head_size, cfg.n_heads // cfg.n_kv_heads
        x = w["emb"][token].clone()
        for l in range(cfg.n_layers):
            xb = self._rms(x, w["rms_att"][l])
            q = self._rope((w["wq"][l] @ xb).view(cfg.n_heads, hs), pos)
            k = self._rope((w["wk"][l] @ xb).view(cfg.n_kv_heads, hs), pos)
            v = (w["wv"][l] @ xb).view(cfg.n_kv_heads, hs)
            n = self.lengths[l]
            self.k[l][0, :, n] = k
            self.v[l][0, :, n] = v
            n += 1
            self.lengths[l] = n
            K = self.k[l][0, :, :n].repeat_interleave(G, 0)  # (n_heads, n, hs)
            Vv = self.v[l][0, :, :n].repeat_interleave(G, 0)
            att = torch.softmax((K @ q.unsqueeze(-1)).squeeze(-1) / hs ** 0.5, dim=-1)  # (n_heads, n)
            if probs is not None:
                probs.append(att)
            o = (att.unsqueeze(1) @ Vv).squeeze(1).reshape(-1)
            x = x + w["wo"][l] @ o
            xb = self._rms(x, w["rms_ffn"][l])
            h = torch.nn.functional.silu(w["w1"][l] @ xb) * (w["w3"][l] @ xb)
            x = x + w["w2"][l] @ h
        return w["wcls"] @ self._rms(x, w["rms_final"])

    def prefill(self, tokens):
        """Logits of the last prompt token and per-layer attention probabilities (1, n_heads, T, T)."""
        T = len(tokens)
        P = [torch.zeros(1, self.cfg.n_heads, T, T, device=self.device) for _ in range(self.cfg.n_layers)]
        logits = None
        for t, tok in enumerate(tokens):
            rows = []
            logits = self.step(tok, t, rows)
            for l, a in enumerate(rows):
                P[l][0, :, t, :t + 1] = a
        return logits, P

    def compress_(self, pkv, attention, **kw):
        """Compress the caches with prefixkv_torch (layer granularity); the layers keep their own lengths."""
        lengths = torch.tensor([self.lengths[0]], dtype=torch.int32, device=self.device)
        new = pkv.compress_(self.k, self.v, attention=attention, lengths=lengths, check=True, **kw)
        self.lengths = [int(x) for x in new[:, 0].tolist()]
        return list(self.lengths)
