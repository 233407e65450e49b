"""CUDA-only checks: the device path gives the host path's bytes, never synchronises with the host, reports problems
in device data through its status tensor, can be captured into a CUDA graph and (PyTorch >= 2.4) compiled."""

import pytest
import torch

from test_ops import Case, DTYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def host_and_device(pkv, case, **kw):
    """Run compress_ on a CPU copy and on the CUDA cache; return both (lengths, status, keys, values)."""
    out = []
    for dev in ("cpu", "cuda"):
        keys = [t.to(dev).clone() for t in case.keys]
        values = [t.to(dev).clone() for t in case.values]
        args = {k: ([x.to(dev) for x in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                    else v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        n, st = pkv.compress_(keys, values, lengths=case.lengths_tensor().to(dev), layout=case.layout,
                              return_status=True, **args)
        out.append((n.cpu(), st.cpu(), [t.cpu() for t in keys], [t.cpu() for t in values]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scorer", ["attention", "window", "key_norm", "recency", "scores"])
def test_device_equals_host(pkv, rng, dtype, scorer):
    for _ in range(3):
        case = Case(rng, dtype, rng.choice(["bhsd", "bshd"]), "cuda", max_tokens=300)
        gran = rng.choice(["layer", "head"])
        kw = dict(evict_ratio=rng.random() * 0.6, granularity=gran, sinks=rng.randint(0, 4), recent=rng.randint(0, 2),
                  allocation=rng.choice(["prefix", "prefix", "uniform", "pyramid"]))
        if scorer == "attention":
            kw["attention"] = case.attention
        elif scorer == "window":
            case.lengths = [rng.randint(1, case.S) for _ in range(case.B)]
            w = rng.randint(1, min(case.lengths))
            shape = [case.B, case.Hq, w, case.D] if case.layout == "bhsd" else [case.B, w, case.Hq, case.D]
            kw["queries"] = [torch.randn(shape).to(dtype).cuda() for _ in range(case.L)]
            if rng.random() < 0.5:  # a caller's LSE (any finite values serve for host == device)
                kw["lse"] = [torch.rand(case.B, case.Hq, w).cuda() * 4 + 4 for _ in range(case.L)]
        elif scorer == "scores":
            heads = case.H if gran == "head" else 1
            shape = [case.L, case.B, heads, case.S] if gran == "head" else [case.L, case.B, case.S]
            kw["scores"] = torch.rand(shape).cuda()
        kw["scorer"] = scorer
        if not _feasible(pkv, case, kw):
            continue
        (nh, sh, kh, vh), (nd, sd, kd, vd) = host_and_device(pkv, case, **kw)
        assert torch.equal(nh, nd) and torch.equal(sh, sd)
        for a, b in zip(kh + vh, kd + vd):
            assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                               b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32))


def _feasible(pkv, case, kw):
    """Whether the host path accepts the call (the device path is compared only on accepted calls)."""
    keys = [t.cpu().clone() for t in case.keys]
    args = {k: ([x.cpu() for x in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                else v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    try:
        pkv.compress_(keys, None, lengths=case.lengths_tensor().cpu(), layout=case.layout, **args)
        return True
    except pkv.PrefixKVError:
        return False


def test_status_reports_device_problems(pkv):
    keys = [torch.randn(2, 2, 16, 8, device="cuda") for _ in range(3)]
    values = [torch.randn(2, 2, 16, 8, device="cuda") for _ in range(3)]
    snapshot = [t.clone() for t in keys + values]
    scores = torch.rand(3, 2, 16, device="cuda")
    scores[1, 1, 5] = float("nan")
    n, st = pkv.compress_(keys, values, scores=scores, evict_ratio=0.5, return_status=True)
    assert pkv.REASONS[int(st.item())] == "nonfinite_input"
    assert (n == 16).all()
    for a, b in zip(snapshot, keys + values):
        assert torch.equal(a, b)
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.compress_(keys, values, scores=scores, evict_ratio=0.5, check=True)
    assert e.value.reason == "nonfinite_input"
    too_long = torch.tensor([16, 17], dtype=torch.int32, device="cuda")
    n, st = pkv.compress_(keys, values, scores=torch.rand(3, 2, 17, device="cuda"), lengths=too_long, evict_ratio=0.5,
                          return_status=True)
    assert pkv.REASONS[int(st.item())] == "out_of_range"
    # a caller's selection whose offsets run past its indices: nothing moves, out_of_range
    sel = pkv.Selection(torch.tensor([0, 3, 3, 3, 3, 3, 3], device="cuda"),
                        torch.tensor([0, 1], dtype=torch.int32, device="cuda"), None)
    pkv.gather_(keys, values, sel)
    with pytest.raises(pkv.PrefixKVError) as e:
        pkv.gather_(keys, values, sel, check=True)
    assert e.value.reason == "out_of_range"
    for a, b in zip(snapshot, keys + values):
        assert torch.equal(a, b)


def test_no_host_sync(pkv):
    """The CUDA path enqueues everything without synchronising (torch's sync debug mode raises on a sync)."""
    keys = [torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.float16) for _ in range(4)]
    values = [torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.float16) for _ in range(4)]
    probs = [torch.softmax(torch.randn(1, 8, 256, 256, device="cuda"), -1) for _ in range(4)]
    lengths = torch.full((1,), 256, dtype=torch.int32, device="cuda")
    pkv.compress_(keys, values, attention=probs, evict_ratio=0.5, lengths=lengths)  # warm-up (device facts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = pkv.compress_(keys, values, attention=probs, evict_ratio=0.5, lengths=lengths)
        c = pkv.curves(torch.rand(8, 128, device="cuda"))
        keep, _, _ = pkv.solve(c, evict_ratio=0.5, segments_per_problem=4)
        sel = pkv.select(c, keep)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(n.sum()) == 4 * 256 - 512


def test_cuda_graph_capture_and_replay(pkv):
    L, H, S, D = 4, 2, 128, 32
    keys = [torch.randn(1, H, S, D, device="cuda") for _ in range(L)]
    values = [torch.randn(1, H, S, D, device="cuda") for _ in range(L)]
    probs = [torch.softmax(torch.randn(1, 4, 16, S, device="cuda"), -1) for _ in range(L)]
    lengths = torch.full((1,), S, dtype=torch.int32, device="cuda")
    k0 = [t.clone() for t in keys]
    v0 = [t.clone() for t in values]
    # eager reference
    ke = [t.clone() for t in keys]
    ve = [t.clone() for t in values]
    ne = pkv.compress_(ke, ve, attention=probs, evict_ratio=0.5, lengths=lengths)
    pkv.compress_([t.clone() for t in keys], [t.clone() for t in values], attention=probs, evict_ratio=0.5,
                  lengths=lengths)  # warm-up on the side stream is done by torch.cuda.graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ng = pkv.compress_(keys, values, attention=probs, evict_ratio=0.5, lengths=lengths)
    for _ in range(2):  # replay on a fresh copy of the cache
        for t, t0 in zip(keys + values, k0 + v0):
            t.copy_(t0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(ng, ne)
        for a, b in zip(keys + values, ke + ve):
            assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(torch.library, "register_fake"), reason="torch.compile support needs PyTorch >= 2.4")
def test_torch_compile(pkv):
    def step(keys, values, probs):
        n = pkv.compress_(keys, values, attention=probs, evict_ratio=0.5)
        return n.sum()

    compiled = torch.compile(step, fullgraph=True)
    keys = [torch.randn(1, 2, 64, 16, device="cuda") for _ in range(2)]
    values = [torch.randn(1, 2, 64, 16, device="cuda") for _ in range(2)]
    probs = [torch.softmax(torch.randn(1, 2, 8, 64, device="cuda"), -1) for _ in range(2)]
    ke = [t.clone() for t in keys]
    ve = [t.clone() for t in values]
    want = step(ke, ve, probs)
    got = compiled(keys, values, probs)
    assert int(got) == int(want)
    for a, b in zip(keys + values, ke + ve):
        assert torch.equal(a, b)
