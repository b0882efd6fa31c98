"""hessinv.diagnostics: alignment, contraction and x* estimation (docs/theory.md §2-§6).

Every identity is checked by two different routes: the contraction a torch optimizer (or a
parameter write) actually produced, read off the model's parameters, against the formula evaluated
from ``cos(theta)`` and ``rho`` computed from the direction and step size given separately.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

import hessinv
from hessinv import diagnostics as dg
from hessinv.errors import InvalidArgumentError

F64 = torch.float64


# -- fixtures -----------------------------------------------------------------------------------
def quadratic_problem(seed: int = 0, n: int = 6, N: int = 40, cond: float = 1e3, noise: float = 0.1):
    """``MSE(X w, y)`` for ``Linear(n, 1, bias=False)``: a quadratic in ``w``; ``x*`` by lstsq."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=gen, dtype=F64) * torch.logspace(0, math.log10(cond) / 2, n, dtype=F64)
    y = X @ torch.randn(n, 1, generator=gen, dtype=F64) + noise * torch.randn(N, 1, generator=gen, dtype=F64)
    x_star = torch.linalg.lstsq(X, y).solution.reshape(-1)
    net = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(1, n, generator=gen, dtype=F64) * 3)
    return net, nn.MSELoss(), X, y, x_star


def tanh_chain(widths: list[int], seed: int, gain: float = 1.5) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=F64) * gain / math.sqrt(a))
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen, dtype=F64))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def teacher_student(seed: int = 0, widths=(3, 3, 3, 2), N: int = 64, noise: float = 0.05):
    """Realizable teacher-student chain: ``x*`` = the teacher (zero loss); student = perturbed teacher.

    32 parameters, 128 residuals: the teacher's Hessian is positive definite (lambda_min ~ 2e-4).
    """
    teacher = tanh_chain(list(widths), seed, gain=2.5)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, widths[0], generator=gen, dtype=F64)
    with torch.no_grad():
        y = teacher(X)
    x_star = dg.flat_parameters(teacher)
    student = copy.deepcopy(teacher)
    dg.set_flat_parameters(student, x_star + noise * torch.randn(x_star.numel(), generator=gen, dtype=F64))
    return student, nn.MSELoss(), X, y, x_star


def move(net: nn.Module, x: torch.Tensor) -> None:
    dg.set_flat_parameters(net, x)


# -- elementary quantities ------------------------------------------------------------------------
def test_undefined_cases_are_nan_not_numbers():
    x = torch.ones(3, dtype=F64)
    assert math.isnan(dg.alignment(torch.zeros(3, dtype=F64), x, 0 * x))
    assert math.isnan(dg.alignment(x, x, x))
    assert math.isnan(dg.observed_contraction(x, 2 * x, x))
    assert math.isnan(dg.predicted_contraction(math.nan))
    assert math.isnan(dg.best_step(0 * x, x, 0 * x))
    rec = dg.analyze_step(x, x, 0 * x)  # a rejected step: nothing moved
    assert math.isnan(rec.cos_theta) and rec.observed == 1.0 and rec.predicted_step == 1.0
    with pytest.raises(ValueError):
        dg.alignment(torch.ones(2, dtype=F64), x, 0 * x)


def test_best_step_factor_is_one_when_misaligned():
    assert dg.predicted_contraction(0.0) == 1.0
    assert dg.predicted_contraction(-0.3) == 1.0
    # and any positive step then moves away: Lemma 1 with cos <= 0
    for c in (0.0, -0.3):
        assert all(dg.predicted_contraction(c, r) > 1.0 for r in (1e-3, 0.5, 2.0))


