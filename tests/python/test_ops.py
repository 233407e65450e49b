"""prefixkv_torch against the reference implementation in reference.py, on random shapes, ragged lengths, every
dtype and layout, on every device present (CPU always; CUDA where available). Results are compared bit for bit."""

import pytest
import torch

import reference as ref
from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- random caches ------------------------------------------------------------------------------------------------

class Case:
    """A random cache: L layers of [B, H, S, D] (or [B, S, H, D]) K and V, ragged lengths, probabilities."""

    def __init__(self, rng, dtype, layout="bhsd", device="cpu", max_tokens=40, ties=False, padded=None, max_layers=4,
                 max_batch=3):
        self.L = rng.randint(1, max_layers)
        self.B = rng.randint(1, max_batch)
        self.H = rng.choice([1, 2, 4])
        self.G = rng.choice([1, 2])
        self.Hq = self.H * self.G
        self.S = rng.randint(1, max_tokens)
        self.D = rng.choice([1, 3, 8, 16])
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.lengths = [rng.randint(0, self.S) for _ in range(self.B)]
        padded = rng.random() < 0.3 if padded is None else padded
        # a larger token capacity, viewed down to S (all layers of a kind share extents and strides)
        self.capacity = self.S + (rng.randint(1, 5) if padded else 0)
        self.keys = [self._tensor() for _ in range(self.L)]
        self.values = [self._tensor() for _ in range(self.L)]
        self.Q = rng.randint(1, self.S)
        self.attention = []
        for _ in range(self.L):
            p = torch.softmax(torch.randn(self.B, self.Hq, self.Q, self.S) * 2, dim=-1)
            if ties:  # few distinct values: exact ties in scores and in curve entries
                p = torch.round(p * 4) / 4
            self.attention.append(p.to(device))

    def _tensor(self):
        S = self.capacity
        shape = [self.B, self.H, S, self.D] if self.layout == "bhsd" else [self.B, S, self.H, self.D]
        t = torch.randn(shape).to(self.dtype).to(self.device)
        return t.narrow(2 if self.layout == "bhsd" else 1, 0, self.S)

    def bhsd(self, t):
        """A [B, H, S, D] CPU view of a cache tensor."""
        t = t.cpu()
        return t if self.layout == "bhsd" else t.transpose(1, 2)

    def lengths_tensor(self):
        return torch.tensor(self.lengths, dtype=torch.int32, device=self.device)


def expected_compress(case, rows_of, heads, reason_order=True, **policy):
    """Reference results: per (l, b, h) new length and kept positions, or the Infeasible reason."""
    keep = {}
    reasons = []
    for b in range(case.B):
        rows = [[rows_of(l, b, h) for h in range(heads)] for l in range(case.L)]
        ns = [[case.lengths[b]] * heads for _ in range(case.L)]
        try:
            k, pos = ref.compress_keep(rows, ns, heads=heads, **policy)
        except ref.Infeasible as e:
            reasons.append(e.reason)
            continue
        for l in range(case.L):
            for h in range(heads):
                keep[(l, b, h)] = (k[l][h], pos[l][h])
    if reasons:
        order = ["infeasible_budget", "infeasible_bounds"]
        return None, sorted(reasons, key=order.index)[0]
    return keep, None


def check_cache(case, before, after, keep, heads):
    """Every (l, b, kv head): rows [0, k) are the kept rows in order, every other row kept its bytes."""
    for l in range(case.L):
        for kind in range(2):
            old = case.bhsd(before[kind][l])
            new = case.bhsd(after[kind][l])
            for b in range(case.B):
                for h in range(case.H):
                    k, pos = keep[(l, b, h if heads > 1 else 0)]
                    exp = old[b, h].clone()
                    exp[:k] = old[b, h, pos]
                    assert torch.equal(new[b, h], exp), \
                        "layer %d seq %d head %d kind %d" % (l, b, h, kind)


