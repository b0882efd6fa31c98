"""What a mutation probe (2026-12-07) found unpinned: each mutated line below passed its module's tests. Each
test fails on its mutant and passes on the code: plain-autograd float64 references, or the documented rule.

- Laplace's dense functional variance (``N C > 2n``) without its ``1 / c``; ``posterior_variance`` times
  ``c``; the sampled predictive's variance divided by ``k`` rather than ``k - 1``;
- ``newton_direction``'s automatic damping from ``+lambda_min``;
- the trust region's trial loss with the weight decay counted twice;
- the trust-region radius: shrunk from ``max(radius, ||s||)``, grown after an interior step, the secular warm
  start moved the wrong way, proven negative curvature dropped from its state;
- Levenberg-Marquardt's ``nu`` not reset on an accepted step;
- the trust region's predicted decrease after backtracking (``s`` for ``s^2``), or without the weight decay's
  shift in its products;
- the Hessian preconditioner's curvature weight inverted, its weight decay doubled, its clip bound
  ``||g|| lambda``; a checkpoint without the factor's lookup-table rows."""

from __future__ import annotations

import math

import torch
from reference import autograd_gradient_hessian, autograd_hessian, autograd_output_jacobian
from torch import nn

import hessinv
import hessinv.optim as ho
from hessinv.diagnostics import newton_direction
from hessinv.laplace import Laplace
from hessinv.optim.damping import LevenbergMarquardt, Proposal, Sweeps
from hessinv.optim.trust_region import TrustRegion

F64 = torch.float64


def _regression_posterior(sigma: float = 0.3, delta: float = 2.0, width: int = 3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).double()
    X = torch.randn(30, 2, dtype=F64)
    y = torch.sin(X.sum(1, keepdim=True))
    la = Laplace(net, "regression", prior_precision=delta, sigma_noise=sigma).fit(X, y)
    J = autograd_output_jacobian(net, X)[:, 0]
    P = J.T @ J / sigma**2 + delta * torch.eye(J.shape[1], dtype=F64)
    return net, la, P


def test_functional_variance_both_branches_against_dense():
    """40 test outputs > 2n = 26 parameters: the dense branch (P^-1 formed once); 4: the solve branch.
    sigma = 0.3 makes c = 2 sigma^2 != 1, so a dropped 1 / c shows (it was 4.6x off unnoticed)."""
    net, la, P = _regression_posterior()
    Xt = torch.randn(40, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    Jt = autograd_output_jacobian(net, Xt)[:, 0]
    ref = torch.einsum("in,nm,im->i", Jt, torch.linalg.inv(P), Jt)
    for rows in (slice(None), slice(0, 4)):
        _, var = la(Xt[rows])
        assert torch.allclose(var.reshape(-1), ref[rows], rtol=1e-8)
        fv = la.functional_variance(autograd_output_jacobian(net, Xt[rows]))
        assert torch.allclose(fv.reshape(-1), ref[rows], rtol=1e-8)


def test_posterior_variance_and_covariance_for_regression_against_dense():
    _, la, P = _regression_posterior(width=5)
    ref = torch.linalg.inv(P)
    assert torch.allclose(la.posterior_variance(), ref.diagonal(), rtol=1e-8)
    assert torch.allclose(la.posterior_covariance(), ref, rtol=1e-8, atol=1e-12)


def test_sampled_predictive_variance_is_the_unbiased_sample_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y = torch.randn(20, 2, dtype=F64), torch.randn(20, 1, dtype=F64)
    la = Laplace(net, "regression", prior_precision=1.0).fit(X, y)
    k = 5
    mu, var = la(X[:3], pred_type="nn", n_samples=k, generator=torch.Generator().manual_seed(1))
    thetas = la.sample(k, torch.Generator().manual_seed(1))
    outs = []
    for th in thetas:
        parts = torch.split(th, [p.numel() for p in net.parameters()])
        named = {n: v.view_as(p) for (n, p), v in zip(net.named_parameters(), parts, strict=True)}
        outs.append(torch.func.functional_call(net, named, (X[:3],)).reshape(-1))
    outs = torch.stack(outs)
    assert torch.allclose(mu.reshape(-1), outs.mean(0))
    assert torch.allclose(var.reshape(-1), torch.cov(outs.T).diagonal(), rtol=1e-10)


def test_newton_direction_damping_on_an_indefinite_hessian():
    """Documented: lambda = max(0, -lambda_min(C)) + delta ||C|| (delta = 1e-8)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(16, 3, dtype=F64), 3 * torch.randn(16, 2, dtype=F64)
    H = autograd_hessian(net, nn.MSELoss(), X, y)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev[0]) < 0  # (the case: indefinite)
    norm = float(ev.abs().max())
    expected = -float(ev[0]) + 1e-8 * norm
    nd = newton_direction(net, nn.MSELoss(), X, y)
    assert abs(nd.damping - expected) <= 1e-6 * norm
    g = hessinv.hessian(net, nn.MSELoss(), X, y).gradient
    ref = torch.linalg.solve(H + nd.damping * torch.eye(len(H), dtype=F64), g)
    assert float((nd.direction - ref).norm() / ref.norm()) <= 1e-6


def test_trust_region_losses_include_half_the_weight_decay():
    """The ratio test's loss before and after the step is f + wd/2 |x|^2 at each point."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y = torch.randn(32, 3, dtype=F64), torch.randn(32, 1, dtype=F64)
    wd = 0.5
    opt = ho.Newton(net, nn.MSELoss(), mode="trust-region", weight_decay=wd)

    def objective() -> float:
        x = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        with torch.no_grad():
            return float(nn.MSELoss()(net(X), y)) + 0.5 * wd * float(x @ x)

    f0 = objective()
    opt.step(X, y)
    s = opt.last_stats
    assert s.accepted
    assert math.isclose(s.loss, f0, rel_tol=1e-10)
    assert math.isclose(s.loss_after, objective(), rel_tol=1e-10)
    assert math.isclose(s.actual_decrease, f0 - objective(), rel_tol=1e-8)


def _least_squares():
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)
    return X, y


