#!/usr/bin/env python3
"""Run tests/python without pytest (for machines that have PyTorch but not pytest): pytest itself when it is
installed, else a minimal stand-in that understands what these tests use (parametrize, skipif, raises,
importorskip, the `pkv` and `rng` fixtures). Prints one line per test and 'N passed, N failed, N skipped'.

    python3 tests/python/minirun.py [-k SUBSTRING] [-x]
"""

import importlib
import inspect
import os
import random
import sys
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


class Skipped(Exception):
    pass


def make_pytest():
    m = types.ModuleType("pytest")

    class Mark:
        def parametrize(self, names, values):
            def deco(f):
                f.__dict__.setdefault("_params", []).insert(0, ([n.strip() for n in names.split(",")], list(values)))
                return f
            return deco

        def skipif(self, cond, reason=""):
            def deco(f):
                if cond:
                    f._skip = reason
                return f
            if cond:  # also as a module-level `pytestmark`
                deco._skip = reason
            return deco

        def __getattr__(self, name):  # other marks: no-ops
            return lambda *a, **k: (lambda f: f)

    class Raises:
        def __init__(self, exc):
            self.exc, self.value = exc, None

        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if et is None:
                raise AssertionError("DID NOT RAISE %s" % self.exc)
            if not issubclass(et, self.exc):
                return False
            self.value = ev
            return True

    def importorskip(name):
        try:
            return importlib.import_module(name)
        except ImportError:
            raise Skipped("no module %s" % name)

    m.mark = Mark()
    m.raises = Raises
    m.importorskip = importorskip
    m.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    m.hookimpl = lambda *a, **k: (lambda f: f)
    m.skip = lambda reason="": (_ for _ in ()).throw(Skipped(reason))
    return m


def main():
    args = sys.argv[1:]
    try:
        import pytest  # noqa: F401

        if "--no-pytest" not in args:
            sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", HERE] + args))
    except ImportError:
        pass
    args = [a for a in args if a != "--no-pytest"]
    sys.modules["pytest"] = make_pytest()
    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.path.insert(0, HERE)
    pattern = args[args.index("-k") + 1] if "-k" in args else ""
    stop_first = "-x" in args
    import prefixkv_torch
    import torch

    prefixkv_torch.load()
    passed = failed = skipped = 0
    for fname in sorted(os.listdir(HERE)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        mod = importlib.import_module(fname[:-3])
        for name in sorted(dir(mod)):
            f = getattr(mod, name)
            if not (name.startswith("test_") and callable(f)):
                continue
            params = getattr(f, "_params", [])
            combos = [dict()]
            for names, values in params:
                combos = [dict(c, **dict(zip(names, v if len(names) > 1 else (v,)))) for c in combos for v in values]
            for c in combos:
                tid = "%s::%s[%s]" % (fname, name, "-".join(str(v) for v in c.values()))
                if pattern and pattern not in tid:
                    continue
                skip = getattr(f, "_skip", None) or getattr(getattr(mod, "pytestmark", None), "_skip", None)
                if skip:
                    skipped += 1
                    print("SKIP %s (%s)" % (tid, skip))
                    continue
                seed = int(os.environ.get("PREFIXKV_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
                rng = random.Random(seed)
                rng.seed_value = seed
                torch.manual_seed(seed)
                kw = dict(c)
                for p in inspect.signature(f).parameters:
                    if p == "pkv":
                        kw[p] = prefixkv_torch
                    elif p == "rng":
                        kw[p] = rng
                try:
                    f(**kw)
                    passed += 1
                    print("PASS %s" % tid)
                except Skipped as e:
                    skipped += 1
                    print("SKIP %s (%s)" % (tid, e))
                except Exception:
                    failed += 1
                    print("FAIL %s  PREFIXKV_TEST_SEED=%d\n%s" % (tid, seed, traceback.format_exc()))
                    if stop_first:
                        break
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
