"""Data-parallel behaviour a mutation probe found unpinned (2026-12-07; tests/test_distributed.py passed on
each mutant). One 2-process gloo job (fork) runs every case; rank 0 saves its results, which are
compared here with single-process hessinv.optim.Newton runs (the independent reference).

D19: ``average`` strategy without ``d /= world_size`` (directions summed, not averaged).
D27: distribute() without the broadcast of rank 0's parameters.
D28: distribute() without setting the preconditioner's generator to rank 0's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hessinv.optim as ho
from hessinv.optim import distributed as hd

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo"
)

F64 = torch.float64
START = "fork" if sys.platform.startswith("linux") else "spawn"
STEPS, B = 6, 6  # local batch B, global 2B


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def _data():
    g = torch.Generator().manual_seed(1)
    n = STEPS * 2 * B
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _newton(model, seed=0):
    return ho.Newton(
        model, nn.CrossEntropyLoss(), mode="precondition", seed=seed, lr=0.5, curvature_batch_size=5,
        refresh=2, diagonal_damping=50.0, max_rank=5, basis="identity",
    )  # fmt: skip


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gathered(model, world):
    p = _flat(model)
    ps = [torch.empty_like(p) for _ in range(world)]
    torch.distributed.all_gather(ps, p)
    return [q.clone() for q in ps]


def _worker(rank: int, world: int, out: str) -> None:
    X, y = _data()
    res = {}
    # D19: every rank holds the same local batch (the global batch is it, twice): 'average' averages two
    # equal directions, so the run is the single-process run on that local batch
    model = _model()
    dp = hd.DataParallel(_newton(model), model, nn.CrossEntropyLoss(), "average")
    for t in range(STEPS):
        xb, yb = X[t * B : (t + 1) * B], y[t * B : (t + 1) * B]
        dp.step(torch.cat([xb, xb]), torch.cat([yb, yb]))
    res["average/same-data"] = _flat(model).clone()
    # D27: rank 1 builds its model from another seed: distribute() makes rank 0's parameters everyone's
    model = _model(seed=rank)
    dp = hd.DataParallel(_newton(model), model, nn.CrossEntropyLoss(), "sharded")
    res["broadcast/after-distribute"] = _gathered(model, world)
    for t in range(STEPS):
        dp.step(X[t * 2 * B : (t + 1) * 2 * B], y[t * 2 * B : (t + 1) * 2 * B])
    res["broadcast/final"] = _gathered(model, world)
    # D28: rank 1's Newton has another seed (the seed is not among the settings compared): distribute()
    # gives it rank 0's generators, so every rank draws the same curvature batch
    for strategy in ("sharded", "replicated"):
        model = _model()
        dp = hd.DataParallel(_newton(model, seed=rank), model, nn.CrossEntropyLoss(), strategy)
        for t in range(STEPS):
            dp.step(X[t * 2 * B : (t + 1) * 2 * B], y[t * 2 * B : (t + 1) * 2 * B])
        res[f"seed/{strategy}"] = _gathered(model, world)
    if rank == 0:
        torch.save(res, f"{out}/res.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mut")
    hd.launch(_worker, 2, (str(out),), timeout=60, join_timeout=240, start_method=START)
    return torch.load(Path(out) / "res.pt", weights_only=False)


def _one_process(global_batch: bool, seed: int = 0):
    X, y = _data()
    model = _model()
    opt = _newton(model, seed=seed)
    for t in range(STEPS):
        if global_batch:
            opt.step(X[t * 2 * B : (t + 1) * 2 * B], y[t * 2 * B : (t + 1) * 2 * B])
        else:
            opt.step(X[t * B : (t + 1) * B], y[t * B : (t + 1) * B])
    return _flat(model)


def test_average_of_equal_directions_is_that_direction(results):
    ref = _one_process(global_batch=False)
    assert not torch.equal(ref, _flat(_model()))  # it trained
    torch.testing.assert_close(results["average/same-data"], ref, rtol=1e-9, atol=1e-12)


def test_distribute_broadcasts_rank0_parameters(results):
    p0, p1 = results["broadcast/after-distribute"]
    assert torch.equal(p0, _flat(_model(seed=0)))
    assert torch.equal(p1, p0)
    q0, q1 = results["broadcast/final"]
    assert torch.equal(q0, q1)
    torch.testing.assert_close(q0, _one_process(global_batch=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["sharded", "replicated"])
def test_distribute_shares_rank0_generator(results, strategy):
    q0, q1 = results[f"seed/{strategy}"]
    assert torch.equal(q0, q1)
    torch.testing.assert_close(q0, _one_process(global_batch=True, seed=0), rtol=1e-9, atol=1e-12)
