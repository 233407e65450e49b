"""Hugging Face transformers integration: a cache whose layers may hold different numbers of tokens after
compression, while positions (RoPE, cache positions) continue from the original sequence length.

    from prefixkv_torch.hf import PrefixKVCache, attention_implementation
    model.set_attn_implementation(attention_implementation())    # eager, a causal mask per layer
    cache = PrefixKVCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, output_attentions=True)  # eager attention
    cache.compress_(attention=out.attentions, budget=0.5)     # every layer keeps its own number of tokens
    out = model(input_ids=next_token, past_key_values=cache, use_cache=True,
                position_ids=torch.tensor([[cache.get_seq_length()]]))

Works with transformers' DynamicCache API of its 4.5x and 5.x releases (per-layer objects with `keys` / `values`,
or the older `key_cache` / `value_cache` lists). Batch 1 with layer granularity (the [B, H, S, D] layout cannot hold
different lengths per sequence or per head of one layer without padding and masks, which this class does not add).
"""

import torch

from . import compress_

try:  # transformers is optional for the rest of the package
    from transformers import DynamicCache as _DynamicCache
except ImportError:  # pragma: no cover - exercised only where transformers is missing
    _DynamicCache = None


def _base():
    if _DynamicCache is None:
        raise ImportError("prefixkv_torch.hf needs transformers")
    return _DynamicCache


ATTENTION = "prefixkv_eager"


def _causal_mask(n_keys, query):
    """The additive mask of a layer holding n_keys keys whose last n_queries are the new tokens (its kept tokens come
    first, all in the past of the new ones): None for one new token, else 0 where allowed and the dtype's lowest value
    elsewhere (as transformers' eager mask)."""
    q = query.shape[-2]
    if q == 1:
        return None
    i = torch.arange(q, device=query.device).view(q, 1)
    j = torch.arange(n_keys, device=query.device).view(1, n_keys)
    allowed = (j < n_keys - q) | (j - (n_keys - q) <= i)
    mask = torch.zeros(q, n_keys, dtype=query.dtype, device=query.device)
    return mask.masked_fill(~allowed, torch.finfo(query.dtype).min).view(1, 1, q, n_keys)


def attention_implementation():
    """Register (again: registering replaces) and return the name of transformers' eager attention with a causal
    mask built for each layer's own number of keys: after compression the layers hold different numbers of tokens,
    while the model builds one mask for all of them. Batch 1, no padding. Returns "eager" where transformers has no
    AttentionInterface."""
    try:
        from transformers import AttentionInterface
        from transformers.models.llama.modeling_llama import eager_attention_forward
    except ImportError:
        return "eager"

    def forward(module, query, key, value, attention_mask, **kwargs):
        return eager_attention_forward(module, query, key, value, _causal_mask(key.shape[-2], query), **kwargs)

    AttentionInterface.register(ATTENTION, forward)
    try:  # the model's own mask (unused by `forward`) is built as for eager attention
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionMaskInterface.register(ATTENTION, eager_mask)
    except ImportError:
        pass
    return ATTENTION


class PrefixKVCache(_DynamicCache if _DynamicCache is not None else object):
    """A DynamicCache that can be compressed in place with prefixkv (see the module docstring).

    ``get_seq_length()`` reports the logical length (tokens seen: prompt + generated), from which the model derives
    the positions of new tokens; ``get_mask_sizes()`` reports the longest layer's physical length, so that the
    model's mask covers every layer's keys. Run the model with ``attention_implementation()`` (eager attention with a
    causal mask built for each layer's keys): ``model.set_attn_implementation(attention_implementation())``."""

    def __init__(self, *args, **kwargs):
        _base().__init__(self, *args, **kwargs)
        self.logical_length = 0

    # ---- storage, across transformers versions
    def _kv(self):
        if hasattr(self, "layers"):
            return [l.keys for l in self.layers], [l.values for l in self.layers]
        return list(self.key_cache), list(self.value_cache)

    def _set(self, i, k, v):
        if hasattr(self, "layers"):
            self.layers[i].keys, self.layers[i].values = k, v
        else:
            self.key_cache[i], self.value_cache[i] = k, v

    def physical_lengths(self):
        """Tokens held by every layer."""
        return [k.shape[-2] for k in self._kv()[0]]

    # ---- what the model asks
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == 0:
            self.logical_length += key_states.shape[-2]
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def get_seq_length(self, layer_idx=0):
        return self.logical_length

    def get_mask_sizes(self, *args, **kwargs):
        # (cache_position, layer_idx) in transformers 4.5x / 5.x; the query length is what matters here
        q = args[0] if args else kwargs.get("cache_position", kwargs.get("query_length"))
        q = int(q.shape[0]) if hasattr(q, "shape") else int(q)
        lengths = self.physical_lengths()
        return (max(lengths) if lengths else 0) + q, 0

    # ---- compression
    def compress_(self, **kwargs):
        """Compress every layer in place with ``prefixkv_torch.compress_`` (same keywords: ``attention=``,
        ``budget=`` ...), then shorten each layer to its new length. Returns the new lengths per layer."""
        keys, values = self._kv()
        if not keys:
            return []
        if keys[0].shape[0] != 1:
            raise ValueError("PrefixKVCache.compress_: batch 1 only (got %d)" % keys[0].shape[0])
        kwargs.setdefault("check", True)
        if kwargs.get("granularity", "layer") != "layer":
            raise ValueError("PrefixKVCache.compress_: layer granularity only")
        kwargs["lengths"] = torch.tensor([keys[0].shape[-2]], dtype=torch.int32, device=keys[0].device)
        new = compress_(keys, values, **kwargs)
        n = [int(x) for x in new[:, 0].tolist()]  # the cache's layout needs the lengths on the host
        for i, (k, v) in enumerate(zip(keys, values)):
            self._set(i, k[:, :, :n[i]], v[:, :, :n[i]])
        return n