def test_trust_region_radius_after_an_interior_step():
    """Rejected (rho < 0.25): radius <- 0.25 min(radius, ||s||); accepted with rho > 0.75 but interior: no
    growth (it grows on the boundary only)."""
    X, y = _least_squares()
    H = hessinv.hessian(nn.Linear(3, 1).double(), nn.MSELoss(), X, y)  # convex: the Newton step is interior
    tr = TrustRegion(radius=100.0)
    st = tr.init()
    p = tr.propose(Sweeps(H), H.gradient, st)
    assert not p.boundary
    new, accepted = tr.update(st, p, 0.0)
    assert not accepted and math.isclose(new["radius"], 0.25 * float(p.step.norm()), rel_tol=1e-12)
    new, accepted = tr.update(st, p, 1.0)
    assert accepted and new["radius"] == 100.0


def test_trust_region_warm_start_moves_toward_the_new_radius_lambda():
    """After a rejected boundary step, the next lambda starts nearer lambda*(new radius) (from the dense
    eigendecomposition, by bisection) than the old lambda was; and negative curvature proven without the
    test at lambda = 0 is kept in the state."""
    X, y = _least_squares()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    g = H.gradient
    w, V = torch.linalg.eigh(autograd_hessian(net, nn.MSELoss(), X, y))
    gb = V.T @ g

    def lam_star(radius: float) -> float:
        lo, hi = max(0.0, -float(w[0])) + 1e-14, 1e8
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float((gb / (w + mid)).norm()) > radius else (lo, mid)
        return 0.5 * (lo + hi)

    tr = TrustRegion(radius=0.05)
    st = tr.init()
    p = tr.propose(Sweeps(H), g, st)
    assert p.boundary and not p.hard_case
    new, _ = tr.update(st, p, 0.0)
    ref = lam_star(new["radius"])
    assert abs(new["damping"] - ref) < abs(p.damping - ref)
    q = Proposal(
        step=torch.ones(3, dtype=F64) / 3**0.5, damping=2.5, factor=None, radius=1.0, boundary=True,
        lambda_lower=2.0, positive_definite_at_zero=None,
    )  # fmt: skip
    assert TrustRegion(radius=1.0).update(TrustRegion(radius=1.0).init(), q, 0.5)[0]["indefinite"] is True


