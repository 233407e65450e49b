"""prefixkv for PyTorch: layer-adaptive KV-cache compression (PrefixKV) on lists of per-layer cache tensors.

The ops run prefixkv's host backend on CPU tensors and its CUDA backend on CUDA tensors (current stream, no host
synchronisation). They are registered with PyTorch's dispatcher as ``torch.ops.prefixkv.*``; the functions here
are thin wrappers that turn names into the ops' integer codes.

High level::

    lengths = prefixkv_torch.compress_(keys, values, budget=0.5, attention=probs)   # evict half, in place

Lower-level stages, for callers that bring their own scores::

    c = prefixkv_torch.curves(scores)                     # sort + normalised prefix sums per row
    keep, threshold, status = prefixkv_torch.solve(c, budget=0.5)
    sel = prefixkv_torch.select(c, keep)                  # kept positions, ascending
    lengths = prefixkv_torch.gather_(keys, values, sel)   # compact in place (gather(...): out of place)

See docs/python.md.
"""

from typing import NamedTuple, Optional, Sequence

import torch

from . import _build

__all__ = [
    "PrefixKVError", "compress_", "curves", "solve", "select", "gather", "gather_", "check_status",
    "Curves", "Selection", "REASONS", "load",
]

#: prefixkv::reason, by value (stable: values are never renumbered).
REASONS = (
    "none", "null_pointer", "negative_extent", "negative_stride", "overlapping_strides", "misaligned",
    "shape_mismatch", "out_of_range", "not_ascending", "nonfinite_input", "negative_input", "infeasible_budget",
    "infeasible_bounds", "bad_parameter", "overlapping_buffers", "workspace_too_small", "capacity_exceeded",
    "unsupported", "cuda_runtime", "bad_file",
)

_SCORERS = {"scores": 0, "attention": 1, "window": 2, "key_norm": 3, "keynorm": 3, "recency": 4}
_GRANULARITY = {"layer": 0, "head": 1}
_ALLOCATION = {"prefix": 0, "uniform": 1, "pyramid": 2, "profile": 3}
_REDUCE = {"mean": 0, "max": 1}
_POOL = {None: 0, "none": 0, "max": 1, "avg": 2}
_LAYOUT = {"bhsd": 0, "bshd": 1}
_INT64_MAX = (1 << 63) - 1

_ext = None