def test_change_of_variables_geometry():
    """theory.md §1: d = P g measured in the P^{-1} geometry equals grad in y = P^{-1/2} x, Euclidean."""
    gen = torch.Generator().manual_seed(3)
    n = 5
    A = torch.randn(n, n, generator=gen, dtype=F64)
    P = A @ A.T + 0.5 * torch.eye(n, dtype=F64)
    lam, V = torch.linalg.eigh(P)
    P_half, P_mhalf = V @ torch.diag(lam.sqrt()) @ V.T, V @ torch.diag(lam.rsqrt()) @ V.T
    x, x_star, g = (torch.randn(n, generator=gen, dtype=F64) for _ in range(3))
    cos_x = dg.alignment(P @ g, x, x_star, metric=torch.linalg.inv(P))
    cos_y = dg.alignment(P_half @ g, P_mhalf @ x, P_mhalf @ x_star)
    assert cos_x == pytest.approx(cos_y, abs=1e-12)


# -- quadratics: Newton is perfectly aligned; the best step gives 1 - cos^2 ------------------------
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_newton_on_quadratic_is_aligned_and_lands_on_x_star(curvature, cond):
    net, loss_fn, X, y, x_star = quadratic_problem(cond=cond)
    x = dg.flat_parameters(net)
    nd = dg.newton_direction(net, loss_fn, X, y, curvature=curvature)
    assert nd.damping == 0.0 and nd.inertia.negative == 0  # positive definite: pure Newton
    cos = dg.alignment(nd.direction, x, x_star)
    assert abs(1 - cos) <= 1e-10
    move(net, x - nd.direction)  # eta = 1
    observed = dg.observed_contraction(x, dg.flat_parameters(net), x_star)
    rho = dg.step_ratio(nd.direction, x, x_star, eta=1.0)
    assert observed <= 1e-18
    assert dg.predicted_contraction(cos) <= 1e-10
    assert dg.predicted_contraction(cos, rho) <= 1e-10
    assert abs(rho - 1) <= 1e-9


def test_gradient_best_step_on_quadratic_gives_sin_squared():
    """Theorem 1 through a real optimizer: SGD with lr = eta* lands at distance^2 sin^2 |e|^2."""
    net, loss_fn, X, y, x_star = quadratic_problem(cond=1e3)
    x = dg.flat_parameters(net)
    g = dg.gradient_direction(net, loss_fn, X, y)
    cos = dg.alignment(g, x, x_star)
    assert 0 < cos < 0.99  # a genuinely misaligned direction
    eta = dg.best_step(g, x, x_star)
    opt = torch.optim.SGD(net.parameters(), lr=eta)
    opt.zero_grad()
    loss_fn(net(X), y).backward()
    opt.step()
    observed = dg.observed_contraction(x, dg.flat_parameters(net), x_star)
    assert observed == pytest.approx(1 - cos**2, abs=1e-10)
    # eta* is the best: a 10% longer or shorter step does worse, by exactly (d rho)^2 (Lemma 1)
    for f in (0.9, 1.1):
        move(net, x - f * eta * g)
        worse = dg.observed_contraction(x, dg.flat_parameters(net), x_star)
        rho = dg.step_ratio(g, x, x_star, f * eta)
        assert worse > observed
        assert worse - observed == pytest.approx((rho - rho / f) ** 2, abs=1e-10)


def test_exact_line_search_on_loss_is_theorem_1_in_H_geometry():
    """Exact line search on a quadratic's loss = best step in the H-norm (theory.md §2 remark):
    (F(x+) - F*) / (F(x) - F*) = 1 - cos_H^2, with the losses from forward passes."""
    net, loss_fn, X, y, x_star = quadratic_problem(cond=1e3, noise=0.01)
    H = hessinv.hessian(net, loss_fn, X, y)
    x, g = dg.flat_parameters(net), H.gradient
    eta = float(g @ g) / float(g @ (H @ g))  # minimizes F(x - eta g)
    with torch.no_grad():
        f0 = float(loss_fn(net(X), y))
        move(net, x_star)
        f_star = float(loss_fn(net(X), y))
        move(net, x - eta * g)
        f1 = float(loss_fn(net(X), y))
    cos_H = dg.alignment(g, x, x_star, metric=H)
    assert (f1 - f_star) / (f0 - f_star) == pytest.approx(1 - cos_H**2, abs=1e-9)
    # and the Euclidean cosine is a different number: the geometry matters for partial alignment
    assert abs(dg.alignment(g, x, x_star) - cos_H) > 1e-3


