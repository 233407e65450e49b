import os
import random
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
sys.path.insert(0, HERE)

torch = pytest.importorskip("torch")


def pytest_report_header(config):
    return "torch %s, CUDA %s" % (torch.__version__, "available" if torch.cuda.is_available() else "not available")


@pytest.fixture(scope="session")
def pkv():
    import prefixkv_torch

    prefixkv_torch.load()
    return prefixkv_torch


@pytest.fixture
def rng():
    """A random generator seeded per test; PREFIXKV_TEST_SEED=<seed> replays a run (the seed is printed on failure)."""
    seed = int(os.environ.get("PREFIXKV_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
    r = random.Random(seed)
    r.seed_value = seed
    torch.manual_seed(seed)
    return r


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.when == "call" and rep.failed and "rng" in item.funcargs:
        rep.sections.append(("seed", "PREFIXKV_TEST_SEED=%d" % item.funcargs["rng"].seed_value))


def devices():
    d = ["cpu"]
    if torch.cuda.is_available():
        d.append("cuda")
    return d
