"""Regression tests of diagnostics / influence fixes, each against an independent reference (plain
autograd, dense torch, or torch.optim itself)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import hessinv
import hessinv.diagnostics as dg
from hessinv.influence import output_jacobians, per_example_gradients

f64 = torch.float64


def _tied() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    other = nn.Linear(3, 3)
    m = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), other, nn.Linear(3, 2)).double()
    other.weight = shared.weight  # a parameter held by two modules too
    return m


def _flat_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params, strict=True)]
    )


# -- 1: tied parameters through the vmap fallback -----------------------------------------------------
def test_per_example_gradients_tied_parameters_exact_and_model_intact():
    m = _tied()
    X, Y = torch.randn(5, 3, dtype=f64), torch.randn(5, 2, dtype=f64)
    lf = nn.MSELoss()
    params = list(m.parameters())
    objects = [(mod, name, p) for mod in m.modules() for name, p in mod.named_parameters(recurse=False)]
    g_before = _flat_grads(lf(m(X), Y), params)
    G = per_example_gradients(m, lf, X, Y)
    ref = torch.stack([_flat_grads(lf(m(X[i : i + 1]), Y[i : i + 1]), params) for i in range(5)])
    assert torch.allclose(G, ref, rtol=1e-12, atol=1e-14)
    assert all(type(p) is nn.Parameter and mod._parameters[n] is p for mod, n, p in objects)
    assert torch.equal(_flat_grads(lf(m(X), Y), list(m.parameters())), g_before)
    copy.deepcopy(m)


def test_output_jacobians_tied_parameters_exact_and_model_intact():
    m = _tied()
    X = torch.randn(4, 3, dtype=f64)
    params = list(m.parameters())
    J = output_jacobians(m, X)
    out = m(X)
    ref = torch.stack([torch.stack([_flat_grads(out[i, c], params) for c in range(2)]) for i in range(4)])
    assert torch.allclose(J, ref, rtol=1e-12, atol=1e-14)
    assert all(type(p) is nn.Parameter for p in m.parameters())
    assert m[0].weight is m[2].weight is m[4].weight
    copy.deepcopy(m)


# -- 2: the minimizer certificate comes from the Hessian ----------------------------------------------
def _dense_hessian(m, lf, X, Y):
    ps = list(m.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(lf(m(X), Y), ps, create_graph=True)])
    rows = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], ps, retain_graph=True)])
        for i in range(len(g))
    ]
    return torch.stack(rows).detach(), g.detach()


def test_estimate_minimizer_gauss_newton_reports_the_hessian_eigenvalue_at_a_saddle():
    torch.manual_seed(18)
    X, Y = torch.randn(12, 2, dtype=f64), torch.randn(12, 1, dtype=f64)
    m = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 1)).double()
    lf = nn.MSELoss()
    for _ in range(60):  # undamped dense Newton to a critical point (a saddle for this seed)
        H, g = _dense_hessian(m, lf, X, Y)
        d = torch.linalg.solve(H, g)
        d = d * min(1.0, 5 / float(d.norm()))
        dg.set_flat_parameters(m, dg.flat_parameters(m) - d)
    H, g = _dense_hessian(m, lf, X, Y)
    lam_h = float(torch.linalg.eigvalsh(H)[0])
    assert lam_h < -1e-3 and float(g.norm()) < 1e-12  # the reference: a saddle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = dg.estimate_minimizer(m, lf, X, Y, curvature="gauss_newton")
    assert torch.equal(est.x, dg.flat_parameters(m))
    assert est.min_eigenvalue == pytest.approx(lam_h, rel=1e-8)  # not lambda_min(G) > 0


# -- 3: no cancellation near convergence ---------------------------------------------------------------
def test_analyze_step_and_tracker_without_cancellation():
    torch.manual_seed(0)
    n = 20
    net = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(1, n, dtype=f64) * 0.1)
    tr = dg.AlignmentTracker(net, torch.zeros(n, dtype=f64))
    best, obs = [], []
    for _ in range(6):  # |e+| = |e|^2: quadratic convergence, cos -> 1
        e = net[0].weight.detach().reshape(-1).clone()
        u = torch.randn(n, dtype=f64)
        u -= (u @ e) / (e @ e) * e
        u /= u.norm()
        e_next = float(e.norm()) * (0.6 * e + 0.8 * float(e.norm()) * u)
        with torch.no_grad():
            net[0].weight.copy_(e_next.reshape(1, n))
        d = e - e_next
        best.append(float((e - (d @ e) / (d @ d) * d).norm() ** 2 / (e @ e)))
        obs.append(float(e_next @ e_next / (e @ e)))
        r = tr.update()
        assert r.predicted_best == pytest.approx(best[-1], rel=1e-6)
        assert r.predicted_step == pytest.approx(obs[-1], rel=1e-6)
    assert best[-1] < 1e-20
    gm = math.exp(sum(map(math.log, best)) / len(best))
    assert tr.summary()["geomean_predicted_best"] == pytest.approx(gm, rel=1e-5)


def test_tracker_summary_geomean_with_exact_zero():
    x_star = torch.zeros(2, dtype=f64)
    net = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    tr = dg.AlignmentTracker(net, x_star)
    with torch.no_grad():
        net[0].weight.mul_(0.5)  # perfectly aligned: 1 - cos^2 = 0 exactly
    tr.update()
    s = tr.summary()
    assert s["geomean_predicted_best"] == 0.0
    assert s["geomean_observed"] == pytest.approx(0.25)


# -- 4: Adam's per-group learning rates -----------------------------------------------------------------
def test_adam_direction_uses_each_groups_lr():
    torch.manual_seed(0)
    X, Y = torch.randn(20, 3, dtype=f64), torch.randn(20, 2, dtype=f64)
    lf = nn.MSELoss()
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.Adam(
        [
            {"params": m[0].parameters(), "lr": 1e-1, "betas": (0.8, 0.99)},
            {"params": m[2].parameters(), "lr": 1e-4, "eps": 1e-6},
        ]
    )
    for _ in range(3):
        opt.zero_grad()
        lf(m(X), Y).backward()
        opt.step()
    opt.zero_grad()
    lf(m(X), Y).backward()
    d = dg.adam_direction(opt)
    x0 = dg.flat_parameters(m)
    opt.step()
    taken = x0 - dg.flat_parameters(m)  # what torch.optim.Adam did
    assert torch.allclose(1e-1 * d, taken, rtol=1e-9, atol=1e-15)


# -- 5 / 10: the batch is checked like the chain's --------------------------------------------------
def _mlp(out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).double()


def test_gradient_direction_refuses_broadcasting_targets():
    m = _mlp(1)
    X, y = torch.randn(6, 3, dtype=f64), torch.randn(6, dtype=f64)
    with pytest.raises(hessinv.ShapeMismatchError):
        dg.gradient_direction(m, nn.MSELoss(), X, y)
    with pytest.raises(hessinv.ShapeMismatchError):
        dg.direction_alignments(m, nn.MSELoss(), X, y, torch.zeros(21, dtype=f64), which=("gradient",))
    g = dg.gradient_direction(m, nn.MSELoss(), X, y[:, None])  # the right shape: the plain gradient
    ref = _flat_grads(nn.MSELoss()(m(X), y[:, None]), list(m.parameters()))
    assert torch.allclose(g, ref, rtol=1e-13, atol=0)


def test_named_errors_for_dtype_batch_and_list_arguments():
    m = _mlp()
    X, Y = torch.randn(6, 3, dtype=f64), torch.randn(6, 2, dtype=f64)
    lf = nn.MSELoss()
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(hessinv.DtypeMismatchError):
        dg.gradient_direction(m, lf, X.float(), Y)
    with pytest.raises(hessinv.ShapeMismatchError):
        dg.gradient_direction(m, lf, X, Y[:4])
    with pytest.raises(hessinv.DtypeMismatchError):
        output_jacobians(m, X.float())
    with pytest.raises(hessinv.InvalidArgumentError):
        dg.adam_direction(opt, [0.0] * 26)
    with pytest.raises(hessinv.InvalidArgumentError):
        dg.set_flat_parameters(m, [0.0] * 26)
    tied = _tied()  # no chain: the same checks on the whole model
    with pytest.raises(hessinv.DtypeMismatchError):
        dg.gradient_direction(tied, lf, X.float(), Y)
    with pytest.raises(hessinv.ShapeMismatchError):
        dg.gradient_direction(tied, lf, X, Y[:, :1])


# -- 6: a negative step -----------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.5, -0.5, -2.0])
def test_step_ratio_is_signed_and_predicts_the_observed_factor(eta):
    torch.manual_seed(0)
    x, xs, d = (torch.randn(6, dtype=f64) for _ in range(3))
    rho = dg.step_ratio(d, x, xs, eta)
    assert rho == pytest.approx(eta * float(d.norm()) / float((x - xs).norm()), rel=1e-14)
    pred = dg.predicted_contraction(dg.alignment(d, x, xs), rho)
    assert pred == pytest.approx(dg.observed_contraction(x, x - eta * d, xs), rel=1e-12)


# -- 7: a zero mean at rounding level -----------------------------------------------------------------
def test_stochastic_contraction_symmetric_draws():
    torch.manual_seed(0)
    x, xs = torch.randn(6, dtype=f64), torch.randn(6, dtype=f64)
    D = torch.randn(5, 6, dtype=f64) + (x - xs)
    D2 = torch.cat([D, -D])  # mean 0 in exact arithmetic
    r = dg.stochastic_contraction(D2, x, xs, 0.4)
    e = x - xs
    tr_cov = float((D2**2).sum(1).mean())
    assert math.isnan(r.cos_bar) and r.nu == math.inf and r.rho_bar == 0.0
    assert r.predicted == pytest.approx(1 + 0.16 * tr_cov / float(e @ e), rel=1e-12)
    assert r.predicted == pytest.approx(r.observed_mean, rel=1e-12)


# -- 8: no spinning in place --------------------------------------------------------------------------
def test_estimate_minimizer_stops_when_it_cannot_progress():
    torch.manual_seed(0)
    X = torch.randn(200, 2, dtype=f64)
    Y = 100 * (torch.tanh(X @ torch.randn(2, 1, dtype=f64)) + 0.3 * torch.randn(200, 1, dtype=f64))
    m = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 1)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = dg.estimate_minimizer(m, nn.MSELoss(reduction="sum"), X, Y, max_iter=200)
    assert not e.converged and e.stopped == "stalled" and e.iterations < 60
    net = copy.deepcopy(m)
    dg.set_flat_parameters(net, e.x)
    g = _flat_grads(nn.MSELoss(reduction="sum")(net(X), Y), list(net.parameters()))
    assert float(g.norm()) < 1e-8  # it did reach the minimizer: its rounding floor, above gtol


# -- 9: scale-free ratios -----------------------------------------------------------------------------
@pytest.mark.parametrize("s", [1e-200, 1e200])
def test_ratios_are_scale_free(s):
    torch.manual_seed(0)
    x, xs, d = (torch.randn(5, dtype=f64) for _ in range(3))
    xn = x - 0.3 * d
    assert dg.step_ratio(s * d, s * x, s * xs) == pytest.approx(float(d.norm() / (x - xs).norm()), rel=1e-14)
    assert dg.best_step(s * d, s * x, s * xs) == pytest.approx(float(d @ (x - xs) / (d @ d)), rel=1e-14)
    ref_obs = float((xn - xs) @ (xn - xs) / ((x - xs) @ (x - xs)))
    assert dg.observed_contraction(s * x, s * xn, s * xs) == pytest.approx(ref_obs, rel=1e-12)
    D = torch.randn(4, 5, dtype=f64) + (x - xs)
    a, b = dg.stochastic_contraction(D, x, xs, 0.5), dg.stochastic_contraction(s * D, s * x, s * xs, 0.5)
    for k in ("cos_bar", "nu", "rho_bar", "predicted", "predicted_best", "best_eta", "observed_mean"):
        assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-12), k


# -- 11: validation ---------------------------------------------------------------------------------
def test_validation_of_arguments():
    m = _mlp()
    X, Y = torch.randn(6, 3, dtype=f64), torch.randn(6, 2, dtype=f64)
    with pytest.raises(hessinv.NonFiniteError):
        output_jacobians(m, X * float("nan"))
    for kw in ({"gtol": -1.0}, {"gtol": float("nan")}, {"max_iter": -1}, {"max_iter": 2.5}):
        with pytest.raises(hessinv.InvalidArgumentError):
            dg.estimate_minimizer(m, nn.MSELoss(), X, Y, **kw)
    with pytest.raises(hessinv.InvalidArgumentError):
        dg.predicted_contraction(1.5)
    with pytest.raises(hessinv.InvalidArgumentError):
        dg.predicted_contraction(-1.5, rho=0.5)
    with pytest.raises(hessinv.NonFiniteError):
        dg.stochastic_contraction(
            torch.full((2, 3), float("nan"), dtype=f64), torch.ones(3), torch.zeros(3), 0.1
        )


def test_estimate_minimizer_strict_only_beyond_rounding():
    """Least squares with 2 examples and 3 weights: a line of minimizers, lambda_min exactly 0, computed
    as +1e-17..+2e-15 (8 of 12 seeds 'certified' a strict minimizer by its sign); with 4 examples the
    minimizer is strict."""
    for seed in range(6):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
        X, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
        est = dg.estimate_minimizer(net, nn.MSELoss(), X, y)
        assert est.converged and not est.strict
        X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
        est = dg.estimate_minimizer(net, nn.MSELoss(), X, y)
        assert est.converged and est.strict and est.min_eigenvalue > 1e-3


def test_alignment_with_a_null_direction_of_the_metric_is_nan():
    """|d|_G = 0 for d in the null space of a Gauss-Newton metric: the cosine is undefined (rounding gave
    anything in [-1, 1], best_step +-1e15)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    G = hessinv.gauss_newton(net, nn.MSELoss(), X, y)
    w, V = torch.linalg.eigh(G.to_dense())
    assert float(w[0]).__abs__() < 1e-12 * float(w[-1])  # the premise: a null space
    x = dg.flat_parameters(net)
    for i in range(4):
        assert math.isnan(dg.alignment(V[:, i], x, x - V[:, -1], metric=G))
        assert math.isnan(dg.best_step(V[:, i], x, x - V[:, -1], metric=G))
        assert dg.step_ratio(V[:, i], x, x - V[:, -1], metric=G) == 0.0
    # a direction with a real component along the range still has its cosine
    c = dg.alignment(V[:, 0] + V[:, -1], x, x - V[:, -1], metric=G)
    assert c == pytest.approx(1.0, abs=1e-8)