def run_compress(pkv, case, heads, rows_of, check_rows=True, **kw):
    """compress_ on clones of the case's cache vs the reference; returns the expected keep map (or the reason)."""
    policy = {k: kw[k] for k in ("evict_ratio", "keep_tokens", "profile", "allocation", "sinks", "recent",
                                 "min_keep", "max_keep") if k in kw}
    for k, v in (("allocation", "prefix"), ("sinks", 4), ("recent", 1), ("min_keep", 0), ("max_keep", 1 << 62)):
        policy.setdefault(k, v)
    keep, reason = expected_compress(case, rows_of, heads, **policy)
    keys = [t.clone() for t in case.keys]
    values = [t.clone() for t in case.values]
    before = ([t.clone() for t in keys], [t.clone() for t in values])
    args = dict(kw)
    if args.get("max_keep") == 1 << 62:
        args["max_keep"] = None
    if reason is not None:
        if case.device == "cpu":
            with pytest.raises(pkv.PrefixKVError) as e:
                pkv.compress_(keys, values, lengths=case.lengths_tensor(), layout=case.layout,
                              granularity="head" if heads > 1 else "layer", **args)
            assert e.value.reason == reason
        else:
            lengths, status = pkv.compress_(keys, values, lengths=case.lengths_tensor(), layout=case.layout,
                                            granularity="head" if heads > 1 else "layer", return_status=True, **args)
            assert pkv.REASONS[int(status.item())] == reason
            assert (lengths.cpu() == torch.tensor(case.lengths).view(1, -1, *([1] if heads > 1 else []))).all()
        for a, b in zip(before[0] + before[1], keys + values):
            assert torch.equal(a.cpu(), b.cpu()), "a rejected call touched the cache"
        return None
    lengths, status = pkv.compress_(keys, values, lengths=case.lengths_tensor(), layout=case.layout,
                                    granularity="head" if heads > 1 else "layer", return_status=True, **args)
    assert int(status.item()) == 0
    want = torch.tensor([[[keep[(l, b, h)][0] for h in range(heads)] for b in range(case.B)]
                         for l in range(case.L)], dtype=torch.int32)
    if heads == 1:
        want = want[..., 0]
    assert lengths.dtype == torch.int32 and lengths.device.type == case.device
    assert torch.equal(lengths.cpu(), want)
    if check_rows:
        check_cache(case, before, (keys, values), keep, heads)
    return keep


def attention_rows(case, heads):
    scores = [ref.attention_scores(p.cpu(), heads) for p in case.attention]
    return lambda l, b, h: scores[l][b, h]


# ---- compress_ ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_compress_attention_prefix(pkv, rng, device, dtype, layout):
    for _ in range(4):
        case = Case(rng, dtype, layout, device, ties=rng.random() < 0.4)
        heads = case.H if rng.random() < 0.5 else 1
        sinks, recent = rng.randint(0, 5), rng.randint(0, 3)
        if rng.random() < 0.7:
            budget = dict(evict_ratio=rng.choice([0.0, 0.3, 0.5, 0.6, 0.9, rng.random() * 0.99]))
        else:
            budget = dict(keep_tokens=rng.randint(0, case.L * case.S))
        bounds = {}
        if rng.random() < 0.3:
            bounds = dict(min_keep=rng.randint(0, 3), max_keep=rng.randint(3, 20))
        run_compress(pkv, case, heads, attention_rows(case, heads), attention=case.attention, sinks=sinks,
                     recent=recent, **budget, **bounds)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "profile"])
def test_compress_allocations(pkv, rng, device, allocation):
    for _ in range(4):
        case = Case(rng, rng.choice(DTYPES), rng.choice(["bhsd", "bshd"]), device)
        heads = case.H if rng.random() < 0.5 else 1
        kw = dict(allocation=allocation, sinks=rng.randint(0, 3), recent=rng.randint(0, 2))
        if allocation == "profile":
            kw["profile"] = [rng.random() * 0.9 for _ in range(case.L)]
        else:
            kw["evict_ratio"] = rng.random() * 0.8
        run_compress(pkv, case, heads, attention_rows(case, heads), attention=case.attention, **kw)


@pytest.mark.parametrize("device", devices())
def test_compress_caller_scores_recency_keynorm(pkv, rng, device):
    for _ in range(3):
        case = Case(rng, rng.choice(DTYPES), rng.choice(["bhsd", "bshd"]), device)
        heads = case.H if rng.random() < 0.5 else 1
        ratio = rng.random() * 0.7
        # caller scores (a padded score row: stride > the longest sequence)
        N = case.S + rng.randint(0, 3)
        shape = [case.L, case.B, heads, N] if heads > 1 else [case.L, case.B, N]
        scores = torch.rand(shape)
        if rng.random() < 0.5:
            scores = torch.round(scores * 3)  # ties
        run_compress(pkv, case, heads,
                     lambda l, b, h: scores[l, b, h] if heads > 1 else scores[l, b],
                     scorer="scores", scores=scores.to(device), evict_ratio=ratio)
        # recency (StreamingLLM with uniform)
        run_compress(pkv, case, heads, lambda l, b, h: ref.recency_scores(1, 1, case.S)[0, 0],
                     scorer="recency", allocation="uniform", evict_ratio=ratio)
        # key norm of the cached keys
        kn = [ref.key_norm_scores(case.bhsd(k), heads) for k in case.keys]
        run_compress(pkv, case, heads, lambda l, b, h: kn[l][b, h], scorer="key_norm", evict_ratio=ratio)