def test_kantorovich_bounds_for_gradient_and_shifted_newton():
    """Proposition 7 and its gradient limit: cos >= 2 sqrt(k) / (1 + k)."""
    net, loss_fn, X, y, x_star = quadratic_problem(cond=1e4, seed=1)
    H = hessinv.hessian(net, loss_fn, X, y)
    h = torch.linalg.eigvalsh(H.to_dense())
    hmin, hmax = float(h[0]), float(h[-1])
    x = dg.flat_parameters(net)

    def bound(k: float) -> float:
        return 2 * math.sqrt(k) / (1 + k)

    assert dg.alignment(H.gradient, x, x_star) >= bound(hmax / hmin) - 1e-12
    for lam in (1e-3 * hmin, hmin, 1e2 * hmin, hmax):
        nd = dg.newton_direction(net, loss_fn, X, y, damping=lam)
        k_lam = hmax * (hmin + lam) / (hmin * (hmax + lam))
        cos = dg.alignment(nd.direction, x, x_star)
        assert bound(k_lam) - 1e-12 <= cos <= 1.0
        assert dg.predicted_contraction(cos) <= ((k_lam - 1) / (k_lam + 1)) ** 2 + 1e-12


# -- nonlinear chains: the fixed-step identity through real optimizers ----------------------------
def test_fixed_step_identity_for_sgd_steps_on_a_chain():
    net, loss_fn, X, y, x_star = teacher_student(noise=0.3)
    lr = 0.5
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(10):
        x = dg.flat_parameters(net)
        g = dg.gradient_direction(net, loss_fn, X, y)
        predicted = dg.predicted_contraction(dg.alignment(g, x, x_star), dg.step_ratio(g, x, x_star, lr))
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
        observed = dg.observed_contraction(x, dg.flat_parameters(net), x_star)
        assert observed == pytest.approx(predicted, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, betas=(0.8, 0.99)),
    ],
)
def test_adam_direction_predicts_adams_step(make):
    net, loss_fn, X, y, x_star = teacher_student(noise=0.3)
    opt = make(net.parameters())
    lr = opt.param_groups[0]["lr"]
    for _ in range(5):
        x = dg.flat_parameters(net)
        g = dg.gradient_direction(net, loss_fn, X, y)
        d = dg.adam_direction(opt, g)
        predicted = dg.predicted_contraction(dg.alignment(d, x, x_star), dg.step_ratio(d, x, x_star, lr))
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
        x_next = dg.flat_parameters(net)
        assert torch.allclose(x - x_next, lr * d, rtol=1e-10, atol=1e-15)
        assert dg.observed_contraction(x, x_next, x_star) == pytest.approx(predicted, rel=1e-10)
    with pytest.raises(TypeError):
        dg.adam_direction(torch.optim.SGD(net.parameters(), lr=0.1))