def test_a_small_but_real_metric_norm_is_not_taken_for_zero():
    """float32 diag(1, ..., 1, 1e-3) (n = 1000): e_n's norm 1e-3 is far above the product's rounding; the
    first rounding bound (n u ||W||_F) zeroed it and every cosine with it came out nan."""
    n = 1000
    w = torch.ones(n)
    w[-1] = 1e-3
    e, z = torch.zeros(n), torch.zeros(n)
    e[-1] = 1.0
    W = torch.diag(w)
    assert dg.alignment(e, e, z, metric=W) == pytest.approx(1.0)
    assert dg.best_step(e, e, z, metric=W) == pytest.approx(1.0)
    assert dg.step_ratio(e, e, z, metric=W) == pytest.approx(1.0)


def test_newton_direction_checks_the_operator_it_is_given():
    """An operator of another model gave a direction of that model's length; one of the other curvature
    than asked was used silently; a numpy gradient raised a raw AttributeError (found by a review)."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    lf = nn.CrossEntropyLoss()
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    other = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(hessinv.InvalidArgumentError, match="another model"):
        dg.newton_direction(m, lf, X, y, operator=hessinv.hessian(other, lf, X, y))
    with pytest.raises(hessinv.InvalidArgumentError, match="but operator is a Hessian"):
        dg.newton_direction(m, lf, X, y, curvature="gauss_newton", operator=hessinv.hessian(m, lf, X, y))
    with pytest.raises(hessinv.InvalidArgumentError, match="gradient must be a torch.Tensor"):
        dg.newton_direction(m, lf, X, y, gradient=torch.ones(43, dtype=torch.float64).numpy())
    for model, built_on in ((list(m), m), (m, list(m)), (nn.Sequential(*m), m)):  # one model, two forms
        d = dg.newton_direction(model, lf, X, y, operator=hessinv.hessian(built_on, lf, X, y), damping=0.1)
        assert torch.equal(d.direction, dg.newton_direction(m, lf, X, y, damping=0.1).direction)
    G = hessinv.gauss_newton(m, lf, X, y)  # no curvature named: the operator's own
    nd = dg.newton_direction(m, lf, X, y, operator=G, damping=0.1)
    want = torch.linalg.solve(G.to_dense() + 0.1 * torch.eye(43, dtype=torch.float64), G.gradient)
    assert torch.allclose(nd.direction.abs(), want.abs(), rtol=1e-10)