@pytest.mark.parametrize("device", devices())
def test_compress_window(pkv, rng, device):
    """Window scorer: scores come from exp/log, so the reference (float64) decides only where its margin at the
    budget boundary is clear of rounding; then the kept sets must be the same."""
    checked = 0
    for _ in range(12):
        case = Case(rng, torch.float32, rng.choice(["bhsd", "bshd"]), device, max_tokens=16, max_layers=2, max_batch=2)
        case.lengths = [rng.randint(1, case.S) for _ in range(case.B)]
        w = rng.randint(1, min(case.lengths))
        qshape = [case.B, case.Hq, w, case.D] if case.layout == "bhsd" else [case.B, w, case.Hq, case.D]
        queries = [torch.randn(qshape).to(device) for _ in range(case.L)]
        qb = [q.cpu() if case.layout == "bhsd" else q.cpu().transpose(1, 2) for q in queries]
        rows = {}
        for l in range(case.L):
            k = case.bhsd(case.keys[l])
            for b in range(case.B):
                n = case.lengths[b]
                rows[(l, b)] = ref.window_scores64(qb[l][b], k[b, :, :n], n, 1)
        ratio = rng.choice([0.3, 0.5])
        # margin: the candidates' global order near the cut must not hinge on rounding
        sc = torch.cat([rows[k][0] for k in rows])
        gaps = (sc.sort().values.diff().abs()).min() if sc.numel() > 1 else torch.tensor(1.0)
        if float(gaps) < 1e-5:
            continue
        checked += 1
        run_compress(pkv, case, 1, lambda l, b, h: rows[(l, b)][0].float(), scorer="window", queries=queries,
                     evict_ratio=ratio)
    assert checked > 0


@pytest.mark.parametrize("device", devices())
def test_compress_repeated_with_segment_lengths(pkv, rng, device):
    """Compress, then compress the result again with the per-segment lengths the first call returned."""
    L, B, H, D = 3, 2, 2, 4
    S = rng.randint(12, 40)
    lengths = torch.tensor([rng.randint(8, S) for _ in range(B)], dtype=torch.int32)
    keys = [torch.randn(B, H, S, D).half().to(device) for _ in range(L)]
    values = [torch.randn(B, H, S, D).half().to(device) for _ in range(L)]
    scores1 = torch.rand(L, B, S)
    n1 = pkv.compress_(keys, values, scorer="scores", scores=scores1.to(device), lengths=lengths.to(device),
                       evict_ratio=0.25, sinks=1, recent=1, check=True)
    k1 = [t.clone() for t in keys]
    v1 = [t.clone() for t in values]
    scores2 = torch.rand(L, B, S)
    n2 = pkv.compress_(keys, values, scorer="scores", scores=scores2.to(device), lengths=n1, evict_ratio=0.25,
                       sinks=1, recent=1, check=True)
    for b in range(B):
        rows = [[scores2[l, b]] for l in range(L)]
        ns = [[int(n1[l, b])] for l in range(L)]
        k, pos = ref.compress_keep(rows, ns, evict_ratio=0.25, sinks=1, recent=1)
        for l in range(L):
            assert int(n2[l, b]) == k[l][0]
            for old, new in ((k1[l], keys[l]), (v1[l], values[l])):
                assert torch.equal(new[b, :, :k[l][0]].cpu(), old[b, :, pos[l][0]].cpu())


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_compress_rejects_bad_input(pkv, rng, device):
    case = Case(rng, torch.float32, "bhsd", device, padded=False)
    keys = [t.clone() for t in case.keys]
    values = [t.clone() for t in case.values]
    snapshot = [t.clone() for t in keys + values]

    def untouched():
        for a, b in zip(snapshot, keys + values):
            assert torch.equal(a, b)

    def rejects(reason, **kw):
        args = dict(attention=case.attention, evict_ratio=0.0, sinks=0, recent=0)  # a budget always feasible
        args.update(kw)
        with pytest.raises(pkv.PrefixKVError) as e:
            pkv.compress_(args.pop("k", keys), args.pop("v", values), **args)
        assert e.value.reason == reason, str(e.value)
        assert isinstance(e.value, ValueError)
        untouched()

    rejects("shape_mismatch", v=values[:-1] + [values[-1][:, :, :0]])
    if case.L > 1:
        rejects("shape_mismatch", v=values[1:])
    rejects("bad_parameter", evict_ratio=1.0)  # (rejected by the plan before any data is read)
    rejects("bad_parameter", evict_ratio=-0.1)
    rejects("bad_parameter", scorer="nope")
    rejects("bad_parameter", layout="sbhd")
    rejects("null_pointer", attention=None, scorer="attention")
    rejects("shape_mismatch", attention=case.attention[:-1] + [case.attention[-1][:1].expand(case.B + 1, -1, -1, -1)])
    rejects("bad_parameter", k=[k.int() for k in keys], v=[v.int() for v in values])
    rejects("shape_mismatch", profile=[0.1] * (case.L + 1), allocation="profile")
    rejects("infeasible_bounds", min_keep=5, max_keep=2)
    rejects("shape_mismatch", lengths=torch.zeros(case.B + 1, dtype=torch.int32, device=device))
    if device == "cpu":  # device data: reported by the status on CUDA (test_cuda.py)
        rejects("out_of_range", lengths=torch.full((case.B,), case.S + 1, dtype=torch.int32))
        bad = [p.clone() for p in case.attention]
        bad[-1][0, 0, 0, 0] = float("nan")
        rejects("nonfinite_input", attention=bad)
        rejects("negative_input", attention=None, scorer="scores",
                scores=-torch.ones(case.L, case.B, case.S))