def test_tracker_reads_momentum_steps_from_parameters():
    net, loss_fn, X, y, x_star = teacher_student(noise=0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    tracker = dg.AlignmentTracker(net, x_star)
    for _ in range(8):
        g = dg.gradient_direction(net, loss_fn, X, y)
        opt.zero_grad()
        loss = loss_fn(net(X), y)
        loss.backward()
        opt.step()
        tracker.update(directions={"gradient": g}, loss=loss.item())
    recs = tracker.records
    assert [r.step for r in recs] == list(range(8))
    for r in recs:  # Lemma 1 from the recorded step, against the distances
        assert r.observed == pytest.approx(r.predicted_step, rel=1e-12)
        assert r.observed >= r.predicted_best - 1e-12  # no step size beats the best one
    # step 0 is a plain gradient step; later ones carry momentum and point elsewhere
    assert recs[0].cos_theta == pytest.approx(recs[0].alignments["gradient"], abs=1e-12)
    assert abs(recs[-1].cos_theta - recs[-1].alignments["gradient"]) > 1e-6
    # the product of observed factors is the total contraction (Corollary 3)
    total = math.prod(r.observed for r in recs)
    assert total == pytest.approx((tracker.error / recs[0].error) ** 2, rel=1e-10)
    s = tracker.summary()
    assert s["steps"] == 8 and s["max_identity_gap"] < 1e-12
    json.dumps(tracker.as_dict())
    with pytest.raises(ValueError):
        dg.AlignmentTracker(net, torch.zeros(3, dtype=F64))


# -- nonlinear chains: Newton near x* -------------------------------------------------------------
def test_newton_alignment_approaches_one_near_the_teacher():
    """Proposition 8: sin(theta) <= M |e| / (2 mu), so 1 - cos = O(|e|^2); the unit step is quadratic."""
    net, loss_fn, X, y, x_star = teacher_student(noise=0.0)
    H = hessinv.hessian(net, loss_fn, X, y)
    assert torch.linalg.eigvalsh(H.to_dense())[0] > 0  # a nondegenerate minimizer (N * outputs > n)
    u = torch.randn(x_star.numel(), generator=torch.Generator().manual_seed(7), dtype=F64)
    u /= u.norm()
    radii = [1e-3, 1e-4, 1e-5, 1e-6]  # inside the region of (N); at 1e-2 the shift is still active
    sines, next_errors = [], []
    for r in radii:
        x = x_star + r * u
        move(net, x)
        nd = dg.newton_direction(net, loss_fn, X, y)
        cos = dg.alignment(nd.direction, x, x_star)
        sines.append(math.sqrt(max(1 - cos**2, 0.0)))
        next_errors.append(float((x - nd.direction - x_star).norm()))
    sin_over_r = [s / r for s, r in zip(sines, radii, strict=True)]
    # sin(theta) / |e| is the same constant at every radius: sin = O(|e|), so 1 - cos = O(|e|^2)
    assert max(sin_over_r) <= 1.5 * min(sin_over_r)
    assert all(b < a / 5 for a, b in zip(sines, sines[1:], strict=False))  # monotone improvement
    assert 1 - math.sqrt(1 - sines[-1] ** 2) < 1e-8
    # |e+| <= K |e|^2 with one K for every radius (quadratic convergence of the unit step)
    K = [e / r**2 for e, r in zip(next_errors, radii, strict=True)]
    assert max(K) <= 1.5 * min(K)


def test_newton_direction_shifts_an_indefinite_hessian():
    net, loss_fn, X, y, x_star = teacher_student(noise=1.0, seed=2)
    H = hessinv.hessian(net, loss_fn, X, y)
    lam_min = float(torch.linalg.eigvalsh(H.to_dense())[0])
    assert lam_min < 0  # far from the teacher the Hessian is indefinite
    nd = dg.newton_direction(net, loss_fn, X, y)
    assert nd.min_eigenvalue == pytest.approx(lam_min, abs=1e-10)
    assert nd.damping > -lam_min and nd.inertia.negative == 0
    assert float(nd.gradient @ nd.direction) > 0  # a descent direction (theory.md §5.3)
    with pytest.raises(ValueError):
        dg.newton_direction(net, loss_fn, X, y, curvature="fisher")


def test_direction_alignments_names_each_direction():
    net, loss_fn, X, y, x_star = teacher_student(noise=1e-4)  # |e| ~ 6e-4: inside Newton's region
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    al = dg.direction_alignments(
        net, loss_fn, X, y, x_star, ("gradient", "newton", "gauss_newton", "adam"), adam=adam
    )
    assert set(al) == {"gradient", "newton", "gauss_newton", "adam"}
    assert al["newton"] > 0.99 and al["gauss_newton"] > 0.99  # close to a zero-residual minimizer
    assert al["gradient"] < al["newton"]
    with pytest.raises(ValueError):
        dg.direction_alignments(net, loss_fn, X, y, x_star, ("adam",))


def test_estimate_minimizer_recovers_the_teacher():
    net, loss_fn, X, y, x_star = teacher_student(noise=0.02)
    before = dg.flat_parameters(net)
    est = dg.estimate_minimizer(net, loss_fn, X, y, gtol=1e-12)
    assert est.converged and est.gradient_norm <= 1e-12
    assert est.min_eigenvalue > 0
    assert float((est.x - x_star).norm()) < 1e-9
    assert torch.equal(dg.flat_parameters(net), before)  # the model was not touched
    # superlinear convergence at the end: the ratios of successive gradient norms shrink
    gs = [h[1] for h in est.history] + [est.gradient_norm]
    assert gs[-1] / gs[-2] < gs[-2] / gs[-3] < 1e-2


def test_estimate_minimizer_on_float32_model_returns_float64():
    net, loss_fn, X, y, x_star = quadratic_problem()
    X32, y32 = X.float(), y.float()
    est = dg.estimate_minimizer(net.float(), loss_fn, X32, y32)
    assert est.x.dtype == F64 and est.converged
    assert net[0].weight.dtype == torch.float32  # the model itself stays float32
    x_star32 = torch.linalg.lstsq(X32.double(), y32.double()).solution.reshape(-1)  # the float32 data's x*
    assert torch.allclose(est.x, x_star32, rtol=1e-9, atol=1e-12)


# -- stochastic directions (Theorem 4) ------------------------------------------------------------
def test_stochastic_contraction_on_minibatch_gradients():
    net, loss_fn, X, y, x_star = teacher_student(noise=0.3, N=64)
    x = dg.flat_parameters(net)
    batches = torch.arange(64).reshape(8, 8)
    draws = torch.stack([dg.gradient_direction(net, loss_fn, X[b], y[b]) for b in batches])
    eta = 0.5
    s = dg.stochastic_contraction(draws, x, x_star, eta)
    # the expectation over the 8 batches, by moving the parameters batch by batch
    factors = []
    for b in batches:
        move(net, x)
        opt = torch.optim.SGD(net.parameters(), lr=eta)
        opt.zero_grad()
        loss_fn(net(X[b]), y[b]).backward()
        opt.step()
        factors.append(dg.observed_contraction(x, dg.flat_parameters(net), x_star))
    assert sum(factors) / len(factors) == pytest.approx(s.predicted, rel=1e-12)
    assert s.observed_mean == pytest.approx(s.predicted, rel=1e-12)
    # the full-batch gradient is the mean draw: cos_bar is its alignment
    move(net, x)
    g = dg.gradient_direction(net, loss_fn, X, y)
    assert s.cos_bar == pytest.approx(dg.alignment(g, x, x_star), abs=1e-12)
    # the best step: its expected factor is (sin^2 + nu) / (1 + nu), and no other eta is better
    best = dg.stochastic_contraction(draws, x, x_star, s.best_eta)
    assert best.observed_mean == pytest.approx(s.predicted_best, rel=1e-12)
    for f in (0.8, 1.25):
        assert dg.stochastic_contraction(draws, x, x_star, f * s.best_eta).observed_mean > best.observed_mean
    assert s.predicted_best >= dg.predicted_contraction(s.cos_bar) - 1e-15  # noise only costs


# -- argument checks (probe of 2027-01, /tmp/probe_cli/FINDINGS.md D3, D4, D17, D18) ---------------
@pytest.mark.parametrize("delta", [0.0, -1.0, math.nan, math.inf])
def test_newton_direction_refuses_a_margin_that_is_not_positive(delta):
    """delta <= 0 made lambda = -lambda_min to rounding: a singular solve with |d| ~ 1e12, unreported."""
    net, loss_fn, X, y, _ = teacher_student(noise=1.0, seed=2)
    with pytest.raises(InvalidArgumentError, match="delta must be finite and > 0"):
        dg.newton_direction(net, loss_fn, X, y, delta=delta)
    with pytest.raises(InvalidArgumentError, match="delta must be finite and > 0"):
        dg.direction_alignments(net, loss_fn, X, y, dg.flat_parameters(net), ("newton",), delta=delta)


@pytest.mark.parametrize("spelling", ["gauss-newton", "Gauss_Newton", "ggn"])
def test_curvature_names_in_either_spelling(spelling):
    net, loss_fn, X, y, _ = teacher_student(noise=0.3, seed=1)
    want = dg.newton_direction(net, loss_fn, X, y, curvature="gauss_newton").direction
    assert torch.equal(dg.newton_direction(net, loss_fn, X, y, curvature=spelling).direction, want)
    est = dg.estimate_minimizer(net, loss_fn, X, y, curvature=spelling, max_iter=1)
    assert est.iterations == 1
    with pytest.raises(InvalidArgumentError, match="curvature must be 'hessian' or 'gauss_newton'"):
        dg.newton_direction(net, loss_fn, X, y, curvature="fisher")


def test_metric_that_is_not_positive_definite_is_refused():
    v = lambda *a: torch.tensor(a, dtype=F64)  # noqa: E731
    W = torch.diag(v(1.0, -1.0))
    # |d|_W^2 = 0.75 > 0 and |e|_W^2 = 0.96 > 0, but <d, e>_W = 0.9 > 0.85: the ratio 1.06 is no cosine
    with pytest.raises(InvalidArgumentError, match="not positive definite on the span of d and x - x_star"):
        dg.alignment(v(1.0, 0.5), v(1.0, 0.2), v(0.0, 0.0), metric=W)
    with pytest.raises(
        InvalidArgumentError, match=re.escape("not positive definite along d: |d|_W^2 = -0.99")
    ):
        dg.alignment(v(0.1, 1.0), v(1.0, 0.2), v(0.0, 0.0), metric=W)
    with pytest.raises(InvalidArgumentError, match="not positive definite along d"):
        dg.step_ratio(v(0.1, 1.0), v(1.0, 0.2), v(0.0, 0.0), metric=lambda u: W @ u)
    with pytest.raises(InvalidArgumentError, match="not positive definite along x - x_star"):
        dg.observed_contraction(v(0.1, 1.0), v(1.0, 0.2), v(0.0, 0.0), metric=W)
    # a PSD metric with d in its null space (u^T W u = 0, or -1e-17 by rounding): undefined, nan
    P = torch.diag(v(0.0, 1.0))
    assert math.isnan(dg.alignment(v(1.0, 0.0), v(1.0, 1.0), v(0.0, 0.0), metric=P))
    R = torch.tensor([[0.28, -0.96], [0.96, 0.28]], dtype=F64)  # a rotation
    S, d = R @ torch.diag(v(0.0, 1.0)) @ R.T, R[:, 0]  # PSD, d its null vector
    assert float(d @ (S @ d)) < 0  # -1.6e-17: rounding, not indefiniteness
    assert math.isnan(dg.alignment(d, v(1.0, 1.0), v(0.0, 0.0), metric=S))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, xs: dg.step_ratio(torch.ones(5, dtype=F64), x, xs), "d has 5 entries, x - x_star has 2"),
        (lambda x, xs: dg.observed_contraction(x, torch.zeros(1, dtype=F64), xs), "x_next has 1 entries"),
        (lambda x, xs: dg.best_step(torch.ones(3, dtype=F64), x, xs), "d has 3 entries"),
        (lambda x, xs: dg.alignment(x, x, torch.zeros(1, dtype=F64)), "x has 2 entries, x_star has 1"),
        (lambda x, xs: dg.analyze_step(x, torch.zeros(1, dtype=F64), xs), "x_next has 1 entries"),
        (lambda x, xs: dg.stochastic_contraction(torch.ones(0, 2, dtype=F64), x, xs, 0.5), "k >= 1 draws"),
    ],
)
def test_vectors_of_the_wrong_length_do_not_broadcast(call, message):
    x, xs = torch.tensor([3.0, 4.0], dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call(x, xs)


def test_float32_metric_is_judged_at_its_own_rounding():
    """A float32 Gauss-Newton metric: d along x - x* has cosine 1 up to float32 rounding, not an error."""
    import hessinv
    from hessinv.diagnostics import alignment

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), torch.randn(16, 3), torch.randint(0, 2, (16,)))
    n = G.shape[0]
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x, xs = (
            torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(n, generator=g, dtype=torch.float64),
        )
        assert alignment(3.7 * (x - xs), x, xs, metric=G) == pytest.approx(1.0, abs=1e-5)