def test_levenberg_marquardt_resets_nu_on_acceptance():
    """Nielsen's rule: accepted -> lambda * max(1/3, 1 - (2 rho - 1)^3), nu <- 2; rejected -> lambda * nu,
    nu <- 2 nu."""
    lm = LevenbergMarquardt(damping=1.0)
    p = Proposal(step=torch.zeros(2), damping=1.0, factor=None)
    st, accepted = lm.update({"damping": 1.0, "nu": 8.0}, p, 0.9)
    assert accepted and st["nu"] == 2.0 and abs(st["damping"] - max(1 / 3, 1 - 0.8**3)) < 1e-15
    st, accepted = lm.update(st, p, -1.0)
    assert not accepted and st["damping"] == 2.0 and st["nu"] == 4.0


def test_trust_region_predicted_decrease_is_the_quadratic_model_of_the_step_taken():
    """``pred = -(g^T D + 1/2 D^T (H + wd I) D)`` for the parameter change ``D`` actually made, also after
    backtracking (``D = s d`` with ``s < 1``) and with a weight decay (``g`` and ``H`` of ``f + wd/2 |x|^2``);
    ``H`` and ``g`` by plain autograd at the step's start."""
    backtracked = 0
    for wd in (0.0, 0.01):
        for seed in range(4):
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
            X, y = torch.randn(16, 3, dtype=F64), 3 * torch.randn(16, 1, dtype=F64)
            opt = ho.Newton(
                net, nn.MSELoss(), mode="trust-region", damping=TrustRegion(radius=50.0), backtracking=6,
                weight_decay=wd,
            )  # fmt: skip
            for _ in range(4):
                x0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
                g, H = autograd_gradient_hessian(net, nn.MSELoss(), X, y)
                g, H = g + wd * x0, H + wd * torch.eye(len(x0), dtype=F64)
                opt.step(X, y)
                s = opt.last_stats
                if not s.accepted:
                    continue
                D = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - x0
                pred = -(float(g @ D) + 0.5 * float(D @ H @ D))
                assert math.isclose(s.predicted_decrease, pred, rel_tol=1e-9, abs_tol=1e-14)
                backtracked += s.backtracks > 0
    assert backtracked >= 2  # (the case: steps halved before acceptance)


def test_hessian_preconditioner_scales_and_damps_a_summed_loss():
    """``curvature="hessian"`` on a summed loss with a curvature batch of half the batch: the direction is
    ``(w H_k + (lambda + wd) I)^{-1} g``, ``w = n / k`` -- here (identical examples, a convex least-squares
    model, so the pivots' absolute values change nothing) ``(H + (lambda + wd) I)^{-1} g`` with ``H`` the
    whole batch's Hessian by plain autograd; ``lambda < 1`` so that the clip bound ``||g|| / lambda`` is not
    met."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2).double()
    x0, y0 = torch.randn(1, 4, dtype=F64), torch.randn(1, 2, dtype=F64)
    X, y = x0.repeat(16, 1), y0.repeat(16, 1)
    loss = nn.MSELoss(reduction="sum")
    lam, wd = 0.1, 0.05
    pc = ho.Preconditioner(
        net, loss, curvature="hessian", damping=lam, weight_decay=wd, curvature_batch_size=8
    )
    pc.update(X, y)
    _, H = autograd_gradient_hessian(net, loss, X, y)
    g = torch.randn(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    ref = torch.linalg.solve(H + (lam + wd) * torch.eye(H.shape[0], dtype=F64), g)
    assert float((pc.solve(g) - ref).norm() / ref.norm()) <= 1e-10


def test_a_preconditioner_over_a_lookup_table_resumes_with_the_same_solves():
    """The stored factor's lookup-table rows are part of the checkpoint: a preconditioner loaded from
    ``state_dict`` solves as the one that saved it (bit for bit)."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(12, 5))

    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, 50, (16, 3), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    net = make()
    pc = ho.Preconditioner(net, loss)
    for _ in range(3):
        net.zero_grad()
        loss(net(X), y).backward()
        pc.precondition_(X, y)
    assert pc._factor.tables  # (the case: rows of a table in the factor)
    net2 = make()
    net2.load_state_dict(net.state_dict())
    pc2 = ho.Preconditioner(net2, loss)
    pc2.load_state_dict(pc.state_dict())
    g = torch.randn(sum(p.numel() for p in net.parameters()), generator=gen)
    assert torch.equal(pc2.solve(g), pc.solve(g))