@pytest.mark.parametrize("device", devices())
def test_lengths_default_and_dtype(pkv, device):
    keys = [torch.randn(1, 2, 10, 4, device=device) for _ in range(2)]
    values = [torch.randn(1, 2, 10, 4, device=device) for _ in range(2)]
    out = pkv.compress_(keys, values, budget=10, scorer="recency", allocation="uniform", sinks=1, recent=1)
    assert out.shape == (2, 1) and out.dtype == torch.int32
    assert out.sum().item() == 10
    out = pkv.compress_(keys, None, budget=0.5, scorer="key_norm", lengths=out.to(torch.int64), sinks=1,
                        recent=1)  # K-only cache, per-segment int64 lengths
    assert out.sum().item() == 5


# ---- lower-level stages -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_curves_solve_select_gather(pkv, rng, device):
    for _ in range(6):
        S = rng.randint(1, 12)
        N = rng.randint(1, 50)
        sinks, recent = rng.randint(0, 4), rng.randint(0, 2)
        scores = torch.rand(S, N)
        if rng.random() < 0.4:
            scores = torch.round(scores * 3)
        lens = torch.tensor([rng.randint(0, N) for _ in range(S)])
        c = pkv.curves(scores.to(device), lens.to(device), sinks=sinks, recent=recent, check=True)
        off = c.offsets.cpu()
        for s in range(S):
            pos, cum = ref.curve(scores[s], int(lens[s]), sinks, recent)
            a, b = int(off[s]), int(off[s + 1])
            assert b - a == pos.numel()
            assert torch.equal(c.positions.cpu()[a:b].long(), pos)
            assert torch.equal(c.cumulative.cpu()[a:b], cum)
        # problems: consecutive groups of k rows
        k = rng.choice([d for d in range(1, S + 1) if S % d == 0])
        ratio = rng.random() * 0.8
        min_keep = rng.choice([0, 0, 1, 2])
        exp = []
        feasible = True
        for p in range(S // k):
            rows = [[scores[s]] for s in range(p * k, p * k + k)]
            ns = [[int(lens[s])] for s in range(p * k, p * k + k)]
            try:
                kk, _ = ref.compress_keep(rows, ns, evict_ratio=ratio, sinks=sinks, recent=recent, min_keep=min_keep)
                exp += [x[0] for x in kk]
            except ref.Infeasible:
                feasible = False
        if not feasible:
            if device == "cpu":
                with pytest.raises(pkv.PrefixKVError):
                    pkv.solve(c, evict_ratio=ratio, segments_per_problem=k, min_keep=min_keep)
            else:
                _, _, status = pkv.solve(c, evict_ratio=ratio, segments_per_problem=k, min_keep=min_keep)
                assert int(status.max()) != 0
            continue
        keep, thr, status = pkv.solve(c, evict_ratio=ratio, segments_per_problem=k, min_keep=min_keep)
        assert int(status.max()) == 0
        assert keep.cpu().tolist() == exp
        sel = pkv.select(c, keep, check=True)
        so = sel.offsets.cpu()
        for s in range(S):
            pos, _ = ref.curve(scores[s], int(lens[s]), sinks, recent)
            mask = ref.protected_mask(int(lens[s]), sinks, recent).clone()
            mask[pos[:exp[s] - (int(lens[s]) - pos.numel())]] = True
            assert sel.indices.cpu()[int(so[s]):int(so[s + 1])].long().tolist() == torch.nonzero(mask).flatten().tolist()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_in_place_and_out_of_place(pkv, rng, device, dtype):
    for _ in range(3):
        L, B, H, S, D = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 2, 4]), rng.randint(1, 30), rng.choice([2, 8])
        heads = H if rng.random() < 0.5 else 1
        layout = rng.choice(["bhsd", "bshd"])
        shape = [B, H, S, D] if layout == "bhsd" else [B, S, H, D]
        keys = [torch.randn(shape).to(dtype).to(device) for _ in range(L)]
        values = [torch.randn(shape).to(dtype).to(device) for _ in range(L)]
        segs = L * B * heads
        kept = []
        offsets = [0]
        for _ in range(segs):
            m = torch.rand(S) < 0.5
            idx = torch.nonzero(m).flatten()
            kept.append(idx)
            offsets.append(offsets[-1] + idx.numel())
        sel = pkv.Selection(torch.tensor(offsets, dtype=torch.int64, device=device),
                            torch.cat(kept + [torch.zeros(0, dtype=torch.int64)]).to(torch.int32).to(device),
                            torch.zeros(1, dtype=torch.int32))
        gran = "head" if heads > 1 else "layer"
        # out of place into a larger capacity
        cap = S + 2
        oshape = [B, H, cap, D] if layout == "bhsd" else [B, cap, H, D]
        ok = [torch.zeros(oshape, dtype=dtype, device=device) for _ in range(L)]
        ov = [torch.zeros(oshape, dtype=dtype, device=device) for _ in range(L)]
        n_out = pkv.gather(keys, values, sel, ok, ov, granularity=gran, layout=layout, check=True)
        k2 = [t.clone() for t in keys]
        v2 = [t.clone() for t in values]
        n_in = pkv.gather_(k2, v2, sel, granularity=gran, layout=layout, check=True)
        assert torch.equal(n_out.cpu(), n_in.cpu())
        tb = (lambda t: t.cpu()) if layout == "bhsd" else (lambda t: t.cpu().transpose(1, 2))
        for l in range(L):
            for b in range(B):
                for h in range(H):
                    s = (l * B + b) * heads + (h if heads > 1 else 0)
                    idx = kept[s]
                    assert int(n_in.reshape(-1)[s]) == idx.numel()
                    for src, o, ip in ((keys[l], ok[l], k2[l]), (values[l], ov[l], v2[l])):
                        src_b = tb(src)[b, h]
                        assert torch.equal(tb(o)[b, h, :idx.numel()], src_b[idx])
                        assert torch.equal(tb(ip)[b, h, :idx.numel()], src_b[idx])
                        assert torch.equal(tb(ip)[b, h, idx.numel():], src_b[idx.numel():])


def test_low_level_rejects(pkv):
    c = pkv.curves(torch.rand(3, 8), sinks=1, recent=1)
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.solve(c, evict_ratio=0.95)
    assert e.value.reason == "infeasible_budget"
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.curves(torch.rand(3, 8), torch.tensor([1, 9, 2]))
    assert e.value.reason == "out_of_range"
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.curves(-torch.rand(2, 4))
    assert e.value.reason == "negative_input"
    keep, _, _ = pkv.solve(c, evict_ratio=0.5)
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.select(c, keep + 100)
    assert e.value.reason == "out_of_range"
    keys = [torch.randn(1, 1, 8, 2)]
    sel = pkv.Selection(torch.tensor([0, 2]), torch.tensor([3, 1], dtype=torch.int32), torch.zeros(1))
    snapshot = keys[0].clone()
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.gather_(keys, None, sel)
    assert e.value.reason == "not_ascending"
    assert torch.equal(keys[0], snapshot)