# -- probe of 2026-12-03 (/tmp/probe_apps) ---------------------------------------------------------------
def test_adam_alignment_with_groups_in_another_order():
    """An Adam whose groups list the parameters in another order than the model: the model-order
    gradient was read in group order and the group-order direction compared with the model-order
    x - x* (cos 0.35 reported where the step taken had 0.85)."""
    torch.manual_seed(0)
    X, Y = torch.randn(40, 4, dtype=F64), torch.randn(40, 2, dtype=F64)
    lf = nn.MSELoss()
    Xa = torch.cat([X, torch.ones(40, 1, dtype=F64)], 1)
    Wb = torch.linalg.lstsq(Xa, Y).solution
    x_star = torch.cat([Wb[:4].T.reshape(-1), Wb[4]])
    got = []
    for reverse in (False, True):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(4, 2)).double()
        groups = [{"params": [m[0].weight]}, {"params": [m[0].bias]}]
        opt = torch.optim.Adam(groups[::-1] if reverse else groups, lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            lf(m(X), Y).backward()
            opt.step()
        opt.zero_grad()
        lf(m(X), Y).backward()
        x0 = dg.flat_parameters(m)
        reported = dg.direction_alignments(m, lf, X, Y, x_star, which=("adam",), adam=opt)["adam"]
        opt.step()
        taken = dg.alignment((x0 - dg.flat_parameters(m)) / 1e-2, x0, x_star)
        assert abs(reported - taken) < 1e-10
        got.append(reported)
    assert abs(got[0] - got[1]) < 1e-12


def test_diagnostics_arguments_are_named_errors():
    net, lf, X, y, x_star = quadratic_problem()
    x = dg.flat_parameters(net)
    d = torch.ones_like(x)
    with pytest.raises(InvalidArgumentError, match="metric"):
        dg.alignment(d, x, x_star, metric=torch.eye(3, dtype=F64))
    with pytest.raises(InvalidArgumentError, match="Tensor"):
        dg.alignment([1.0] * 6, x, x_star)
    with pytest.raises(InvalidArgumentError, match="Adam"):
        dg.adam_direction(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(InvalidArgumentError, match="maximize"):
        dg.adam_direction(torch.optim.Adam(net.parameters(), maximize=True), torch.zeros(6, dtype=F64))
    for call in (
        lambda: dg.predicted_contraction("a"),
        lambda: dg.stochastic_contraction(d[None], x, x_star, eta="a"),
        lambda: dg.newton_direction(net, lf, X, y, damping="a"),
    ):
        with pytest.raises(InvalidArgumentError, match="real number"):
            call()
    tracker = dg.AlignmentTracker(net, x_star)
    with pytest.raises(InvalidArgumentError, match="no column"):
        tracker.column("foo")


def test_newton_direction_at_the_callers_damping_keeps_the_solvers_warning():
    """A damping the caller chose next to -lambda_min leaves a poorly solved system: its AccuracyWarning
    was swallowed (kept quiet only where newton_direction chooses lambda itself)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    lam_min = float(torch.linalg.eigvalsh(H.to_dense())[0])
    with pytest.warns(hessinv.AccuracyWarning):
        dg.newton_direction(net, nn.CrossEntropyLoss(), X, y, damping=-lam_min + 1e-13 * H.norm_estimate())


def test_edge_cases_give_numbers_or_nan_not_raw_errors():
    """``alignment`` of a direction with itself at scale 1e160 or 1e-170 is 1 (the squared norms
    overflowed or underflowed to nan); ``stochastic_contraction`` at ``x = x*`` with zero-mean draws is
    nan where undefined (ZeroDivisionError before). Found by a probe."""
    from hessinv.diagnostics import alignment, stochastic_contraction

    e = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert alignment(1e160 * e, 1e160 * e, 0 * e) == 1.0
    assert alignment(1e-170 * e, 1e-170 * e, 0 * e) == 1.0
    assert alignment(-1e160 * e, 1e-170 * e, 0 * e) == -1.0
    x = torch.zeros(3, dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = stochastic_contraction(torch.stack([d, -d]), x, x, eta=0.1)
    assert math.isnan(out.predicted) and math.isnan(out.observed_mean)
