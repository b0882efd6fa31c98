"""Influence, Laplace and diagnostics behaviour a mutation probe found unpinned (2026-12-07): each test
fails on the named mutant of the code. References: plain-autograd float64 derivatives, torch.optim's own
steps, textbook formulas. (The distributed influence case is in test_distributed.py.)"""

from __future__ import annotations

import math
import warnings

import torch
from reference import autograd_gradient_hessian, autograd_hessian, autograd_output_jacobian
from torch import nn
from torch.func import functional_call

F64 = torch.float64


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _unflat(net, x):
    out, i = {}, 0
    for n, p in net.named_parameters():
        out[n] = x[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


# -- influence.py ---------------------------------------------------------------------------------
def test_indefinite_hessian_with_perturbed_pivots_warns_indefinite_not_singular():
    """Kills: fit's AccuracyWarning branch taken on ``inertia.negative != 0`` (instead of ``== 0``): an
    indefinite H + lambda I whose sweep also perturbed pivots was reported as 'singular to working precision,
    no eigenvalue found negative' although 15 eigenvalues are negative."""
    from hessinv.errors import AccuracyWarning
    from hessinv.influence import InfluenceFunction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(3, 3, dtype=F64), torch.randint(0, 2, (3,))
    H = autograd_hessian(net, nn.CrossEntropyLoss(), X, y)
    neg = int((torch.linalg.eigvalsh(H + 1e-14 * torch.eye(len(H), dtype=F64)) < -1e-8).sum())
    assert neg > 0  # the reference: truly indefinite
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        inf = InfluenceFunction(net, nn.CrossEntropyLoss(), "hessian", damping=1e-14).fit(X, y)
    assert inf.inertia.negative > 0
    msgs = [(x.category, str(x.message)) for x in w]
    assert any("indefinite" in m for _, m in msgs), msgs
    assert not any(issubclass(c, AccuracyWarning) for c, _ in msgs), msgs


# -- laplace.py -----------------------------------------------------------------------------------
def test_nn_predictive_of_scalar_outputs_is_the_unbiased_sample_variance():
    """Kills: the (N,)-output branch of pred_type='nn' dividing by k instead of k - 1 (the (N, C) branch
    was pinned by an earlier probe). Reference: the network at the same posterior draws, torch.var
    (unbiased)."""
    from hessinv.laplace import Laplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    X, y = torch.randn(15, 2, dtype=F64), torch.randn(15, dtype=F64)
    la = Laplace(net, "regression", prior_precision=1.0).fit(X, y)
    k = 4
    mu, var = la(X[:3], pred_type="nn", n_samples=k, generator=torch.Generator().manual_seed(1))
    thetas = la.sample(k, torch.Generator().manual_seed(1))
    outs = torch.stack([functional_call(net, _unflat(net, th), (X[:3],)) for th in thetas])
    assert var.shape == (3,)
    torch.testing.assert_close(mu, outs.mean(0))
    torch.testing.assert_close(var, outs.var(0, unbiased=True))


# -- diagnostics.py -------------------------------------------------------------------------------
def test_adam_direction_is_the_step_torch_takes_in_every_setting():
    """Kills: amsgrad's max dropped, the groups' lr ratio dropped, AdamW's decoupled decay dropped, L2 decay
    of the wrong sign. Reference: torch.optim's own step, x - x+ = lr_max d, after two steps of history."""
    from hessinv.diagnostics import adam_direction, flat_parameters

    settings = [
        (torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
        (torch.optim.AdamW, dict(weight_decay=0.1)),
        (torch.optim.AdamW, dict(weight_decay=0.05, amsgrad=True)),
        (torch.optim.Adam, dict(weight_decay=0.3, decoupled_weight_decay=True)),
    ]
    for cls, kw in settings:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        groups = [{"params": net[0].parameters(), "lr": 0.01}, {"params": net[2].parameters(), "lr": 0.003}]
        opt = cls(groups, betas=(0.8, 0.9), eps=1e-3, **kw)
        for t in range(4):  # a shrinking loss: v falls below its running max (amsgrad matters)
            X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64) / (1 + 3 * t)
            opt.zero_grad()
            nn.functional.mse_loss(net(X), y).backward()
            if t < 3:
                opt.step()
        d = adam_direction(opt)
        x0 = flat_parameters(net)
        opt.step()
        torch.testing.assert_close(
            x0 - flat_parameters(net), 0.01 * d, rtol=1e-10, atol=1e-15, msg=str((cls, kw))
        )


def test_direction_alignments_newton_is_the_hessians_and_gauss_newton_the_gauss_newton_matrixs():
    """Kills: direction_alignments building 'newton' from the Gauss-Newton matrix and 'gauss_newton' from the
    Hessian. Reference: dense H by double backward, G = (2 / N) J^T J of the mean squared error, both positive
    definite here (so no damping), cos = <C^-1 g, x - x*> / (|C^-1 g| |x - x*|)."""
    from hessinv.diagnostics import direction_alignments

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1), nn.Tanh()).double()
    X = torch.randn(40, 3, dtype=F64)
    y = torch.tanh(X @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=F64) + 0.3)
    x_star = torch.tensor([1.5, -2.0, 0.5, 0.3], dtype=F64)
    with torch.no_grad():  # near x*, where H is positive definite (and differs from G)
        net[0].weight.copy_(torch.tensor([[1.2, -1.6, 0.9]], dtype=F64))
        net[0].bias.fill_(-0.1)
    lf = nn.MSELoss()
    H = autograd_hessian(net, lf, X, y)
    J = autograd_output_jacobian(net, X)[:, 0]
    G = 2.0 / len(X) * J.T @ J
    assert float(torch.linalg.eigvalsh(H)[0]) > 0 and float(torch.linalg.eigvalsh(G)[0]) > 0
    g = autograd_gradient_hessian(net, lf, X, y)[0]
    e = _flat(net) - x_star

    def cos(d):
        return float(d @ e / (d.norm() * e.norm()))

    ref = {"newton": cos(torch.linalg.solve(H, g)), "gauss_newton": cos(torch.linalg.solve(G, g))}
    assert abs(ref["newton"] - ref["gauss_newton"]) > 1e-3  # the two directions differ here
    got = direction_alignments(net, lf, X, y, x_star, which=("newton", "gauss_newton"))
    for k in ref:
        assert math.isclose(got[k], ref[k], rel_tol=0, abs_tol=1e-9), (k, got[k], ref[k])


def test_stochastic_best_factor_is_one_when_the_mean_direction_points_away():
    """Kills: predicted_best = (sin^2 + nu) / (1 + nu) also for cos_bar <= 0. Textbook: with <m, e> <= 0 the
    best eta >= 0 is 0, factor 1 -- the minimum over eta >= 0 of the mean of |e - eta d_i|^2 / |e|^2."""
    from hessinv.diagnostics import stochastic_contraction

    e = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    D = torch.tensor([[-1.0, 0.5, 0.0], [-0.5, -0.5, 1.0], [-0.3, 0.0, -1.0]], dtype=F64)  # m . e < 0
    s = stochastic_contraction(D, e, torch.zeros(3, dtype=F64), eta=0.1)
    etas = torch.linspace(0, 5, 5001, dtype=F64)
    obs = torch.stack([((e - t * D) ** 2).sum(1).mean() / (e @ e) for t in etas])
    assert s.cos_bar < 0 and s.best_eta == 0.0
    assert math.isclose(s.predicted_best, float(obs.min()), abs_tol=1e-12) and float(obs.min()) == 1.0
