"""A straightforward PyTorch implementation of prefixkv's math, written from its documented semantics, for the
tests to compare the extension against: scores, sort, the curves' prefix sums, the exact prefix selection (every
eligible rank's entry value sorted once, no bisection), budgets and their allocation over layers, gather.

Floating-point sums follow the orders prefixkv defines (score/score.hpp, curve/curve.hpp) so that results are
compared bit for bit; everything is CPU and float32/float64 elementwise arithmetic, which is exact IEEE.
"""

import math

import torch

FLT_MAX = 3.4028234663852886e38


# ---- scorers ------------------------------------------------------------------------------------------------------

def attention_scores(p, heads_out):
    """Accumulated attention of one layer in prefixkv's defined order (score/score.hpp). p: (B, Hq, Q, K)
    probabilities. Returns (B, heads_out, K) float32: the queries in chunks of 32 from query 0; a chunk's sum runs
    from 0 over the group's q heads (outer, in order) and the chunk's queries (inner, in order); the chunk sums are
    added in chunk order from 0; then one division by the group size."""
    p = p.float()
    B, Hq, Q, K = p.shape
    G = Hq // heads_out
    out = torch.zeros(B, heads_out, K, dtype=torch.float32)
    for oh in range(heads_out):
        acc = torch.zeros(B, K, dtype=torch.float32)
        for q0 in range(0, Q, 32):
            c = torch.zeros(B, K, dtype=torch.float32)
            for g in range(G):
                for q in range(q0, min(Q, q0 + 32)):
                    c = c + p[:, oh * G + g, q, :]
            acc = acc + c
        out[:, oh] = acc / float(G)
    return out


def key_norm_scores(k, heads_out):
    """1 / ||k|| per key (FLT_MAX for a zero key), mean over kv heads for layer rows. k: (B, H, S, D)."""
    k = k.float()
    B, H, S, D = k.shape
    per_head = torch.zeros(B, H, S, dtype=torch.float32)
    for h in range(H):
        ss = torch.zeros(B, S, dtype=torch.float32)
        for d in range(D):
            x = k[:, h, :, d]
            ss = ss + x * x
        nrm = torch.sqrt(ss)
        v = torch.where(nrm > 0, torch.clamp(1.0 / nrm, max=FLT_MAX), torch.full_like(nrm, FLT_MAX))
        per_head[:, h] = v
    if heads_out == 1:
        s = torch.zeros(B, S, dtype=torch.float32)
        for h in range(H):
            s = s + per_head[:, h]
        return (s / float(H)).unsqueeze(1)
    return per_head


def recency_scores(B, heads_out, S):
    return torch.arange(1, S + 1, dtype=torch.float32).expand(B, heads_out, S).clone()


def window_scores64(q, k, n, heads_out, scale=0.0):
    """Observation-window attention in float64 (for margin-checked comparisons). q: (Hq, w, D), k: (H, S, D) of one
    sequence; n tokens. Returns (heads_out, n)."""
    Hq, w, D = q.shape
    H = k.shape[0]
    G = Hq // H
    sc = scale if scale > 0 else 1.0 / math.sqrt(D)
    q = q.double()
    k = k.double()
    per_kv = torch.zeros(H, n, dtype=torch.float64)
    for kh in range(H):
        grp = torch.zeros(n, dtype=torch.float64)
        for g in range(G):
            h = kh * G + g
            acc = torch.zeros(n, dtype=torch.float64)
            for i in range(w):
                last = n - w + i
                logits = (k[kh, :last + 1] @ q[h, i]) * sc
                acc[:last + 1] += torch.softmax(logits, 0)
            grp += acc
        per_kv[kh] = grp / G
    return per_kv.mean(0, keepdim=True) if heads_out == 1 else per_kv


# ---- curves -------------------------------------------------------------------------------------------------------

def protected_mask(n, sinks, recent):
    t = torch.arange(n)
    return (t < sinks) | (t >= n - recent)


def candidate_count(n, sinks, recent):
    a, b = min(sinks, n), min(recent, n)
    return n - min(a + b, n)


def prefix_fractions(y):
    """Normalised inclusive prefix sums of ranked scores y (float32, c values), summed in double in prefixkv's
    order: chunks of 8 ranks, groups of 32 chunks; prefix(r) = G + (C + p)."""
    c = y.numel()
    if c == 0:
        return torch.zeros(0, dtype=torch.float32)
    yd = y.double()
    out = torch.empty(c, dtype=torch.float64)
    mass = 0.0
    G = 0.0
    for g0 in range(0, c, 256):
        C = 0.0
        total = 0.0
        for c0 in range(g0, min(c, g0 + 256), 8):
            part = torch.cumsum(yd[c0:min(c, c0 + 8)], 0)
            out[c0:c0 + part.numel()] = G + (C + part)
            C = C + float(part[-1])
        total = C
        G = G + total
    mass = G
    if mass > 0:
        return (out / mass).float()
    return (torch.arange(1, c + 1, dtype=torch.float64) / c).float()


def curve(row, n, sinks, recent):
    """(positions int64, cumulative float32) of one row's candidates ranked by score desc, ties by position."""
    row = row[:n].float()
    cand = torch.nonzero(~protected_mask(n, sinks, recent)).flatten()
    if cand.numel() == 0:
        return cand, torch.zeros(0, dtype=torch.float32)
    order = torch.sort(-row[cand], stable=True).indices  # descending, stable: ties by position
    pos = cand[order]
    return pos, prefix_fractions(row[pos])