class PrefixKVError(ValueError):
    """Bad input rejected by prefixkv. ``reason`` is prefixkv's reason name (e.g. ``"infeasible_budget"``)."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason


def load():
    """Build (first use) and load the extension; returns its Python module."""
    global _ext
    if _ext is None:
        _ext = _build.load()
        _register_fakes()
    return _ext


def _ops():
    load()
    return torch.ops.prefixkv


def _reason_of(message):
    # messages look like "prefixkv [reason] text"
    start = message.find("prefixkv [")
    if start < 0:
        return None
    end = message.find("]", start)
    return message[start + len("prefixkv ["):end] if end > 0 else None


def _call(op, *args):
    try:
        return op(*args)
    except ValueError as e:
        msg = str(e).split("\nException raised from")[0].strip()
        raise PrefixKVError(msg, _reason_of(msg)) from None


def _pick(table, value, what):
    try:
        return table[value]
    except KeyError:
        raise PrefixKVError("prefixkv [bad_parameter] unknown %s %r (one of %s)"
                            % (what, value, ", ".join(str(k) for k in table if k is not None)),
                            "bad_parameter") from None


def check_status(status, message=None):
    """Raise PrefixKVError when a status tensor (from a CUDA call) holds a non-zero reason (this synchronises)."""
    code = int(status.reshape(-1).max().item()) if status.numel() else 0
    if code != 0:
        name = REASONS[code] if 0 <= code < len(REASONS) else "unknown"
        text = message or load().compress_message(code)
        raise PrefixKVError("prefixkv [%s] %s" % (name, text), name)


def _layer_list(x, what):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        raise PrefixKVError("prefixkv [bad_parameter] %s must be a list of per-layer tensors" % what,
                            "bad_parameter")
    return list(x)


def _budget_args(budget, evict_ratio, keep_tokens):
    given = [x is not None for x in (budget, evict_ratio, keep_tokens)]
    if sum(given) > 1:
        raise PrefixKVError("prefixkv [bad_parameter] give one of budget, evict_ratio, keep_tokens", "bad_parameter")
    if budget is not None:
        if isinstance(budget, bool):
            raise PrefixKVError("prefixkv [bad_parameter] budget must be a float (evict ratio) or an int (tokens "
                                "kept per sequence)", "bad_parameter")
        if isinstance(budget, int):
            keep_tokens = budget
        else:
            evict_ratio = float(budget)
    if keep_tokens is not None:
        return 1, 0.0, int(keep_tokens)
    if evict_ratio is not None:
        return 0, float(evict_ratio), 0
    return None


def compress_(keys: Sequence[torch.Tensor], values: Optional[Sequence[torch.Tensor]], *, budget=None,
              evict_ratio=None, keep_tokens=None, profile=None, scorer=None, attention=None, queries=None,
              lse=None, scores=None, lengths=None, granularity="layer", allocation="prefix", sinks=4, recent=1,
              min_keep=0, max_keep=None, layout="bhsd", q_heads=None, window_scale=0.0, window_group="mean",
              window_pool=None, window_pool_kernel=7, window_heads="mean", return_status=False, check=False):
    """Compress a KV cache in place: score -> curve -> solve -> select -> compact for every layer and sequence.

    keys, values: one tensor per layer, ``[batch, kv_heads, tokens, head_dim]`` (``layout="bhsd"``, Hugging Face)
        or ``[batch, tokens, kv_heads, head_dim]`` (``"bshd"``); float32, float16 or bfloat16, any strides, all on
        one device. ``values`` may be None (a K-only cache). After the call, the first ``lengths[l, b]`` rows of
        every (layer l, sequence b) hold the kept tokens in their original order; later rows keep their old bytes.
    budget: a float = evict ratio r in [0, 1) (evict round(r * N) candidates of each sequence, N its tokens over
        all layers) or an int = tokens kept per sequence over all layers (per kv head with head granularity).
        ``evict_ratio=`` / ``keep_tokens=`` say the same explicitly. ``allocation="profile"`` takes ``profile``
        (one eviction fraction per layer) instead.
    scorer: "attention" (``attention``: per-layer probabilities ``(batch, q_heads, query, key)``, float32 or the
        cache's dtype), "window" (``queries``: the last w queries per layer ``(batch, q_heads, w, head_dim)`` in the
        cache's layout and dtype, optional ``lse`` ``(batch, q_heads, w)`` float32), "scores" (``scores``:
        ``(layers, batch[, kv_heads], tokens)`` float32 >= 0), "key_norm" or "recency". Inferred from the input
        given when omitted.
    lengths: tokens per sequence ``(batch,)``, or per segment ``(layers, batch[, kv_heads])`` (as this function
        returns them, for repeated compression); default: every sequence fills the cache.
    granularity: "layer" (the kv heads of a layer keep the same tokens) or "head".
    allocation: "prefix" (PrefixKV's global threshold), "uniform", "pyramid" or "profile".
    sinks, recent: tokens always kept at the start and end of every segment. min_keep / max_keep: bounds on the
        candidates kept per segment.
    Returns the new lengths ``(layers, batch[, kv_heads])`` int32 on the cache's device, or (lengths, status)
    with ``return_status=True``. On CPU bad input raises PrefixKVError (a ValueError) and nothing is touched. On
    CUDA, problems found in device data (NaN scores, lengths past the cache, an infeasible budget) stop the chain
    on the device: nothing is moved, the lengths come back unchanged and ``status`` (int32, 1 element) holds the
    reason; ``check=True`` synchronises and raises instead.
    """
    keys = _layer_list(keys, "keys")
    values = _layer_list(values, "values")
    attention = _layer_list(attention, "attention")
    queries = _layer_list(queries, "queries")
    lse = _layer_list(lse, "lse")
    if scorer is None:
        scorer = ("attention" if attention else "window" if queries else "scores" if scores is not None else None)
        if scorer is None:
            raise PrefixKVError("prefixkv [bad_parameter] give a scorer (or its input: attention=, queries= or "
                                "scores=)", "bad_parameter")
    sk = _pick(_SCORERS, scorer, "scorer")
    alloc = _pick(_ALLOCATION, allocation, "allocation")
    prof = []
    if alloc == 3:
        if profile is None:
            raise PrefixKVError("prefixkv [null_pointer] allocation='profile' needs profile=", "null_pointer")
        prof = [float(x) for x in profile]
        kind, ratio, tokens = 0, 0.0, 0
    else:
        b = _budget_args(budget, evict_ratio, keep_tokens)
        if b is None:
            raise PrefixKVError("prefixkv [bad_parameter] give a budget (evict ratio or tokens kept)",
                                "bad_parameter")
        kind, ratio, tokens = b
    if keys and attention and sk == 1:
        kt = keys[0].dtype
        attention = [p if p.dtype in (torch.float32, kt) else p.float() for p in attention]
    out = _call(_ops().compress_, keys, values, lengths, attention, queries, lse, scores,
                _pick(_LAYOUT, layout, "layout"), int(q_heads or 0), sk, _pick(_GRANULARITY, granularity, "granularity"),
                alloc, kind, ratio, tokens, prof, int(sinks), int(recent), int(min_keep),
                _INT64_MAX if max_keep is None else int(max_keep), float(window_scale),
                _pick(_REDUCE, window_group, "window_group"), _pick(_POOL, window_pool, "window_pool"),
                int(window_pool_kernel), _pick(_REDUCE, window_heads, "window_heads"))
    new_lengths, status, _threshold = out
    if check:
        check_status(status)
    return (new_lengths, status) if return_status else new_lengths


class Curves(NamedTuple):
    """Per-row ranked candidates and their normalised cumulative importance (prefixkv's curve set)."""
    offsets: torch.Tensor        # (S + 1) int64: row s's candidates are [offsets[s], offsets[s + 1])
    tokens: torch.Tensor         # (S) int64: tokens per row, protected included
    positions: torch.Tensor      # (S * N) int32: token position of each rank (valid up to offsets[-1])
    cumulative: torch.Tensor     # (S * N) float32: normalised inclusive prefix sums
    sorted_scores: torch.Tensor  # (S * N) float32: the ranked scores
    status: torch.Tensor         # (1) int32: scorer/curve status bits (CUDA; 0 on CPU)
    sinks: int
    recent: int


class Selection(NamedTuple):
    """Kept token positions per row, ascending (cu_seqlens-style offsets)."""
    offsets: torch.Tensor  # (S + 1) int64
    indices: torch.Tensor  # (capacity) int32, valid up to offsets[-1]
    status: torch.Tensor   # (1) int32


def curves(scores: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, sinks=4, recent=1, check=False) -> Curves:
    """Rank every row's candidates (score descending, ties by position) and build its cumulative curve.

    scores: ``(S, N)`` float32 >= 0 (or ``(..., N)``, flattened to rows), one row per segment; lengths: ``(S,)``
    tokens per row (default N). The first ``sinks`` and last ``recent`` tokens of a row are protected (always kept,
    never ranked).
    """
    if scores.dim() != 2:
        scores = scores.reshape(-1, scores.shape[-1])
    if lengths is not None and lengths.dim() != 1:
        lengths = lengths.reshape(-1)
    out = _call(_ops().curves, scores, lengths, int(sinks), int(recent))
    c = Curves(*out, int(sinks), int(recent))
    if check:
        bits = int(c.status.item())
        if bits:
            name = "nonfinite_input" if bits & 1 else "out_of_range" if bits & 2 else \
                "negative_input" if bits & 4 else "capacity_exceeded"
            raise PrefixKVError("prefixkv [%s] curves: bad scores or lengths (status bits %d)" % (name, bits), name)
    return c


def solve(c: Curves, *, budget=None, evict_ratio=None, keep_tokens=None, keep_candidates=None, problem_offsets=None,
          segments_per_problem=None, min_keep=0, max_keep=None, lo=None, hi=None, check=False):
    """The exact global prefix solve: how many tokens every row keeps.

    Rows form problems (all rows by default; ``segments_per_problem=k`` = consecutive groups of k rows, e.g. one
    sequence's layers; or explicit ``problem_offsets`` (P + 1)). Each problem keeps rows' prefixes under one
    threshold so that its budget is met exactly: ``budget`` float = evict ratio, int = tokens kept; or
    ``evict_ratio`` / ``keep_tokens`` / ``keep_candidates`` (each a number or a per-problem tensor).
    Returns (keep (S) int64 tokens kept per row, protected included; threshold (P) float32; status (P) int32).
    """
    S = c.tokens.shape[0]
    if segments_per_problem is not None:
        k = int(segments_per_problem)
        if k <= 0 or S % k:
            raise PrefixKVError("prefixkv [shape_mismatch] segments_per_problem must divide the rows", "shape_mismatch")
        problem_offsets = torch.arange(0, S + 1, k, dtype=torch.int64, device=c.tokens.device)
    kind, ratio, count, ratios, counts = 0, 0.0, 0, None, None
    given = [x is not None for x in (budget, evict_ratio, keep_tokens, keep_candidates)]
    if sum(given) != 1:
        raise PrefixKVError("prefixkv [bad_parameter] give exactly one of budget, evict_ratio, keep_tokens, "
                            "keep_candidates", "bad_parameter")
    if budget is not None:
        if isinstance(budget, int) and not isinstance(budget, bool):
            keep_tokens = budget
        else:
            evict_ratio = budget
    if evict_ratio is not None:
        kind = 0
        if isinstance(evict_ratio, torch.Tensor):
            ratios = evict_ratio
        else:
            ratio = float(evict_ratio)
    else:
        kind, v = (1, keep_tokens) if keep_tokens is not None else (2, keep_candidates)
        if isinstance(v, torch.Tensor):
            counts = v
        else:
            count = int(v)
    out = _call(_ops().solve, c.offsets, c.tokens, c.cumulative, c.sinks, c.recent, problem_offsets, kind, ratio,
                count, ratios, counts, int(min_keep), _INT64_MAX if max_keep is None else int(max_keep), lo, hi)
    if check:
        check_status(out[2], "solve: a problem's budget or bounds cannot be met")
    return out


def select(c: Curves, keep: torch.Tensor, *, check=False) -> Selection:
    """Kept positions of every row (its protected tokens and the first keep - protected ranked candidates),
    ascending, as offsets (S + 1) and indices."""
    out = _call(_ops().select, c.offsets, c.tokens, c.positions, c.sinks, c.recent, keep)
    s = Selection(*out)
    if check:
        check_status(s.status, "select: a keep count or position is out of range")
    return s


def _grid_args(keys, granularity, layout):
    heads = 1
    if granularity == "head":
        k0 = keys[0]
        heads = k0.shape[1] if layout == "bhsd" else k0.shape[2]
    elif granularity != "layer":
        _pick(_GRANULARITY, granularity, "granularity")
    return heads


def _lengths_shape(keys, heads, sequence_major, layout):
    L = len(keys)
    B = keys[0].shape[0]
    shape = [B, L] if sequence_major else [L, B]
    return shape + ([heads] if heads > 1 else [])


def gather_(keys, values, sel: Selection, *, granularity="layer", sequence_major=False, layout="bhsd", check=False):
    """Compact a cache in place with a selection (rows numbered layer-major: (layer, sequence[, kv head]), or
    sequence-major). Returns the new lengths."""
    keys = _layer_list(keys, "keys")
    values = _layer_list(values, "values")
    heads = _grid_args(keys, granularity, layout) if keys else 1
    lengths, status = _call(_ops().gather_, keys, values, sel.offsets, sel.indices, heads, bool(sequence_major),
                            _pick(_LAYOUT, layout, "layout"))
    if check:
        check_status(status, "gather: an index or offset is out of range")
    return lengths.reshape(_lengths_shape(keys, heads, sequence_major, layout)) if keys else lengths


def gather(keys, values, sel: Selection, out_keys, out_values=None, *, granularity="layer", sequence_major=False,
           layout="bhsd", check=False):
    """Copy the kept rows of a cache to the front of another one (``out_keys`` / ``out_values``: one tensor per
    layer, same batch, kv heads and head_dim, any token capacity). Returns the new lengths."""
    keys = _layer_list(keys, "keys")
    values = _layer_list(values, "values")
    out_keys = _layer_list(out_keys, "out_keys")
    out_values = _layer_list(out_values, "out_values")
    heads = _grid_args(keys, granularity, layout) if keys else 1
    lengths, status = _call(_ops().gather, keys, values, sel.offsets, sel.indices, out_keys, out_values, heads,
                            bool(sequence_major), _pick(_LAYOUT, layout, "layout"))
    if check:
        check_status(status, "gather: an index or offset is out of range, or a row does not fit the destination")
    return lengths.reshape(_lengths_shape(keys, heads, sequence_major, layout)) if keys else lengths


# ---- shapes for torch.compile (PyTorch 2.x: fake tensors) ---------------------------------------------------------

def _register_fakes():
    register = getattr(torch.library, "register_fake", None)
    if register is None:  # PyTorch < 2.4: no fake-tensor registration API (eager mode only)
        return

    def i32(shape, like):
        return torch.empty(shape, dtype=torch.int32, device=like.device)

    @register("prefixkv::compress_")
    def _(keys, values, lengths, attention, queries, lse, scores, layout, q_heads, scorer, granularity, allocation,
          budget, evict_ratio, keep_tokens, profile, sinks, recent, min_keep, max_keep, window_scale, window_group,
          window_pool, window_pool_kernel, window_heads):
        k0 = keys[0]
        B = k0.shape[0]
        H = k0.shape[1] if layout == 0 else k0.shape[2]
        L = len(keys)
        shape = [L, B, H] if granularity == 1 else [L, B]
        P = B if allocation == 0 else B * L
        return i32(shape, k0), i32([1], k0), torch.empty([P], dtype=torch.float32, device=k0.device)

    @register("prefixkv::curves")
    def _(scores, lengths, sinks, recent):
        S, N = scores.shape
        d = scores.device
        return (torch.empty([S + 1], dtype=torch.int64, device=d), torch.empty([S], dtype=torch.int64, device=d),
                torch.empty([S * N], dtype=torch.int32, device=d), torch.empty([S * N], dtype=torch.float32, device=d),
                torch.empty([S * N], dtype=torch.float32, device=d), torch.empty([1], dtype=torch.int32, device=d))

    @register("prefixkv::solve")
    def _(offsets, tokens, cumulative, sinks, recent, problem_offsets, budget, evict_ratio, count, ratios, counts,
          min_keep, max_keep, lo, hi):
        S = tokens.shape[0]
        P = 1 if problem_offsets is None else problem_offsets.shape[0] - 1
        d = tokens.device
        return (torch.empty([S], dtype=torch.int64, device=d), torch.empty([P], dtype=torch.float32, device=d),
                torch.empty([P], dtype=torch.int32, device=d))

    @register("prefixkv::select")
    def _(offsets, tokens, positions, sinks, recent, keep):
        S = tokens.shape[0]
        d = tokens.device
        return (torch.empty([S + 1], dtype=torch.int64, device=d),
                torch.empty([positions.shape[0]], dtype=torch.int32, device=d),
                torch.empty([1], dtype=torch.int32, device=d))

    def _gather_shapes(keys, heads_grid, layout):
        k0 = keys[0]
        return i32([len(keys) * k0.shape[0] * heads_grid], k0), i32([1], k0)

    @register("prefixkv::gather_")
    def _(keys, values, sel_offsets, indices, heads_grid, sequence_major, layout):
        return _gather_shapes(keys, heads_grid, layout)

    @register("prefixkv::gather")
    def _(keys, values, sel_offsets, indices, out_keys, out_values, heads_grid, sequence_major, layout):
        return _gather_shapes(keys, heads_grid, layout)
