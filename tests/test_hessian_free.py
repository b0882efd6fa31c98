"""The Hessian-free baseline (Martens 2010) against dense linear algebra on tiny problems."""

from __future__ import annotations

import math

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv.cli.baselines import FirstOrder, HessianFree, conjugate_gradient


def tiny_problem(loss: str = "ce", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    if loss == "ce":
        return net, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (10,), generator=g)
    return net, nn.MSELoss(), X, torch.randn(10, 2, generator=g, dtype=torch.float64)


def dense_ggn_and_gradient(net, loss_fn, X, y):
    """``G = J^T Lambda J`` and ``g`` by plain autograd (tests/reference.py; no torch.func)."""
    return autograd_gauss_newton(net, loss_fn, X, y), autograd_gradient_hessian(net, loss_fn, X, y)[0]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_hf_direction_equals_dense_damped_solve(loss, damping):
    net, loss_fn, X, y = tiny_problem(loss)
    G_dense, g = dense_ggn_and_gradient(net, loss_fn, X, y)
    n = G_dense.shape[0]
    d_dense = torch.linalg.solve(G_dense + damping * torch.eye(n, dtype=torch.float64), -g)

    opt = HessianFree(net, loss_fn, damping=damping, cg_max_iters=20 * n, cg_rtol=1e-15, cg_progress_eps=None)
    G = hessinv.gauss_newton(net, loss_fn, X, y)
    assert torch.allclose(G.gradient, g, rtol=1e-12, atol=1e-14)
    res = opt.direction(G)
    err = float((res.x - d_dense).norm() / d_dense.norm())
    assert err < 1e-8, (err, res.reason, res.iterations)
    assert torch.equal(opt.cg_solution, res.x)


def test_hf_step_warm_start_and_damping_adaptation():
    net, loss_fn, X, y = tiny_problem("mse", seed=1)
    opt = HessianFree(net, loss_fn, damping=1.0, cg_max_iters=40)
    losses = []
    for _ in range(15):
        losses.append(opt.step(X, y))
        s = opt.last_stats
        assert s.loss == losses[-1] and s.new_loss <= s.loss
        assert s.cg_iterations <= 40
    assert losses[-1] < 0.5 * losses[0]
    assert opt.damping != 1.0  # the reduction ratio moved lambda
    # Martens' rule: rho < 1/4 -> *3/2, rho > 3/4 -> *2/3
    before = opt.damping
    opt.step(X, y)
    rho = opt.last_stats.rho
    expected = before * 1.5 if rho < 0.25 else before * (2 / 3) if rho > 0.75 else before
    assert opt.damping == pytest.approx(expected)


def test_hf_rejects_a_step_that_does_not_decrease():
    net, loss_fn, X, y = tiny_problem("ce", seed=2)
    opt = HessianFree(net, loss_fn, damping=1e-12, lr=1e6, cg_max_iters=100, backtrack=False)
    before = [p.detach().clone() for p in net.parameters()]
    f0 = opt.step(X, y)
    s = opt.last_stats
    assert s.new_loss <= f0
    if s.step_size == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_conjugate_gradient_on_spd_matrix():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iters=500, rtol=1e-13, progress_eps=None)
    assert res.reason == "residual tolerance"
    assert torch.allclose(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    # kept iterates for backtracking: increasing, the last one is the solution
    its = [i for i, _ in res.iterates]
    assert its == sorted(set(its)) and its[-1] == res.iterations and torch.equal(res.iterates[-1][1], res.x)
    # the progress test truncates early
    short = conjugate_gradient(lambda v: A @ v, b, max_iters=500, progress_eps=5e-2)
    assert short.reason == "relative progress" and short.iterations < res.iterations


@pytest.mark.parametrize("kind, lr", [("sgd", 0.1), ("adam", 1e-2), ("lbfgs", 1.0)])
def test_first_order_baselines_decrease(kind, lr):
    net, loss_fn, X, y = tiny_problem("mse", seed=3)
    opt = FirstOrder(net, loss_fn, kind, lr)
    losses = [opt.step(X, y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert opt.last_stats.loss == losses[-1]