# ---- the exact solve ----------------------------------------------------------------------------------------------

def bounds(c, min_keep, max_keep):
    return min(min_keep, c), min(max_keep, c)


def exact_prefix_counts(cums, picks_lo, picks_hi, R):
    """Per segment: lo_s + how many of the R globally smallest (entry value, segment, rank) eligible keys it owns.
    cums: list of cumulative rows; eligible ranks of segment s are [lo_s, hi_s)."""
    entries, owners = [], []
    for s, cum in enumerate(cums):
        for r in range(picks_lo[s], picks_hi[s]):
            entries.append(0.0 if r == 0 else float(cum[r - 1]))
            owners.append(s)
    counts = list(picks_lo)
    if R > 0:
        e = torch.tensor(entries, dtype=torch.float32)
        order = torch.sort(e, stable=True).indices[:R]  # entries are listed by (s, r): stable = (e, s, r) order
        for i in order.tolist():
            counts[owners[i]] += 1
    return counts


def distribute(B, weights, lo, hi):
    """prefixkv's integer spreading of B over bins: x_l = clamp(floor(lam * w_l / w_max), lo_l, hi_l) at the largest
    integer lam whose sum is <= B, then one more to the lowest-numbered bins that grow at lam + 1 until the sum is B."""
    wmax = max(weights)

    def at(lam):
        return [min(max(lam * w // wmax, a), b) for w, a, b in zip(weights, lo, hi)]

    lam = 0
    top = max(hi) if hi else 0
    limit = top * wmax // min(weights) + 2
    while lam < limit and sum(at(lam + 1)) <= B:
        lam += 1
    x = at(lam)
    rest = B - sum(x)
    nxt = at(lam + 1)
    for i in range(len(x)):
        if rest <= 0:
            break
        if nxt[i] > x[i]:
            x[i] += 1
            rest -= 1
    return x


def pyramid_weight(l, L):
    return 1 if L <= 1 else 39 * (L - 1) - 38 * l


class Infeasible(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def compress_keep(rows, ns, *, evict_ratio=None, keep_tokens=None, profile=None, allocation="prefix", sinks=4,
                  recent=1, min_keep=0, max_keep=1 << 62, heads=1):
    """Tokens kept per segment of ONE sequence. rows[l][h]: score row of (layer l, head h); ns[l][h]: its tokens.
    Returns (keep[l][h], positions[l][h]) with the kept positions ascending. Raises Infeasible(reason)."""
    L, H = len(rows), heads
    cur = [[curve(rows[l][h], ns[l][h], sinks, recent) for h in range(H)] for l in range(L)]
    cc = [[candidate_count(ns[l][h], sinks, recent) for h in range(H)] for l in range(L)]
    lo = [[bounds(cc[l][h], min_keep, max_keep)[0] for h in range(H)] for l in range(L)]
    hi = [[bounds(cc[l][h], min_keep, max_keep)[1] for h in range(H)] for l in range(L)]
    lay_n = [sum(ns[l]) for l in range(L)]
    lay_c = [sum(cc[l]) for l in range(L)]
    lay_lo = [sum(lo[l]) for l in range(L)]
    lay_hi = [sum(hi[l]) for l in range(L)]
    tokens, cands = sum(lay_n), sum(lay_c)
    if allocation == "profile":
        counts = []
        for l in range(L):
            e = round(profile[l] * lay_n[l])
            ev = min(max(e, 0), lay_c[l])
            k = lay_c[l] - ev
            if k < lay_lo[l] or k > lay_hi[l]:
                raise Infeasible("infeasible_bounds")
            counts.append(k)
    else:
        if keep_tokens is None:
            e = round(evict_ratio * tokens)
            if e > cands:
                raise Infeasible("infeasible_budget")
            B = cands - e
        else:
            T = keep_tokens * H
            prot = tokens - cands
            if T < prot or T - prot > cands:
                raise Infeasible("infeasible_budget")
            B = T - prot
        if B < sum(lay_lo) or B > sum(lay_hi):
            raise Infeasible("infeasible_bounds")
        if allocation == "prefix":
            counts = None
        elif allocation == "uniform":
            counts = distribute(B, [1] * L, lay_lo, lay_hi)
        else:
            counts = distribute(B, [pyramid_weight(l, L) for l in range(L)], lay_lo, lay_hi)
    keep = [[0] * H for _ in range(L)]
    if counts is None:  # one problem: every segment of the sequence
        flat = [(l, h) for l in range(L) for h in range(H)]
        got = exact_prefix_counts([cur[l][h][1] for l, h in flat], [lo[l][h] for l, h in flat],
                                  [hi[l][h] for l, h in flat], B - sum(sum(x) for x in lo))
        for (l, h), k in zip(flat, got):
            keep[l][h] = k
    else:  # one problem per layer
        for l in range(L):
            got = exact_prefix_counts([cur[l][h][1] for h in range(H)], lo[l], hi[l], counts[l] - lay_lo[l])
            for h in range(H):
                keep[l][h] = got[h]
    positions = [[None] * H for _ in range(L)]
    for l in range(L):
        for h in range(H):
            n = ns[l][h]
            mask = protected_mask(n, sinks, recent).clone()
            mask[cur[l][h][0][:keep[l][h]]] = True
            positions[l][h] = torch.nonzero(mask).flatten()
            keep[l][h] = int(mask.sum())
    return keep, positions


def gather_rows(t, b, h, positions):
    """Rows `positions` of (sequence b, head h) of a [B, H, S, D] tensor."""
    return t[b, h, positions]
