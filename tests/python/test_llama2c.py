"""The llama2.c reader, tokenizer and Hugging Face conversion (no transformers needed): the converted weights with
Hugging Face's rotary convention (halves) give the same logits as the checkpoint with llama2.c's (adjacent pairs)."""

import os

import pytest
import torch

from prefixkv_torch import llama2c

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL_DIRS = [os.environ.get("PREFIXKV_MODEL_DIR", ""), os.path.join(REPO, "models", "stories260K"),
              os.path.join(REPO, "shared", "models", "stories260K"), os.path.join(REPO, "..", "shared", "models", "stories260K")]
MODEL_DIR = next((d for d in MODEL_DIRS if os.path.exists(os.path.join(d, "stories260K.bin"))), None)
needs_model = pytest.mark.skipif(MODEL_DIR is None, reason="stories260K not found")


def rotate_half_forward(cfg, sd, tokens):
    """Logits of the last token with Hugging Face Llama's math (rotate_half RoPE) on a converted state dict."""
    hs, G = cfg.head_size, cfg.n_heads // cfg.n_kv_heads
    T = len(tokens)
    inv = 1.0 / (llama2c.ROPE_THETA ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):  # (heads, T, hs)
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def rms(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + llama2c.RMS_EPS))

    x = sd["model.embed_tokens.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg.n_layers):
        p = "model.layers.%d." % l
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(T, cfg.n_heads, hs).transpose(0, 1))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(T, cfg.n_kv_heads, hs).transpose(0, 1))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, cfg.n_kv_heads, hs).transpose(0, 1)
        k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
        a = torch.softmax(q @ k.transpose(1, 2) / hs ** 0.5 + mask, -1)
        x = x + (a @ v).transpose(0, 1).reshape(T, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + g @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"])[-1] @ sd["lm_head.weight"].T


def test_permutation_moves_adjacent_pairs_to_halves():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of size 8
    p = llama2c.permute_rope_rows(w, 2)
    for h in range(2):
        for j in range(4):
            assert torch.equal(p[h * 8 + j], w[h * 8 + 2 * j])
            assert torch.equal(p[h * 8 + 4 + j], w[h * 8 + 2 * j + 1])


@needs_model
def test_converted_weights_give_the_same_logits():
    cfg, w = llama2c.read_checkpoint(os.path.join(MODEL_DIR, "stories260K.bin"))
    tok = llama2c.Tokenizer(os.path.join(MODEL_DIR, "tok512.bin"), cfg.vocab_size)
    ids = tok.encode("Once upon a time, there was a little dog named Max.")
    m = llama2c.TorchLlama(cfg, w)
    want, _ = m.prefill(ids)
    got = rotate_half_forward(cfg, llama2c.hf_state_dict(cfg, w), ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert int(got.argmax()) == int(want.argmax())


@needs_model
def test_greedy_story_and_tokenizer_round_trip():
    cfg, w = llama2c.read_checkpoint(os.path.join(MODEL_DIR, "stories260K.bin"))
    tok = llama2c.Tokenizer(os.path.join(MODEL_DIR, "tok512.bin"), cfg.vocab_size)
    assert tok.encode("") == [llama2c.BOS]
    m = llama2c.TorchLlama(cfg, w)
    logits, out, pos = m.step(llama2c.BOS, 0), [], 1
    for _ in range(20):
        t = int(logits.argmax())
        out.append(t)
        logits = m.step(t, pos)
        pos += 1
    text = tok.decode(llama2c.BOS, out)
    assert text.startswith(b"Once upon a time, there was a little girl named Lily.")
    ids = tok.encode("Lily saw a big, red ball.")
    assert ids[0] == llama2c.BOS and tok.decode(ids[0], ids[1:]) == b"Lily saw a big, red ball."


def test_causal_mask_per_layer():
    # prefixkv_torch.hf builds each layer's mask from its own key count: kept tokens first (all visible), then the
    # q new tokens (causal among themselves); one new token needs no mask
    from prefixkv_torch import hf

    q = torch.zeros(1, 2, 3, 4)
    for n in (3, 5, 9):
        m = hf._causal_mask(n, q)
        assert m.shape == (1, 1, 3, n) and m.dtype == q.dtype
        for i in range(3):
            for j in range(n):
                visible = j < n - 3 or j - (n - 3) <= i
                assert (m[0, 0, i, j].item() == 0.0) == visible
                assert visible or m[0, 0, i, j].item() == torch.finfo(q.dtype).min
    assert hf._causal_mask(7, torch.zeros(1, 2, 1, 4)) is None
    half = hf._causal_mask(4, torch.zeros(1, 1, 2, 4, dtype=torch.float16))
    assert half.dtype == torch.float16 and half[0, 0, 0, 3].item() == torch.finfo(torch.float16).min
