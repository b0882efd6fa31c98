"""The solver never refuses a solvable system: indefinite pivots (Bunch-Kaufman), static pivot
perturbation recovered by refinement / GMRES, float32, certified eigenvalues, validated tolerances.
All against dense float64 references (``reference.py``; ``eigvalsh`` of the dense Hessian)."""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gradient_hessian, chains, dense_gradient_hessian, zero_linear_problem
from torch import nn

import hessinv
import hessinv.riccati as ric
from hessinv import InvalidArgumentError, SingularError
from hessinv.riccati import Pivot

N_CHAINS = int(os.environ.get("HESSINV_N_SOLVER_CHAINS", "25"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def count(ev: torch.Tensor, shift: float) -> tuple[int, int, int]:
    s = ev + shift
    return int((s < 0).sum()), 0, int((s > 0).sum())


@pytest.mark.parametrize("p, a, seed", [(1, 3, 0), (7, 5, 1), (40, 9, 2), (65, 30, 3)])
def test_ldl_pivot_against_dense(p, a, seed):
    """An indefinite pivot: LDL^T (Bunch-Kaufman) solve, Schur complement, inertia and log|det|."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    Q = A + A.T
    Qxz = torch.randn(p, a, generator=g, dtype=torch.float64)
    Qzz = torch.randn(a, a, generator=g, dtype=torch.float64)
    Qzz = Qzz + Qzz.T
    ev = torch.linalg.eigvalsh(Q)
    piv = Pivot(Q.clone(), 0, "stage 0", 0.0, cholesky_first=False)
    assert not piv.cholesky and not piv.perturbed
    assert tuple(piv.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    R = torch.randn(p, 3, generator=g, dtype=torch.float64)
    assert rel(piv.solve(R), torch.linalg.solve(Q, R)) < 1e-10
    assert rel(piv.schur(Qzz, Qxz), Qzz - Qxz.T @ torch.linalg.solve(Q, Qxz)) < 1e-10
    assert piv.logdet() == pytest.approx(float(ev.abs().log().sum()), rel=1e-10, abs=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    p=st.integers(1, 90),
    kind=st.sampled_from(["random", "zero_diagonal", "permuted_diagonal", "rank_deficient"]),
    scipy_path=st.booleans(),
    single=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ldl_both_forms_against_dense(p, kind, scipy_path, single, seed):
    """linalg.ldl's two paths (scipy's, reading the C-ordered Q's upper triangle as Q^T's lower, and
    torch's) reproduce P^T Q P from their lower-form factors, on matrices that force 2x2 blocks and row
    interchanges."""
    from hessinv import linalg

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    if kind == "random":
        Q = A + A.T
    elif kind == "zero_diagonal":  # every pivot column's diagonal is 0: Bunch-Kaufman takes 2x2 blocks
        Q = A + A.T
        Q.diagonal().zero_()
    elif kind == "permuted_diagonal":
        P = torch.eye(p, dtype=torch.float64)[torch.randperm(p, generator=g)]
        Q = (P * torch.randn(p, generator=g, dtype=torch.float64)) @ P.T
    else:
        V = A[:, : max(1, p // 3)]
        Q = V @ torch.diag(torch.randn(V.shape[1], generator=g, dtype=torch.float64)) @ V.T
    Q = Q.float() if single else Q
    ready = linalg._scipy_ready
    linalg._scipy_ready = (lambda *t: ready(*t)) if scipy_path else (lambda *t: False)
    try:
        T, perm, d, e, first = linalg.ldl(Q)
    finally:
        linalg._scipy_ready = ready
    assert sorted(perm.tolist()) == list(range(p))
    two = np.zeros(p, dtype=bool)
    two[first] = True
    assert not two[-1] and not (two[:-1] & two[1:]).any()  # a 2x2 block's first row, never overlapping
    assert (e[~two] == 0).all()
    Tm = np.tril(T.astype(np.float64), -1) + np.eye(p)
    D = np.diag(d) + np.diag(e[:-1], -1) + np.diag(e[:-1], 1)
    LDL = Tm @ D @ Tm.T
    Qp = Q.double().numpy()[perm][:, perm]
    scale = max(1.0, float(np.abs(Qp).max())) * max(1.0, float(np.abs(Tm).max())) ** 2
    tol = (1e-5 if single else 1e-12) * p * scale
    assert float(np.abs(LDL - Qp).max()) <= tol


def test_perturbed_graded_pivot_keeps_a_small_factor():
    """A graded, nearly rank-deficient pivot (the shape of a wide-input stage's inner pivot), perturbed:
    Bunch-Kaufman eliminating from the small end gives L entries of ~3e6-1.5e7 there, and a static
    perturbation scaled by them made the factorization unrelated to Q (residual 1.0). Both orders of the
    grading (the small end last, and first: a review found the lower form alone failing that one) keep a
    small factor: the pivot is also factored in the reversed order."""
    for flip in (False, True):
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            torch.randn(18, 2, generator=g, dtype=torch.float64)
        V = (
            torch.randn(18, 2, generator=g, dtype=torch.float64)
            * torch.logspace(0, -6, 18, dtype=torch.float64)[:, None]
        )
        V = V.flip(0) if flip else V
        Q = (V @ V.T).float()
        b = Q @ torch.randn(18, 1, generator=g)
        piv = Pivot(Q, 0, "q", 0.0, perturb=True, cholesky_first=False)
        assert piv.perturbed > 0 and float(piv.L.tril(-1).abs().max()) < 1e3, flip
        assert float((Q.double() @ piv.solve(b).double() - b.double()).norm() / b.norm()) < 1e-5, flip


@pytest.mark.parametrize("scale", [1e160, 1e-160, 1.0])
def test_two_by_two_block_inverse_at_extreme_scales(scale):
    """D's 2x2 blocks are inverted scaled by their largest entry: a c - b^2 over- or underflows at
    |b| ~ 1e+-160 (the solve returned [0, 0, 3] instead of [2, 1, 3] at 1e160)."""
    Q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) * scale
    piv = Pivot(Q.clone(), 0, "stage 0", 0.0, cholesky_first=False)
    x = piv.solve(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64) * scale)
    assert torch.allclose(x.flatten(), torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64), rtol=1e-14)


def test_pivot_factorization_overflow_is_named():
    """Finite entries near the largest float overflow inside Bunch-Kaufman: a NonFiniteError, not NaN
    eigenvalues counted as positive."""
    big = torch.finfo(torch.float64).max / 4
    Q = torch.tensor([[1.0, 4.0, 4.0], [4.0, 1.0, 4.0], [4.0, 4.0, 1.0]], dtype=torch.float64) * big
    with pytest.raises(hessinv.NonFiniteError):
        Pivot(Q, 0, "stage 0", 0.0, cholesky_first=False)


def test_zero_pivot_of_a_nonsingular_hessian_is_solved():
    """A zero-initialized linear net: the last stage's pivot is exactly zero at eps = 0 (no scale of its
    own to perturb by), while H = [[0, C], [C^T, 0]] is nonsingular (cond ~5). It was refused with a
    NonFiniteError; the perturbation takes the blocks downstream's scale and refinement solves it."""
    m, X, Y = zero_linear_problem()
    H = hessinv.hessian(m, nn.MSELoss(), X, Y)
    _, Hd = autograd_gradient_hessian(m, nn.MSELoss(), X, Y)
    ev = torch.linalg.eigvalsh(Hd)
    assert float(ev.abs().min()) > 1e-2  # nonsingular
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    F = H.factor(0.0)
    assert F.perturbed and not F._certified  # the pivots' counts are the perturbed matrix's ...
    assert float((Hd @ F.solve(b) - b).norm() / b.norm()) < 1e-12
    # ... and F.inertia is recounted exactly when read
    assert tuple(F.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum())) and F.inertia_certified


def test_zero_pivot_of_a_singular_hessian_is_named():
    """Units dead on every example: their stage's pivot rows are zero and H is singular at eps = 0 -- a
    SingularError (it was a ZeroDivisionError in the Schur step, before that a NonFiniteError)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[2].bias.fill_(-100.0)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(SingularError):
        H.factor(0.0).solve(H.gradient)
    assert bool(torch.isfinite(H.factor(1e-3).solve(H.gradient)).all())


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("seed", range(3))
def test_a_pivot_of_rounding_noise_is_singular_not_certified(kind, seed):
    """A zero-residual least-squares fit: H = J^T J has rank 18 of 43, so at eps = 0 the first layer's
    pivot is what cancellation leaves, rounding noise (max|Qxx| ~ 1e-13 against ||H|| ~ 40; its own
    conditioning looks fine). It was factored as is: inertia (16, 0, 27) "certified", a finite
    log-determinant, solves with |x| ~ 1e17 -- silently wrong. The perturbation threshold is normwise
    now (p u max(max|Qxx|, the pivots before)): SingularError; and at eps = 1e-9 (nonsingular) the
    inertia is certified and exact."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        y = m(X)
    op = getattr(hessinv, kind)(m, nn.MSELoss(reduction="sum"), X, y)
    lam = torch.linalg.eigvalsh(op.to_dense())
    assert int((lam.abs() < 1e-10 * float(lam.abs().max())).sum()) == 25
    with pytest.raises(SingularError):
        op.factor(0.0)
    F = op.factor(1e-9)
    lam9 = lam + 1e-9
    assert F.inertia_certified and tuple(F.inertia) == (int((lam9 < 0).sum()), 0, int((lam9 > 0).sum()))
    assert abs(F.logdet() - float(lam9.abs().log().sum())) < 1e-6 * abs(float(lam9.abs().log().sum()))


def test_the_normwise_threshold_ignores_pivots_grown_by_indefinite_elimination():
    """After an indefinite pivot the sweep's Schur complements can grow far beyond ||H|| (no pivoting
    across stages: max|Qxx| 2.9e5 against ||H|| = 119 here); a threshold taken from them perturbed 2280
    exact eigenvalues of the wide first layer's pivot at eps = 1e-9 ||H|| (cond 1e9) and logdet
    refused. Only positive definite pivots, each at most its block of H + eps I, set the scale."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(300, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        m[0].weight.mul_(0.05)
        m[4].weight.mul_(20.0)
    X, y = torch.randn(16, 300, dtype=torch.float64), torch.randint(0, 4, (16,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    eps = 1e-9 * H.norm_estimate()
    F = H.factor(eps)
    assert not F.perturbed
    x, info = F.solve(H.gradient, return_info=True)
    assert info.residual < 1e-12


def test_ill_conditioned_nonsingular_system_is_solved_not_refused():
    """cond(H + eps I) = 1.9e8: a perturbed sweep plus refinement and GMRES leaves a relative residual
    above sqrt(u) (the probe: 3.6e-6 after 120 GMRES iterations), which used to be refused as
    singular; the system is nonsingular (|A| |x| / |b| far below 1 / u), so it is solved and the residual
    reported (dense LU: 4e-9)."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    _, Hd = autograd_gradient_hessian(m, nn.MSELoss(), X, y)
    A = Hd + 1e-8 * torch.eye(Hd.shape[0], dtype=torch.float64)
    b = torch.randn(Hd.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        x, info = H.factor(1e-8).solve(b, return_info=True)
    xd = torch.linalg.solve(A, b)
    # the reported residual is of the O(L) product, this one of autograd's matrix: at cond 1e8 the two
    # evaluations of A x differ by rounding, up to about u |A| |x| / |b| (1e-8 here; 3.2e-9 against
    # 1.5e-9 on an AMD EPYC)
    rounding = (
        10 * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(A, 2) * x.norm() / b.norm())
    )
    assert float((A @ x - b).norm() / b.norm()) == pytest.approx(info.residual, rel=0.5, abs=rounding)
    assert info.residual < 1e-5 and float((x - xd).norm() / xd.norm()) < 1e-4


def test_dense_fallback_when_gmres_fails_on_a_small_system():
    """A ReLU chain with an exact null space at eps = 1e-8 (n = 28, cond 1.2e9): the perturbed sweep's
    1 / tau directions left refinement and 120 GMRES iterations at residual 0.3, and the system was
    refused as singular (a review's random grid: 13 of 2680 cases like it). Small systems fall back to a
    dense LU, and it is solved to dense accuracy."""
    import random

    rnd = random.Random(36)
    torch.manual_seed(36)
    depth = rnd.randint(1, 4)
    widths = [rnd.randint(2, 7) for _ in range(depth + 1)]
    rnd.randint(2, 8), rnd.random()  # batch size and loss draws of the review's generator
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], dtype=torch.float64))
        if i < depth - 1:
            rnd.choice(range(5))
            layers.append(nn.ReLU())
    m = nn.Sequential(*layers)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(rnd.choice([1.0, 2.0]))
    X, y = torch.randn(2, widths[0], dtype=torch.float64), torch.randn(2, widths[-1], dtype=torch.float64)
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    _, Hd = autograd_gradient_hessian(m, nn.MSELoss(), X, y)
    A = Hd + 1e-8 * torch.eye(Hd.shape[0], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(A)
    assert float(ev.abs().max() / ev.abs().min()) < 1e10
    b = torch.randn(Hd.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        x, info = H.factor(1e-8).solve(b, return_info=True)
    assert info.residual < 1e-6
    assert float((x - torch.linalg.solve(A, b)).norm() / x.norm()) < 1e-6


def test_ill_conditioned_pivot_is_not_certified(monkeypatch):
    """A LayerNorm chain at eps = 1e-8 (cond 4e9): a pivot with eigenvalues ~eps makes the stages before
    it exact only up to ~u cond^2 -- the sweep's inertia was wrong (11, 0, 15 against dense 9, 0, 17) yet
    marked certified, and logdet was off by 5.8 silently. Now: not certified; logdet comes from a dense
    LU at this size (it warned before), and warns where n is above the dense fallback's limit; at eps =
    1e-5 both are exact and certified."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    _, Hd = autograd_gradient_hessian(m, nn.MSELoss(), X, y)
    F = H.factor(1e-8)
    assert not F._certified  # the pivots' counts; F.inertia is recounted (dense LDL^T at this size)
    ev8 = torch.linalg.eigvalsh(Hd + 1e-8 * torch.eye(Hd.shape[0], dtype=torch.float64))
    assert tuple(F.inertia) == (int((ev8 < 0).sum()), 0, int((ev8 > 0).sum())) and F.inertia_certified
    sweep = sum(f.pivot.logdet() for f in F.factors if f is not None)
    want = torch.linalg.slogdet(Hd + 1e-8 * torch.eye(Hd.shape[0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F.slogdet() == pytest.approx((float(want[0]), float(want[1])), abs=1e-6)
    assert abs(sweep - float(want[1])) > 1e-3  # what the pivots alone give is off
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    with pytest.warns(hessinv.AccuracyWarning, match="ill-conditioned"):
        assert H.factor(1e-8).logdet() == pytest.approx(sweep, rel=1e-12)
    monkeypatch.undo()
    F = H.factor(1e-5)
    ev = torch.linalg.eigvalsh(Hd + 1e-5 * torch.eye(Hd.shape[0], dtype=torch.float64))
    assert F.inertia_certified and tuple(F.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F.logdet() == pytest.approx(float(ev.abs().log().sum()), abs=1e-5)  # cond 4e6
    F = H.factor(1e-3)  # (at 1e-5 the sweep's error estimate, u / c^2 = 7e-5, sends logdet to the LU)
    ev = torch.linalg.eigvalsh(Hd + 1e-3 * torch.eye(Hd.shape[0], dtype=torch.float64))
    assert F.logdet() == pytest.approx(float(ev.abs().log().sum()), abs=1e-8)
    assert F._dense is None  # the pivots' product, no dense matrix formed


@pytest.mark.parametrize("scale", [1e200, 1e158, 1e-300])
def test_solve_reports_its_residual_at_extreme_right_hand_side_scales(scale):
    """The refined solve's residual norms are taken on power-of-two-scaled columns: at 1e200 the
    reported residual was NaN (overflow), at 1e158 and 1e-300 it was 0 and refinement was skipped."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    F = H.factor(1e-3)
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x1, info1 = F.solve(b, return_info=True)
    x, info = F.solve(b * scale, return_info=True)
    assert math.isfinite(info.residual) and 0 < info.residual < 1e-12
    assert float((x / scale - x1).norm() / x1.norm()) < 1e-12


def test_perturbed_pivot_counts_and_stays_nonsingular():
    """A pivot whose D has an eigenvalue below p u max|Q| is perturbed (sign kept), not refused."""
    lam = torch.tensor([-2.0, -1.0, 1e-16, 0.5, 1.0, 3.0], dtype=torch.float64)
    P = torch.eye(6, dtype=torch.float64)[[3, 0, 5, 2, 1, 4]]
    Q = (P * lam) @ P.T  # a permuted diagonal: D = lam, up to order
    with pytest.raises(SingularError):
        Pivot(Q.clone(), 3, "stage 3", 0.0)  # strict, no perturbation: refused as before
    piv = Pivot(Q.clone(), 3, "stage 3", 0.0, perturb=True)
    assert piv.perturbed == 1 and piv.inertia == (2, 0, 4) and not piv.positive_definite
    x = piv.solve(torch.ones(6, 1, dtype=torch.float64))
    assert torch.isfinite(x).all() and float(x.abs().max()) < 1e15  # bounded by 1 / (p u max|Q|)


def pick_shift(ev: torch.Tensor) -> float | None:
    """A damping with ``H + eps I`` indefinite and well separated from singular."""
    scale = float(ev.abs().max())
    neg = ev[ev < -1e-6 * scale]
    if neg.numel() == 0 or neg.numel() == ev.numel():
        return None
    cands = ev[: neg.numel() + 1]
    gaps = cands[1:] - cands[:-1]
    i = int(gaps.argmax())
    if gaps[i] < 1e-5 * scale:
        return None
    return -float(cands[i] + cands[i + 1]) / 2


@settings(max_examples=N_CHAINS)
@given(chains(max_depth=6, max_width=6, max_batch=5, residual=False), st.sampled_from([None, 1e-3, 0.3]))
def test_indefinite_solve_inertia_and_eigenvalues_against_dense(prob, forced):
    """Random indefinite chains: inertia (certified counts), refined residual and error against the
    dense solve, with and without forced static pivot perturbation (threshold ``forced`` * max|Qxx|,
    far above sqrt(u): many pivots perturbed, refinement / GMRES must recover)."""
    g_ref, H_ref = dense_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    ev = torch.linalg.eigvalsh(H_ref)
    eps = pick_shift(ev)
    if eps is None:
        return
    H = hessinv.hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    n = H.shape[0]
    cond = float((ev + eps).abs().max() / (ev + eps).abs().min())
    old = ric.PERTURB_THRESHOLD
    ric.PERTURB_THRESHOLD = forced
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hessinv.AccuracyWarning)
            F = H.factor(eps)
            x, info = F.solve(g_ref, return_info=True)
    finally:
        ric.PERTURB_THRESHOLD = old
    if F.inertia_certified:
        assert F.inertia == count(ev, eps), prob.description
    else:
        assert forced is not None and F.perturbed
    if cond < 1e10:
        assert info.residual < 1e-12, (prob.description, info, cond)
        assert rel(x, torch.linalg.solve(H_ref + eps * torch.eye(n, dtype=H_ref.dtype), g_ref)) < 1e-12 * cond


@settings(max_examples=max(N_CHAINS // 2, 3))
@given(chains(max_depth=5, max_width=6, max_batch=5, residual=False))
def test_eigenpairs_and_min_eigenvalue_against_dense(prob):
    """k smallest / largest / nearest a shift, and lambda_min, against eigvalsh; certified by inertia.
    (Lanczos even on these small operators: the dense shortcut is switched off.)"""
    cv = hessinv.curvature
    old = cv._DENSE_EIG, cv._DENSE_FRACTION
    cv._DENSE_EIG, cv._DENSE_FRACTION = 2, 0
    try:
        check_eigenpairs(prob)
    finally:
        cv._DENSE_EIG, cv._DENSE_FRACTION = old


@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_many_eigenpairs_of_a_moderate_operator(which):
    """k = 40 of n = 197 (ARPACK's restarts took 88 s at k = 54 of n = 246, the dense shortcut a few ms):
    the values are dense eigvalsh's, certified unless a tie straddles the interval's end."""
    torch.manual_seed(4)
    act = nn.Sigmoid
    net = nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 9)).double()
    X, y = torch.randn(15, 5, dtype=torch.float64), torch.randint(0, 9, (15,))
    g, Hd = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    e = H.eigenpairs(40, which)
    ref = ev[:40] if which == "smallest" else ev[-40:]
    assert torch.allclose(e.values, ref, atol=1e-10) and e.solves < 200
    lo, hi = e.interval
    assert e.certified == (int(((ev > lo) & (ev < hi)).sum()) == 40)


def check_eigenpairs(prob):
    H = hessinv.hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    ev = torch.linalg.eigvalsh(dense_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)[1])
    n = ev.numel()
    scale = max(float(ev.abs().max()), 1.0)
    assert H.min_eigenvalue(tol=1e-10) == pytest.approx(float(ev[0]), abs=1e-8 * scale), prob.description
    k = min(3, n)
    for which, ref in (("smallest", ev[:k]), ("largest", ev[n - k :])):
        e = H.eigenpairs(k, which, tol=1e-12)
        if e.certified:
            assert torch.allclose(e.values, ref, atol=1e-7 * scale), (which, e.values, ref)
        else:  # a cluster straddling the interval's end: the count says so, never a silent miss
            assert which and (e.values.numel() == k)
        assert float(e.residuals.max()) < 1e-6 * scale
    sigma = float(ev[n // 2]) + 1e-3 * scale
    e = H.eigenpairs(k, "nearest", sigma=sigma, tol=1e-12)
    near = ev[(ev - sigma).abs().argsort()[:k]].sort().values
    if e.certified:
        assert torch.allclose(e.values, near, atol=1e-7 * scale), (e.values, near)
        lo, hi = e.interval
        assert int(((ev > lo) & (ev < hi)).sum()) == k


def readme_problem(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10))
    X, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    return model.to(dtype), X.to(dtype), y


def test_readme_example_runs_in_float32():
    """The README example (float32 default nn.Linear, damping 1e-3) used to raise SingularError."""
    model, X, y = readme_problem(0)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    F = H.factor(damping=1e-3)
    step, info = F.solve(H.gradient, return_info=True)
    assert step.dtype == torch.float32 and info.residual < 1e-12
    assert F.inertia.negative + F.inertia.positive == H.shape[0]
    # the float32 x returned has its own (larger) residual: reported apart, measured against dense
    H64 = hessinv.hessian(model.double(), nn.CrossEntropyLoss(), X.double(), y).to_dense()
    g64 = H.gradient.double()
    r = g64 - (H64 + 1e-3 * torch.eye(len(g64), dtype=torch.float64)) @ step.double()
    assert info.returned_residual == pytest.approx(float(r.norm() / g64.norm()), rel=1e-6)
    assert info.returned_residual > 100 * info.residual


def test_exactly_singular_still_refused_with_advice():
    net = nn.Sequential(nn.Linear(6, 2, bias=False)).double()
    X, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    with pytest.raises(SingularError, match=r"singular to working precision.*Choose another damping"):
        H.factor(0.0)
    F = H.factor(1e-3)  # nonsingular: certified
    assert F.inertia_certified and F.positive_definite


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1e-8", 1.0, 1e300])
def test_tolerances_validated(bad):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    H = hessinv.hessian(
        net, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=torch.float64), torch.zeros(5).long()
    )
    with pytest.raises(InvalidArgumentError, match="tol"):
        H.min_eigenvalue(tol=bad)
    with pytest.raises(InvalidArgumentError, match="tol"):
        H.eigenpairs(2, tol=bad)
    if bad not in (0.0, 1.0, 1e300):  # an absolute tolerance: 0 and large are meaningful there
        with pytest.raises(InvalidArgumentError, match="tol"):
            H.inertia(0.0, tol=bad)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(
        InvalidArgumentError, hessinv.HessinvError
    )


def test_nan_shift_is_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    H = hessinv.hessian(
        net, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=torch.float64), torch.zeros(5).long()
    )
    with pytest.raises(InvalidArgumentError, match="shift"):
        H.inertia(float("nan"))
    with pytest.raises(InvalidArgumentError, match="shift"):
        H.is_positive_definite(math.nan)
    with pytest.raises(InvalidArgumentError, match="sigma"):
        H.eigenpairs(1, "nearest", sigma=math.nan)
    with pytest.raises(InvalidArgumentError, match="sigma"):  # not silently ignored
        H.eigenpairs(1, "smallest", sigma=0.5)
    with pytest.raises(InvalidArgumentError, match="k must be"):
        H.eigenpairs(True)
    assert H.eigenpairs(np.int64(2)).values.shape == (2,)
    with pytest.raises(InvalidArgumentError, match="shifts"):
        hessinv.spectrum.eigenvalue_counts(H, ["a"])
    with pytest.raises(InvalidArgumentError, match="damping"):
        hessinv.spectrum.logdet(H, "a")


def test_block_map_against_eigh():
    """Modified Cholesky / perturbation per Bunch-Kaufman block: each block's eigenvalues mapped, its
    eigenvectors kept (against dense eigh of the block diagonal)."""
    from hessinv.riccati import _block_eigenvalues, _map_blocks

    g = torch.Generator().manual_seed(5)
    p = 9
    d = torch.randn(p, generator=g, dtype=torch.float64).numpy()
    e = torch.randn(p, generator=g, dtype=torch.float64).numpy()
    k = np.array([0, 3, 6])  # 2x2 blocks at rows (0,1), (3,4), (6,7); 1x1 at 2, 5, 8
    e[np.setdiff1d(np.arange(p), k)] = 0.0

    def dense(d_, e_):
        D = np.diag(d_)
        D[k, k + 1] = D[k + 1, k] = e_[k]
        return D

    ev = _block_eigenvalues(d, e, k)
    assert np.allclose(np.sort(ev), np.linalg.eigvalsh(dense(d, e)))
    floor = lambda x: np.maximum(np.abs(x), 0.5)  # noqa: E731
    perturb = lambda x: np.where(np.abs(x) < 0.3, np.where(x < 0, -0.3, 0.3), x)  # noqa: E731
    for f in (floor, perturb):
        d2, e2, ev2, count = _map_blocks(d, e, k, ev, f)
        lam, V = np.linalg.eigh(dense(d, e))
        assert np.allclose(dense(d2, e2), (V * f(lam)) @ V.T, atol=1e-12)
        assert np.allclose(np.sort(ev2), np.sort(f(lam))) and count == int((f(lam) != lam).sum())


def test_modified_pivot_is_positive_definite():
    """modify: |D| floored at the damping gives an SPD pivot with at least one change per negative
    eigenvalue of Q; a positive definite Q (Cholesky) is left as it is."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    Q = A + A.T
    piv = Pivot(Q.clone(), 0, "stage 0", 0.1, cholesky_first=False, modify=True)
    Minv = piv.solve(torch.eye(30, dtype=torch.float64))
    assert torch.allclose(Minv, Minv.T, atol=1e-10) and float(torch.linalg.eigvalsh(Minv).min()) > 0
    assert piv.inertia == (0, 0, 30) and piv.modified >= int((torch.linalg.eigvalsh(Q) < 0).sum())


def test_float32_tiny_right_hand_side():
    """A float32 sweep on a right-hand side of size 1e-30 (a deep chain's vanishing gradient, or its
    residual) used to underflow inside the sweep: columns are scaled by powers of two first."""
    model, X, y = readme_problem(0)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    F = H.factor(damping=1e-2)
    x1 = F.solve(H.gradient)
    x2, info = F.solve(H.gradient * 1e-30, return_info=True)
    # normwise: entries far below the largest carry the normwise refinement error relative to themselves
    # (an entry-wise rtol=1e-4 failed by 1.0e-4 on its smallest entry, 6e-5 of the largest)
    assert info.residual < 1e-12 and rel(x2.double() * 1e30, x1.double()) < 1e-6
    raw = F.solve(H.gradient[:, None] * 1e-30, refine=False).double() * 1e30
    assert rel(raw, F.solve(H.gradient[:, None], refine=False).double()) < 1e-3


def test_float32_perturbed_sweep_uses_the_float64_twin():
    """A float32 sweep that must perturb pivots (cond near 1/sqrt(u32) or beyond) hands over to the float64
    twin at once: residual <= 1e-12, and the inertia is exact (against dense eigvalsh)."""
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    for _ in range(15):  # bias-free tanh chain, width 8, kaiming-normal (tanh gain): cond ~1e7 at eps 1e-3
        layers += [nn.Linear(8, 8, bias=False), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(8, 10, bias=False))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="tanh")
    X, y, loss_fn = torch.randn(8, 8), torch.randint(0, 10, (8,)), nn.CrossEntropyLoss()
    H = hessinv.hessian(model, loss_fn, X, y)
    F = H.factor(1e-3)
    assert F.perturbed and F._f64 is not None
    x, info = F.solve(H.gradient, return_info=True)
    assert x.dtype == torch.float32 and info.residual < 1e-12
    H64 = hessinv.hessian(model.double(), loss_fn, X.double(), y)
    ev = torch.linalg.eigvalsh(H64.to_dense())
    assert F.inertia == count(ev, 1e-3) and F.inertia_certified
    assert F.logdet() == pytest.approx(float((ev + 1e-3).abs().log().sum()), rel=1e-8)
    # the float32 sweep stops at its first perturbed pivot; everything comes from the float64 twin's
    assert len(F.perturbed) == 1
    g64 = H64.gradient
    want = float(g64 @ torch.linalg.solve(H64.to_dense() + 1e-3 * torch.eye(len(ev), dtype=ev.dtype), g64))
    assert F.inverse_quadratic(H.gradient) == pytest.approx(want, rel=1e-4)


@settings(max_examples=max(N_CHAINS // 2, 3))
@given(chains(max_depth=6, max_width=6, max_batch=5), st.sampled_from(["gap", 0.1, 1.0]))
def test_mixed_precision_factorization_against_dense(prob, damping):
    """precision="mixed" on random float64 chains (indefinite shifts included): float64 solutions with
    relative residual <= 1e-12 wherever cond <= 1e10 (a float64 factorization takes over where the
    float32 one cannot precondition), the dense solve's error, the float32 sweep's inertia wherever no
    eigenvalue of H + eps I lies within 1e-4 ||H|| of zero, and log|det| from float64 pivots."""
    g_ref, H_ref = dense_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    ev = torch.linalg.eigvalsh(H_ref)
    eps = pick_shift(ev) if damping == "gap" else damping
    if eps is None:
        return
    n = H_ref.shape[0]
    shifted = ev + eps
    if float(shifted.abs().min()) < 1e-9 * max(float(shifted.abs().max()), 1.0):
        return  # singular to about working precision: not this test's subject
    cond = float(shifted.abs().max() / shifted.abs().min())
    H = hessinv.hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        F = H.factor(eps, precision="mixed")
        x, info = F.solve(g_ref, return_info=True)
    assert isinstance(F, hessinv.MixedFactorization) and x.dtype == torch.float64
    if cond <= 1e10:
        assert info.residual <= 1e-12, (prob.description, info, cond)
        ref = torch.linalg.solve(H_ref + eps * torch.eye(n, dtype=torch.float64), g_ref)
        assert rel(x, ref) < 1e-12 * cond + 1e-14, prob.description
        # v^T (H + eps I)^-1 v to the refined solve's accuracy (it was the float32 sweep's sum: 3e-3 off)
        q_err = abs(F.inverse_quadratic(g_ref) - float(g_ref @ ref))
        assert q_err <= (1e-12 * cond + 1e-14) * float(g_ref.norm() * ref.norm()), prob.description
    scale = float(ev.abs().max()) + abs(eps)
    if float(shifted.abs().min()) > 1e-4 * scale:
        assert F.inertia == count(ev, eps), prob.description
    assert not F.inertia_certified or F._low is None
    assert F.logdet() == pytest.approx(float(shifted.abs().log().sum()), rel=1e-9, abs=1e-9 * n)


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_mixed_precision_slogdet_sign_near_an_eigenvalue(side):
    """A shift 1e-9 ||H|| on either side of an eigenvalue (cond ~1e9): the float32 sweep cannot tell
    the two apart, but slogdet's sign -- (-1)^(negatives) -- must be the dense one on both sides."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    A = H.to_dense()
    ev = torch.linalg.eigvalsh(A)
    eps = -float(ev[1]) + side * 1e-9 * float(ev.abs().max())
    sign, value = torch.linalg.slogdet(A + eps * torch.eye(len(ev), dtype=A.dtype))
    F = H.factor(eps, precision="mixed")
    assert F.slogdet()[0] == float(sign)
    assert F.slogdet()[1] == pytest.approx(float(value), abs=1e-5)  # u cond ~ 1e-7 (either one)


def test_mixed_precision_is_validated_and_falls_back_to_float64():
    """Named errors for a bad precision or a mixed factorization of a modified / Woodbury matrix; a float32
    sweep that must perturb a pivot (cond ~1e7) makes the whole factorization float64 (certified inertia,
    residual <= 1e-12)."""
    model, X, y = readme_problem(0, dtype=torch.float64)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(InvalidArgumentError, match="precision"):
        H.factor(1e-2, precision="half")
    with pytest.raises(InvalidArgumentError, match="modify"):
        H.factor(1e-2, modify="abs", precision="mixed")
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(InvalidArgumentError, match="Riccati"):
        G.factor(torch.ones(G.shape[0], dtype=torch.float64), precision="mixed")
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    for _ in range(15):  # the chain of test_float32_perturbed_sweep_uses_the_float64_twin, in float64
        layers += [nn.Linear(8, 8, bias=False), nn.Tanh()]
    deep = nn.Sequential(*layers, nn.Linear(8, 10, bias=False))
    for m in deep:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="tanh")
    deep = deep.double()
    H = hessinv.hessian(deep, nn.CrossEntropyLoss(), torch.randn(8, 8).double(), torch.randint(0, 10, (8,)))
    F = H.factor(1e-3, precision="mixed")
    assert F._low is None and F.inertia_certified
    x, info = F.solve(H.gradient, return_info=True)
    assert info.residual < 1e-12
    ev = torch.linalg.eigvalsh(H.to_dense())
    assert F.inertia == count(ev, 1e-3)


def _dead_relu_net(width: int, batch: int, seed: int):
    """A ReLU net whose Hessian has a large exact null space (units dead on the whole batch)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    ).double()
    X, y = torch.randn(batch, 12, dtype=torch.float64), torch.randint(0, 4, (batch,))
    return m, nn.CrossEntropyLoss(), X, y


def test_nearest_eigenpairs_at_a_multiple_eigenvalue():
    """sigma = 0 on a Gauss-Newton matrix with a null space: the factorization's shift must move off
    the eigenvalue, but the pairs returned and the certificate are about sigma itself: eigenvalues
    ~0, and not certified (far more than k eigenvalues lie that close to sigma)."""
    G = hessinv.gauss_newton(*_dead_relu_net(16, 8, 7))
    e = G.eigenpairs(2, "nearest", sigma=0.0)
    assert e.values.abs().max() < 1e-10
    assert not e.certified and e.interval[0] <= 0.0 <= e.interval[1]
    # a cluster: one rerun, dense (Lanczos reruns with ever more pairs took 248 s at n = 4000)
    assert e.factorizations <= 6


@pytest.mark.parametrize("seed", range(3))
def test_nearest_eigenpairs_inside_a_cluster(seed):
    """sigma = 0 inside a cluster of eigenvalues ~1e-8 wide (weights scaled by 1e-3): the pairs returned
    are the k nearest sigma itself (they were the nearest the factorization's moved shift: 2e-8 to 9e-8
    off), uncertified (the interval holds more than k)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(9, 2), nn.GELU(), nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.mul_(1e-3)
    X, y = torch.randn(4, 9, dtype=torch.float64), torch.randint(0, 2, (4,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    _, Hd = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    for k in (1, 7):
        e = H.eigenpairs(k, "nearest", sigma=0.0)
        near = ev[ev.abs().argsort()[:k]].sort().values
        assert float((e.values - near).abs().max()) <= 1e-10 * float(ev.abs().max())


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_nearest_eigenpairs_of_a_sigma_far_outside_the_spectrum(side):
    """sigma = +-1e6 ||H||: the k nearest are the k largest / smallest. Shift-invert at sigma itself
    squeezed (H - sigma I)^{-1}'s eigenvalues together and returned values 1e-7-6e-7 ||H|| off, certified;
    the factorization now sits just beyond the spectrum."""
    torch.manual_seed(6)
    act = nn.Sigmoid
    net = nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3)).double()
    X, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    _, Hd = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    scale = float(ev.abs().max())
    e = H.eigenpairs(3, "nearest", sigma=side * 1e6 * scale)
    want = ev[-3:] if side > 0 else ev[:3]
    assert e.certified and float((e.values - want).abs().max()) <= 1e-10 * scale


def test_eigenpairs_that_do_not_converge_are_named(monkeypatch):
    """ARPACK out of restarts on an operator above the dense fallback's size: ConvergenceError."""
    monkeypatch.setattr(hessinv.curvature.GaussNewton, "EIG_ROOT_MAX_FLOPS", 0.0)  # (the shift-invert route)
    G = hessinv.gauss_newton(*_dead_relu_net(16, 8, 7))
    monkeypatch.setattr(hessinv.curvature, "_ARPACK_RESTARTS", 1)
    monkeypatch.setattr(hessinv.curvature, "_DENSE_EIG_MAX", 10)
    with pytest.raises(hessinv.ConvergenceError, match="fewer eigenvalues"):
        G.eigenpairs(2, "nearest", sigma=0.0, tol=1e-14)


def test_logdet_of_a_perturbed_factorization(monkeypatch):
    """Pivots perturbed (H + eps I too close to singular for the sweep): the pivots' product is another
    matrix's determinant. The log-determinant comes from a dense LU (it was refused although H + eps I is
    nonsingular) up to n = DENSE_RESCUE_N where it fits -- above DENSE_FALLBACK_N too (it was refused
    there) --, above that logdet and spectrum.logdet raise; an exactly singular H + eps I is refused by
    the dense LU too."""
    m, lf, X, y = _dead_relu_net(24, 16, 8)
    H = hessinv.hessian(m, lf, X, y)
    g, Hd = autograd_gradient_hessian(m, lf, X, y)
    eye = torch.eye(Hd.shape[0], dtype=torch.float64)
    F = H.factor(3e-8)
    assert F.perturbed and not F._certified
    want = torch.linalg.slogdet(Hd + 3e-8 * eye)
    assert F.slogdet() == pytest.approx((float(want[0]), float(want[1])), rel=1e-9)
    assert hessinv.spectrum.logdet(H, 3e-8) == pytest.approx((float(want[0]), float(want[1])), rel=1e-9)
    F._dense = F._dense.clone()  # a matrix singular to working precision: refused, not -inf or noise
    F._dense[0] = F._dense[1] * (1 + 1e-18)
    F._dense_sld = None  # (the first result is kept: a second logdet call repeats no LU)
    with pytest.raises(SingularError, match="singular to working precision"):
        F.logdet()
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    assert H.factor(3e-8).slogdet() == pytest.approx((float(want[0]), float(want[1])), rel=1e-9)
    monkeypatch.setattr(hessinv.curvature, "DENSE_RESCUE_N", Hd.shape[0] - 1)
    with pytest.raises(SingularError, match="perturbed"):
        H.factor(3e-8).logdet()
    with pytest.raises(SingularError):
        hessinv.spectrum.logdet(H, 3e-8)
    monkeypatch.undo()
    F = H.factor(1e-2)  # not perturbed, pivots well conditioned: the pivots' product is det(H + eps I)
    assert not F.perturbed
    want = torch.linalg.slogdet(Hd + 1e-2 * eye)
    assert F.slogdet() == pytest.approx((float(want[0]), float(want[1])), rel=1e-9)
    assert F._dense is None


def test_inertia_warns_below_its_resolution():
    H = hessinv.hessian(*_dead_relu_net(16, 8, 7))
    with pytest.warns(hessinv.AccuracyWarning, match="sqrt"):
        H.inertia(0.0, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H.inertia(0.0)  # the default tol is at the resolution


def test_inertia_window_edge_on_an_exact_null_space():
    """A window edge ``shift + tol`` exactly at an eigenvalue whose pivot is exactly singular (units dead
    on the whole batch: zero rows in Qxx): the count is taken a resolution further out instead of
    raising, and agrees with dense eigenvalues up to that resolution."""
    model, loss_fn, X, y = _dead_relu_net(16, 8, 7)
    H = hessinv.hessian(model, loss_fn, X, y)
    with pytest.raises(SingularError):  # the sweep at the edge itself meets the exact zero pivot
        ric.riccati_factor(H.blocks, 0.0, H._names, H.gradient, strict=False)
    tol = 1e-3
    got = H.inertia(-tol, tol=tol)  # H's eigenvalues in [0, 2 tol]: the null space on the lower edge
    _, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(0.5 * (Hd + Hd.T)) - tol
    floor = H.zero_tolerance()
    assert int((ev < -tol - floor).sum()) <= got.negative <= int((ev < -tol + floor).sum())
    assert int((ev > tol + floor).sum()) <= got.positive <= int((ev > tol - floor).sum())
    assert (
        sum(got) == H.shape[0] and int(((ev + tol).abs() <= floor).sum()) > 0
    )  # the null space: on the edge


def test_inertia_with_zero_tol_at_an_exactly_singular_shift():
    """tol=0 at a shift where the sweep meets an exactly singular pivot (dead units' null space at 0):
    counted at the counts' resolution instead of raising, within it of dense eigenvalues."""
    model, loss_fn, X, y = _dead_relu_net(16, 8, 7)
    H = hessinv.hessian(model, loss_fn, X, y)
    with pytest.raises(SingularError):
        ric.riccati_factor(H.blocks, 0.0, H._names, H.gradient, strict=False)
    got = H.inertia(0.0, tol=0.0)
    _, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    ev, floor = torch.linalg.eigvalsh(0.5 * (Hd + Hd.T)), H.zero_tolerance()
    assert int((ev < -floor).sum()) <= got.negative <= int((ev < floor).sum())
    assert int((ev > floor).sum()) <= got.positive <= int((ev > -floor).sum())


def test_inertia_window_edge_on_an_isolated_eigenvalue_is_exact():
    """An isolated eigenvalue exactly on the window's edge (a diagonal pivot: the sweep is exact) is
    counted as zero, and its neighbour 2e-8 below stays negative: the retry moves by n u ||H||, not by the
    sqrt(u) ||H|| resolution kept for clusters."""
    net = nn.Linear(3, 1, bias=False).double()
    X = torch.diag(torch.tensor([1.0, 1 - 1e-8, 2.0], dtype=torch.float64))
    H = hessinv.hessian(net, nn.MSELoss(reduction="sum"), X, torch.zeros(3, 1, dtype=torch.float64))
    assert tuple(H.inertia(-2.5, tol=0.5)) == (1, 1, 1)  # eig(H) = 2 - 4e-8, 2, 8; window [2, 3]


def test_modified_low_rank_pivot_is_not_refused():
    """modify='abs' floors every pivot eigenvalue at the damping; on a wide-input (low-rank) stage whose
    pivot is 1e7x the damping, the damping on the directions the inputs do not reach is that floor,
    not a sign of singularity (it raised SingularError, crashing Newton(curvature='hessian'))."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight.mul_(1e-3)
    X, y = 1000 * torch.randn(4, 64), torch.tensor([0, 1, 2, 0])
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    F = H.factor(1e-4, modify="abs")
    assert F.inertia == H.inertia(1e-4, tol=0)  # (H + eps I's counts; the factors are M's)
    assert bool(torch.isfinite(F.solve(H.gradient)).all())


def test_float32_min_eigenvalue_of_a_gauss_newton_matrix():
    """A float32 Gauss-Newton matrix with a null space (PSD): lambda_min ~ 0 to the documented accuracy
    (its float32 sweep could not certify below its backward error: -4.8e-6 at ||G|| ~ 0.2)."""
    from reference import autograd_gauss_newton

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(15, 3, bias=False))
    X, y = torch.randn(6, 15), torch.randint(0, 3, (6,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    net64 = copy.deepcopy(net).double()
    ev = torch.linalg.eigvalsh(autograd_gauss_newton(net64, nn.CrossEntropyLoss(), X.double(), y))
    lam = G.min_eigenvalue(tol=1e-8)
    assert abs(lam - float(ev[0])) <= (1e-8 + 10 * 2.2e-16) * max(float(ev[-1]), 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_min_eigenvalue_of_a_psd_gauss_newton_matrix_is_not_negative(seed):
    """A batch of one: G has rank 2 of 45 (lambda_min = 0); its rounding gave -3e-9 to -8e-9. A loss whose
    output curvature is indefinite (a concave lambda) keeps its negative eigenvalue."""
    from reference import autograd_gauss_newton

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(1, 4, dtype=torch.float64), torch.randint(0, 3, (1,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    assert 0.0 <= G.min_eigenvalue() <= 1e-12 * G.norm_estimate()
    concave = lambda out, t: -(out**2).sum()  # noqa: E731
    G = hessinv.gauss_newton(m, concave, X, y)
    ev = torch.linalg.eigvalsh(autograd_gauss_newton(m, concave, X, y))
    ref = float(ev[0])
    assert ref < -1e-3 and abs(G.min_eigenvalue() - ref) <= 1e-7 * float(ev.abs().max())


def test_eigenpairs_of_a_float32_operator_too_large_for_its_sweeps():
    """||H|| ~ 1e22 in float32: the shifts below / above the spectrum cannot be represented; a named
    error says so (it named a "damping 6e22" the caller never passed); min_eigenvalue works (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 2))
    X, y = 1e11 * torch.randn(8, 4), torch.randn(8, 2)
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    with pytest.raises(hessinv.NonFiniteError, match="too large for torch.float32 sweeps"):
        H.eigenpairs(2)
    ev = torch.linalg.eigvalsh(
        hessinv.hessian(copy.deepcopy(net).double(), nn.MSELoss(), X.double(), y.double()).to_dense()
    )
    assert H.min_eigenvalue() == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-8 * float(ev[-1]))


def test_inertia_of_a_perturbed_factorization_is_recounted():
    """A float64 tanh net at eps = 0 (cond 6e5, not singular): the first stage's pivot is perturbed (14
    eigenvalues), and ``F.inertia`` was the perturbed matrix's, (12, 0, 14) against the dense (11, 0,
    15), while ``F.slogdet()``'s sign (from the dense fallback) said an odd count. It is now recounted
    exactly when first read, agrees with ``H.inertia`` and the sign, and is certified."""
    torch.manual_seed(5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # (the probe's script, RNG draws included)
    try:
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        torch.randn(4, 4)
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
        torch.randn(4, 1, 6)
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        X, y = torch.randn(4, 3), torch.randn(4, 2)
    finally:
        torch.set_default_dtype(default)
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    _, Hd = autograd_gradient_hessian(m, nn.MSELoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    want = (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    F = H.factor(0.0)
    assert F.perturbed and not F._certified
    # the perturbed pivots count the perturbed matrix's eigenvalues -- (12, 0, 14) on the machine this was
    # found on; another CPU's rounding (AVX-512 kernels) perturbs them into the right count -- so
    # F.inertia is never theirs: it is recounted when first read
    assert F._recount_due
    assert tuple(F.inertia) == want and F.inertia_certified
    assert F.slogdet()[0] == (-1.0 if want[0] % 2 else 1.0) == float(torch.linalg.slogdet(Hd)[0])
    assert tuple(H.inertia(0.0)) == want


def test_eigenvalues_of_a_hessian_of_tiny_norm_are_relative():
    """||H|| ~ 1e-9 (a loss scaled by 1e-9; a deep GELU chain at initialization has such Hessians): the
    accuracy of min_eigenvalue and the padding of eigenpairs' counts were absolute, ``max(||H||, 1)``, so
    min_eigenvalue returned +2.8e-12 for lambda_min = -1.2e-9 and eigenpairs certified nothing; now relative
    to ||H||, as for any other scale."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ce = nn.CrossEntropyLoss()

    def lf(o, t):
        return 1e-9 * ce(o, t)

    H = hessinv.hessian(m, lf, X, y)
    _, Hd = autograd_gradient_hessian(m, lf, X, y)
    ev = torch.linalg.eigvalsh(Hd)
    norm = float(ev.abs().max())
    assert norm < 1e-8 and float(ev[0]) < -0.5 * norm
    assert abs(H.min_eigenvalue() - float(ev[0])) <= 1e-7 * norm
    for which, ref in (("smallest", ev[:3]), ("largest", ev[-3:])):
        e = H.eigenpairs(3, which)
        assert e.certified and float((e.values - ref).abs().max()) <= 1e-10 * norm


def test_eigenvalues_of_a_hessian_beyond_float64s_range_are_a_named_error():
    """Inputs scaled by 1e160 (entries of H ~ 1e159, products overflow): eigenpairs raised numpy's raw
    LinAlgError, min_eigenvalue complained about a shift the user never passed, and the norm estimate
    told a float64 model to use a float64 model (it now returns ||H||, a float64 number)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    X, y = 1e160 * torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    calls = (lambda: H.eigenpairs(2), lambda: H.eigenpairs(2, "largest"), H.min_eigenvalue)
    for call in calls:
        # (block Lanczos's QR norms do not overflow: eigenpairs then meets its own limit on the shifts)
        with pytest.raises(hessinv.NonFiniteError, match=r"torch.float64.*rescale the loss") as err:
            call()
        assert "float64 model" not in str(err.value)
    # ||H|| ~ 1e160 itself is a float64 number: the norm estimate (scaled norms since 2026-12-03) gives it
    assert 1e150 < H.norm_estimate() < 1e170


def test_log_determinant_of_a_float32_model_comes_from_float64():
    """A float32 tanh net (n = 171) at damping -0.01 (cond 4e4, every pivot well conditioned): slogdet
    summed the float32 pivots' logarithms, -621.092 against the float64 model's -621.0736 (1.8e-2 off,
    certified, no warning). It now comes from the float64 twin, as the solves' refinement does."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6), nn.Tanh()]
    for _ in range(3):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    m = nn.Sequential(*layers, nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, Hd = autograd_gradient_hessian(copy.deepcopy(m).double(), nn.CrossEntropyLoss(), X.double(), y)
    want = torch.linalg.slogdet(Hd - 0.01 * torch.eye(Hd.shape[0], dtype=torch.float64))
    sign, value = H.factor(-0.01).slogdet()
    assert sign == float(want[0]) and value == pytest.approx(float(want[1]), rel=1e-10)


def test_min_eigenvalue_of_a_zero_hessian_is_zero():
    """H = 0 (zero inputs into a bias-free Linear): min_eigenvalue gave -4e-39 once its accuracy became
    relative (a negative eigenvalue for a PSD matrix); the slogdet of a modified factorization is refused
    like its logdet (it answered with the float64 twin's unmodified value)."""
    m = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    X, y = torch.zeros(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for op in (hessinv.hessian(m, nn.MSELoss(), X, y), hessinv.gauss_newton(m, nn.MSELoss(), X, y)):
        assert op.min_eigenvalue() == 0.0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))  # float32
    H = hessinv.hessian(net, nn.MSELoss(), torch.randn(6, 3), torch.randn(6, 2))
    F = H.factor(1e-3, modify="abs")
    assert any(f.pivot.modified for f in F.factors if f is not None)
    with pytest.raises(hessinv.InvalidArgumentError, match="modified its pivots"):
        F.slogdet()


def _dense_route_case(dtype=torch.float64):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    X, y = torch.randn(12, 3, dtype=dtype), torch.randint(0, 3, (12,))
    return m, X, y


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_the_dense_route_answers_like_the_chain(monkeypatch, curvature):
    """The dense route (``H`` as one block, for large curvature batches on small models) forced on a
    small chain: solves, inertia, log-determinant, lambda_min, eigenpairs, samples' covariance and the
    mixed-precision factorization agree with dense float64 references."""
    import hessinv.curvature as hc

    monkeypatch.setattr(hc.CurvatureOperator, "_dense_cheaper", lambda self: True)
    m, X, y = _dense_route_case()
    build = hessinv.hessian if curvature == "hessian" else hessinv.gauss_newton
    op = build(m, nn.CrossEntropyLoss(), X, y)
    assert op._swept() is not op and len(op._swept().blocks) == 1
    A = op.to_dense()
    n = A.shape[0]
    ev = torch.linalg.eigvalsh(A)
    for eps in (0.05, 1.0) if curvature == "hessian" else (1e-3, 1.0):
        F = op.factor(eps)
        Ae = A + eps * torch.eye(n, dtype=torch.float64)
        b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x, info = F.solve(b, return_info=True)
        assert info.residual < 1e-12
        torch.testing.assert_close(Ae @ x, b, rtol=1e-10, atol=1e-10)
        lam = ev + eps
        assert tuple(F.inertia) == (int((lam < 0).sum()), 0, int((lam > 0).sum()))
        assert F.slogdet()[1] == pytest.approx(float(torch.linalg.slogdet(Ae)[1]), rel=1e-10, abs=1e-10)
        Fm = op.factor(eps, precision="mixed")
        assert Fm.solve(b, return_info=True)[1].residual < 1e-12
    top = float(ev.abs().max())  # min_eigenvalue's accuracy: tol (1e-8) relative to ||H||
    assert op.min_eigenvalue() == pytest.approx(float(ev[0]), abs=1e-8 * top)
    pairs = op.eigenpairs(2)
    torch.testing.assert_close(pairs.values, ev[:2], rtol=1e-8, atol=1e-8 * top)
    shift = max(0.0, -float(ev[0])) + 0.5
    S = op.factor(shift).inverse_sqrt(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(
        S @ S.T, torch.linalg.inv(A + shift * torch.eye(n, dtype=torch.float64)), rtol=1e-9, atol=1e-10
    )
    assert op.factor_if_positive_definite(shift) is not None


def test_a_batch_whose_sweep_would_not_fit_takes_the_dense_route():
    """A 29-parameter chain on 20,000 examples: the chain's sweep would hold 60,000 x 60,000 blocks
    (TooLargeError before), the dense 29 x 29 matrix is exact and small. Checked against the dense
    Hessian, and a Laplace evidence is computed."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(20000, 2, dtype=torch.float64), torch.randint(0, 2, (20000,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert len(H._swept().blocks) == 1
    _, Hd = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    F = H.factor(0.01)
    x = F.solve(H.gradient)
    torch.testing.assert_close((Hd + 0.01 * torch.eye(29, dtype=torch.float64)) @ x, H.gradient)
    ev = torch.linalg.eigvalsh(Hd) + 0.01
    assert tuple(F.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    from hessinv.laplace import Laplace

    la = Laplace(m, "classification").fit(X, y)
    assert math.isfinite(la.log_marginal_likelihood())


def test_the_dense_route_with_mixed_precision_that_falls_back_to_float64(monkeypatch):
    """Review: a mixed-precision factorization whose float32 sweep must perturb a pivot factors the
    float64 operator instead; on the dense route its solves paired the chain's blocks with the one
    dense factor (IndexError)."""
    import hessinv.curvature as hc

    monkeypatch.setattr(hc.CurvatureOperator, "_dense_cheaper", lambda self: True)
    m, X, y = _dense_route_case()
    op = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)  # a null space: G + tiny eps is near singular
    eps = 1e-7 * op.norm_estimate()
    F = op.factor(eps, precision="mixed")
    assert F._low is None
    A = op.to_dense() + eps * torch.eye(op.shape[0], dtype=torch.float64)
    x, info = F.solve(op.gradient, return_info=True)
    assert float((A @ x - op.gradient).norm() / op.gradient.norm()) < 1e-8
    assert info.residual < 1e-8


def test_mixed_precision_below_float32_range_falls_back_to_float64():
    """A loss in units of 1e-42 (curvature below float32's normal range): the float32 sweep saw zero pivots
    and raised "H + eps I is singular -- choose a damping > 0" at a positive damping, cond 4e2."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ce = torch.nn.CrossEntropyLoss()
    H = hessinv.hessian(net, lambda out, t: ce(out, t) * 1e-42, X, y)
    eps = 1e-44
    A = H.to_dense() + eps * torch.eye(H.shape[0], dtype=torch.float64)
    b = torch.randn(H.shape[0], dtype=torch.float64)
    x = H.factor(eps, precision="mixed").solve(b)
    assert rel(x, torch.linalg.solve(A, b)) < 1e-12


def test_float32_nearest_eigenpairs_on_an_eigenvalue_are_accurate():
    """A float32 operator, sigma on one of its eigenvalues, the 2 nearest: shift-invert through the
    float32 factorization there resolved the second pair poorly (a value 1e-2 ||H|| off, residual 3e-2
    ||H||, returned uncertified without a warning, where dense eigh was at hand: n = 73, found by a
    review). Inaccurate residuals now rerun dense up to n = 4096; every value is within float32's
    resolution of the true nearest ones (plain autograd reference), certified where no third eigenvalue
    is within the counts' resolution (sqrt(u) ||H||) of the second."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.SiLU(), nn.Linear(5, 3))
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    _, Hd = autograd_gradient_hessian(copy.deepcopy(m).double(), nn.CrossEntropyLoss(), X.double(), y)
    ev = torch.linalg.eigvalsh(Hd)
    scale = float(ev.abs().max())
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    for i in range(1, 73, 3):
        sigma = float(ev[i])
        with warnings.catch_warnings():
            warnings.simplefilter("error", hessinv.AccuracyWarning)
            e = H.eigenpairs(2, "nearest", sigma=sigma)
        want = ev[(ev - sigma).abs().argsort()[:2]].sort().values
        assert float((e.values - want).abs().max()) <= 1e-4 * scale, (i, e.values, want)
        assert float(e.residuals.max()) <= 1e-3 * scale, (i, e.residuals)
        d = (ev - sigma).abs().sort().values
        if float(d[2] - d[1]) > 1e-3 * scale:  # (a third eigenvalue within the counts' resolution: a cluster)
            assert e.certified, i


def test_a_first_stage_coupling_many_outputs_is_counted():
    """A 30-16-2 tanh MLP on 455 examples: the first stage's Jx^T Sigma Jx on its 455 x 16 outputs was
    left out of the sweep's modelled cost (1.9e9 flops against 2.8e10 done: 0.75 s a factorization, where
    the dense route takes 0.15 s), and an 8-16-16-3 MLP's estimate fell from 48 to 64 examples, so that
    Newton's mode="auto" refused the full-batch trust region at 48 examples and took it at 32 and 64 (a
    probe). The first stage's coupling is counted: the dense route, and the trust region from 32 to 96
    examples alike."""
    import hessinv.curvature as hc

    chain, dense = hc._factorization_costs([496, 34], [30, 16], [455, 455], 455 * 2)
    assert chain > 2e10 and hc.factorization_flops([496, 34], [30, 16], 455, outputs=2) == dense
    est = [hc.factorization_flops([144, 272, 51], [8, 16, 16], n, outputs=3) for n in (32, 48, 64, 96, 200)]
    assert max(est[:4]) <= hessinv.optim.newton.TRUST_REGION_MAX_FLOPS < est[4]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    X, y = torch.randn(48, 8), torch.randint(0, 3, (48,))
    opt = hessinv.optim.Newton(net, nn.CrossEntropyLoss(), seed=0)
    for _ in range(2):
        opt.step(X, y)
    assert opt.mode == "trust-region"


def test_a_small_model_on_a_large_batch_takes_the_dense_route():
    """A 10-16-1 tanh MLP on 442 examples (n = 193): the sweep's last stage couples a = 7072 activations
    (8.6e8 modelled flops, memory-bound) where the dense route costs 1.3e8 (n products and n^3 / 3). The
    route needed over 1e9 flops before: 0.83 s per factorization and solve against 11 ms, and Newton's
    full-batch trust region, which judged it by the dense estimate, took 0.5-1.5 s per step (a review).
    The factorization now takes the route its cost estimate names; answers checked against autograd."""
    import hessinv.curvature as hc

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    X, t = torch.randn(442, 10, dtype=torch.float64), torch.randn(442, 1, dtype=torch.float64)
    H = hessinv.hessian(net, nn.MSELoss(), X, t)
    sizes, widths = [b.p for b in H.blocks[:-1]], [b.d_in for b in H.blocks[:-1]]
    chain, dense = hc._factorization_costs(sizes, widths, [442] * len(sizes))
    assert chain > 3 * dense and hc.factorization_flops(sizes, widths, 442) == dense
    # another device keeps the previous floor, 1e9 flops (not measured there), which the first stage's
    # coupling of its 7072 outputs (8.8e9 flops, counted since) exceeds too
    assert hc.factorization_flops(sizes, widths, 442, cpu=False) == dense
    assert chain > hc.DENSE_ROUTE_MIN_FLOPS_DEVICE
    assert len(H._swept().blocks) == 1  # the dense view
    _, Hd = autograd_gradient_hessian(net, nn.MSELoss(), X, t)
    F = H.factor(1e-3)
    x = F.solve(H.gradient)
    torch.testing.assert_close((Hd + 1e-3 * torch.eye(193, dtype=torch.float64)) @ x, H.gradient)


@pytest.mark.parametrize("seed", range(4))
def test_the_reversed_order_factor_of_a_perturbed_pivot(monkeypatch, seed):
    """The reversed-order Bunch-Kaufman of a pivot to perturb (taken where the forward factor has an
    entry above PERTURB_MAX_L; forced here by a bound of 0): its permutation maps back to Q's order,
    P^T Q P = L D L^T within the perturbation, and a consistent system is solved."""
    monkeypatch.setattr(ric, "PERTURB_MAX_L", 0.0)
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(24, 8, generator=g, dtype=torch.float64)
    Q = V @ torch.diag(torch.randn(8, generator=g, dtype=torch.float64)) @ V.T  # rank 8, indefinite
    piv = Pivot(Q.clone(), 0, "q", 0.0, perturb=True, cholesky_first=False)
    assert piv.perturbed == 16
    L = piv.L.tril(-1) + torch.eye(24, dtype=torch.float64)
    Dinv = piv._dsolve(torch.eye(24, dtype=torch.float64))
    Qp = Q[piv.perm][:, piv.perm]
    tau = ric._perturb_tau(torch.float64, float(Q.abs().max()), 24)
    assert float((L @ torch.linalg.inv(Dinv) @ L.T - Qp).abs().max()) <= 10 * tau * float(L.abs().max()) ** 2
    b = Q @ torch.randn(24, 1, generator=g, dtype=torch.float64)
    assert float((Q @ piv.solve(b) - b).norm() / b.norm()) < 1e-6


@pytest.mark.parametrize("dtype,c", [(torch.float32, 1e-33), (torch.float64, 1e-300)])
def test_a_curvature_at_the_bottom_of_the_range_is_factored_not_called_singular(dtype, c):
    """A loss scaled by 1e-300 (float64; 1e-33 in float32), damping 5% of that: a well-conditioned
    ``H + eps I`` (cond ~40) was refused with SingularError ("pivot Qxx is zero ... choose a damping >
    0"): the pivot perturbation's size underflowed, and the refusal came before asking whether the
    pivot needed one. The solution is that of the unscaled problem (autograd reference)."""
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    X, y = torch.randn(8, 3, dtype=dtype), torch.randint(0, 3, (8,))
    g, Hd = autograd_gradient_hessian(copy.deepcopy(m).double(), ce, X.double(), y)
    A = Hd + 0.05 * torch.eye(Hd.shape[0], dtype=torch.float64)
    H = hessinv.hessian(m, lambda o, t: ce(o, t) * c, X, y)
    F = H.factor(0.05 * c)
    x = F.solve(H.gradient)
    xr = torch.linalg.solve(A, g)
    assert float((x.double() - xr).norm() / xr.norm()) < (1e-5 if dtype == torch.float32 else 1e-12)
    ev = torch.linalg.eigvalsh(A)
    assert F.inertia.negative == int((ev < 0).sum())


@pytest.mark.parametrize("rel", [1e-15, 1e-14])
def test_a_system_of_cond_below_one_over_u_is_solved_not_refused(rel):
    """A ReLU net with dead units (a null space of H), eps = 1e-14 / 1e-15 |H|: cond 1e14 / 1e15, below
    1 / u = 4.5e15, was refused as singular (the rule refused from cond ~ 1 / (100 u), on a cond estimate
    a random right-hand side puts sqrt(n) low). It is solved, with a residual that is the true one and
    as small as a dense LU's (found by a review of the solver)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        m[0].bias[:3] = -100.0
        m[2].bias[:2] = -100.0
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    _, Hd = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    eps = rel * float(ev.abs().max())
    A = Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)
    cond = float((ev + eps).abs().max() / (ev + eps).abs().min())
    assert 1e13 < cond < 0.5 / torch.finfo(torch.float64).eps
    b = torch.randn(Hd.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)  # (its residual is ~ u cond)
        F = H.factor(eps)
        x, info = F.solve(b, return_info=True)
    true = float((b - A @ x).norm() / b.norm())
    lu = float((b - A @ torch.linalg.solve(A, b)).norm() / b.norm())
    # the reported residual is the O(L) product's: at cond 1e14-1e15 it and a dense product's are each
    # x's residual up to the rounding of evaluating one, u || |A| |x| || / |b| (2e-3 here, above the
    # residuals themselves: 3.3e-4 reported against 1.1e-3 dense on an AMD EPYC, within 3x on an Intel Xeon)
    rounding = torch.finfo(torch.float64).eps * float((A.abs() @ x.abs()).norm() / b.norm())
    assert abs(true - info.residual) <= rounding
    assert true < lu and info.residual < lu


def test_an_exactly_singular_system_with_perturbed_pivots_is_still_refused():
    """The other side of that rule: H of rank 3 (n = 12) at eps = 0, and at eps = -lambda_max."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 2, bias=False)).double()
    X, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    lam = float(torch.linalg.eigvalsh(autograd_gradient_hessian(net, nn.MSELoss(), X, y)[1])[-1])
    for eps in (0.0, -lam):
        with pytest.raises(SingularError, match="singular to working precision"):
            H.factor(eps)


def test_a_singular_system_with_no_singular_pivot_is_refused_when_a_solve_finds_no_solution():
    """eps = -lambda exactly, where no Riccati pivot is singular on its own (none perturbed): the solve
    returned |x| ~ 1e15 with residual 0.67 and a warning (worse than x = 0; found by a solver review).
    A solve that leaves a residual above 1e-2 now runs the factorization's singularity probe."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    _, Hd = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    lam = float(torch.linalg.eigvalsh(Hd)[46])
    F = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).factor(-lam)
    assert not F.perturbed
    b = torch.randn(Hd.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SingularError, match="though no Riccati pivot is"):
        F.solve(b)


def test_singular_systems_whose_probe_solution_stays_small_are_refused():
    """A saturated tanh chain (gain 6) at eps = -lambda_i, cond 1e17-1e18: the second probe solve alone
    accepted it (its solution never grew into the null space: cond estimate 5e10) and a random
    right-hand side came back with residual 0.07-0.26 (found by a review of this rule). A first residual
    above 1e-2 that x's size does not explain (more than 10 u |A| |x| / |b|) is refused."""
    torch.manual_seed(5)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    X, y = torch.randn(3, 3, dtype=torch.float64), torch.randint(0, 2, (3,))
    _, Hd = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    for i in (15, 28):
        shifted = torch.linalg.eigvalsh(Hd - ev[i] * torch.eye(Hd.shape[0], dtype=torch.float64)).abs()
        assert float(shifted.max() / shifted.min()) > 1e16  # singular to working precision
        with pytest.raises(SingularError, match="singular to working precision"):
            H.factor(-float(ev[i]))


def test_a_singular_system_at_the_bottom_of_the_float_range_is_named():
    """A loss scaled by 1e-295 at eps = -lambda_i (singular): a low-rank pivot's perturbation underflowed
    to 0 and the Schur update divided by it (a raw ZeroDivisionError; found by a review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    base = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    _, Hd = autograd_gradient_hessian(model, base, X, y)
    lam = float(torch.linalg.eigvalsh(Hd)[12])
    H = hessinv.hessian(model, lambda o, t: 1e-295 * base(o, t), X, y)
    with pytest.raises(SingularError):
        H.factor(damping=-1e-295 * lam)


def test_fgmres_stops_where_a_sweep_overflows_and_keeps_its_best():
    """A preconditioner that overflowed (inf) filled GMRES's Hessenberg matrix with NaN and numpy's
    lstsq failed ('SVD did not converge'; found by a review, at a shift of 1e-300 on a saturated chain).
    GMRES stops there and returns what it had."""
    import hessinv.curvature as hc

    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    b = torch.ones(4, dtype=torch.float64)
    calls = [0]

    def prec(V):
        calls[0] += 1
        return V * (float("inf") if calls[0] > 2 else 1.0)

    x, its = hc.fgmres(lambda X: A @ X, prec, b, torch.zeros(4, dtype=torch.float64), 1e-14, 8, 1)
    assert torch.isfinite(x).all() and its == 2
    assert float((b - A @ x).norm()) < float(b.norm())


def test_shift_invert_moves_past_a_shift_whose_sweep_overflows(monkeypatch):
    """eigenpairs(k, 'nearest', sigma) next to a cluster of ~150 zero eigenvalues (float32 Gauss-Newton):
    the factorization at sigma overflowed (NonFiniteError) and escaped instead of moving the shift, as a
    SingularError there does (found by a review)."""
    import hessinv.curvature as hc

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    real = hc.Factorization.__init__
    first = [True]

    def flaky(self, op, damping, *a, **k):
        if first[0]:
            first[0] = False
            raise hessinv.NonFiniteError("the Riccati pivot Qxx contains NaN or infinity")
        real(self, op, damping, *a, **k)

    monkeypatch.setattr(hc.Factorization, "__init__", flaky)
    F, s, sweeps = H._nonsingular_shift(0.0, 1e-3)
    assert s != 0.0 and sweeps == 2


def _saturated_gelu_chain():
    """A GELU chain (depth 6, width 5, weights x4.62), batch 4: its Gauss-Newton matrix has about 149
    eigenvalues at 0 (n = 152)."""
    torch.manual_seed(1057)
    dims = [3, 5, 5, 5, 5, 5, 2]
    layers: list = []
    for i in range(6):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < 5:
            layers.append(nn.GELU())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.624152051366718)
    X = torch.randn(4, 3, dtype=torch.float64)
    return model, X, torch.randint(0, 2, (4,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_sweep_that_overflows_at_a_singular_shift_is_singular_not_non_finite(dtype):
    """G.factor(0) on a Gauss-Newton matrix with a ~149-fold zero eigenvalue: the sweep's perturbed
    pivots compound until a pivot overflows; that was a NonFiniteError ("the Riccati pivot contains NaN
    or infinity") in both precisions. In float64 it is a SingularError naming the cluster; a float32
    sweep hands over to its float64 twin, which says the same (found by a fuzz of the eigen routines)."""
    model, X, y = _saturated_gelu_chain()
    model, X = model.to(dtype), X.to(dtype)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(SingularError):
        G.factor(0.0)
    e = G.eigenpairs(5, "nearest", sigma=0.0, tol=1e-8)  # shift-invert moves the shift off the cluster
    assert float(e.values.abs().max()) < 1e-6 * float(torch.linalg.eigvalsh(G.to_dense().double())[-1])


def test_a_solve_where_the_factorization_counts_a_zero_eigenvalue_is_refused():
    """``eps = -lambda_min`` to the last bits: the factorization's inertia counted a zero eigenvalue and
    logdet / inverse_quadratic refused, but ``solve`` returned ``|x| ~ 5e13`` at relative residual 9e-3
    with only a warning. It is a SingularError now, as theirs."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    m = nn.Sequential(
        nn.Linear(3, 5, **f64), nn.Tanh(), nn.Linear(5, 4, **f64), nn.Tanh(), nn.Linear(4, 2, **f64)
    )
    X, y = torch.randn(12, 3, **f64), torch.randint(0, 2, (12,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    g, A = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    lam = float(torch.linalg.eigvalsh(0.5 * (A + A.T))[0])
    counted = 0
    for k in range(-20, 21):  # the last bits decide whether a pivot is exactly singular
        try:
            F = H.factor(-lam * (1 + k * 2.0**-52))
        except SingularError:  # (a perturbed pivot: refused when factored)
            continue
        if not F.inertia.zero:
            continue
        counted += 1
        with pytest.raises(SingularError, match="inertia counts 1 zero"):
            F.solve(g)
    assert counted  # (the premise: some of these dampings are singular to the sweep)


def test_a_modified_factorization_reports_the_inertia_of_h_plus_eps_i():
    """``modify="abs"`` factors a positive definite ``M``; its ``inertia`` was ``M``'s, (0, 0, n) with
    ``positive_definite`` True, for an ``H + eps I`` with 17 negative eigenvalues of 54 -- under the name
    of ``H + eps I``'s counts. They are ``H + eps I``'s now (dense ``eigvalsh``); solves still use ``M``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, A = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    for eps in (1e-3, 0.1, 10.0):
        w = torch.linalg.eigvalsh(A + eps * torch.eye(A.shape[0], dtype=A.dtype))
        F = H.factor(eps, modify="abs")
        neg = int((w < 0).sum())
        assert tuple(F.inertia) == (neg, 0, len(w) - neg) and F.inertia_certified
        assert F.positive_definite == (neg == 0)
        b = torch.randn(len(w), dtype=torch.float64)
        x = F.solve(b)  # M^-1 b: positive definite, so b^T M^-1 b > 0 whatever H's inertia
        assert float(b @ x) > 0


def _tanh_mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_zero_cluster_is_solved_above_the_dense_fallback(monkeypatch, seed):
    """An over-parameterized MLP's Hessian on 4 examples (n = 890, over half its eigenvalues zero): at
    eps = 1e-8 and 1e-10 ||H|| the sweep perturbs hundreds of pivot eigenvalues, and GMRES
    preconditioned by that factorization stalled at relative residual 3e3 to 1e9, so above the dense
    fallback's size (set to 0 here) a nonsingular system (cond 1e8, 1e10) was refused as singular. GMRES
    preconditioned by the sweep at a larger damping solves it as well as a dense LU does; eps = 0 (a
    singular H) is still refused."""
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    model, lf = _tanh_mlp([10, 16, 16, 16, 10], seed), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    H = hessinv.hessian(model, lf, X, y)
    Hd = autograd_gradient_hessian(model, lf, X, y)[1]
    ev = torch.linalg.eigvalsh(Hd)
    norm, u = float(ev.abs().max()), torch.finfo(torch.float64).eps
    assert int((ev.abs() < 1e-12 * norm).sum()) > Hd.shape[0] // 2
    b = torch.randn(Hd.shape[0], generator=g, dtype=torch.float64)
    for rel_eps in (1e-8, 1e-10):
        eps = rel_eps * norm
        A = Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)
        cond = float((ev.abs().max() + eps) / (ev + eps).abs().min())
        x_lu = torch.linalg.solve(A, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hessinv.AccuracyWarning)  # (cond 1e10: residual ~ u cond)
            F = H.factor(eps)
            x, info = F.solve(b, return_info=True)
        assert F.perturbed  # the route under test
        assert rel(A @ x, b) <= max(3 * rel(A @ x_lu, b), 1e-12)
        assert info.residual <= 10 * u * cond
        assert rel(x, x_lu) <= 100 * u * cond
        assert tuple(F.inertia) == count(ev, eps)
    with pytest.raises(SingularError, match="singular to working precision"):
        H.factor(0.0).solve(b)


def test_a_stalled_probe_above_the_dense_fallback_is_decided_by_the_dense_lu(monkeypatch):
    """A two-layer tanh net's Hessian on 4 examples of 15 classes (n = 735, most eigenvalues zero) at eps
    = 1e-9 and 1e-10 (cond 1e9-1e11): the singularity probe's second solve (x / |x|, a right-hand side in
    the near-null space) stalled at residual 0.9 with GMRES, so above the dense fallback's size (0 here;
    found at n = 4575) the nonsingular system was refused. The dense LU decides where it fits, and the
    solve is as good as its own; with no room for it the refusal stands, and a singular matrix (eps =
    0) is still refused. (Whether GMRES stalls depends on rounding -- the thread count: 4 cases, most
    need the dense LU.)"""
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    u = torch.finfo(torch.float64).eps
    lf = nn.CrossEntropyLoss()
    rescued = []
    for seed in (9, 10):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 15)).double()
        X, y = torch.randn(4, 20, dtype=torch.float64), torch.randint(0, 15, (4,))
        H = hessinv.hessian(model, lf, X, y)
        Hd = autograd_gradient_hessian(model, lf, X, y)[1]
        ev = torch.linalg.eigvalsh(Hd)
        b = torch.randn(Hd.shape[0], dtype=torch.float64)
        for eps in (1e-9, 1e-10):
            A = Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)
            cond = float((ev + eps).abs().max() / (ev + eps).abs().min())
            assert 1e8 < cond < 1e12
            x_lu = torch.linalg.solve(A, b)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hessinv.AccuracyWarning)  # (residual ~ u cond)
                F = H.factor(eps)
                x, info = F.solve(b, return_info=True)
            assert F.perturbed
            rescued += [(H, eps)] if F._rescued else []
            assert rel(A @ x, b) <= max(3 * rel(A @ x_lu, b), 1e-12)
            assert info.residual <= 10 * u * cond
            assert rel(x, x_lu) <= 100 * u * cond
            assert tuple(F.inertia) == count(ev, eps)
    assert rescued  # the route under test (each such case was refused before)
    with pytest.raises(SingularError, match="singular to working precision"):
        H.factor(0.0).solve(b)
    monkeypatch.setattr(hessinv.curvature, "DENSE_RESCUE_N", 0)
    with pytest.raises(SingularError, match="singular to working precision"):
        rescued[-1][0].factor(rescued[-1][1])  # no room for the dense LU: refused, as before


def test_shift_invert_next_to_a_zero_cluster_uses_an_invertible_shift():
    """eigenpairs(which="nearest") just above a cluster of 3650 zero eigenvalues (n = 5530): the
    factorization at the shift has thousands of perturbed pivots, which only the shifted-sweep GMRES can
    solve with; its bare sweep is no inverse for Lanczos (values 3e-9 that are no eigenvalues, residuals
    0.55 ||H||). Shift-invert refuses such a shift and moves on, as before that route existed."""
    model = _tanh_mlp([20, 60, 60, 10], 1)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 20, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    norm = H.norm_estimate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        E = H.eigenpairs(3, which="nearest", sigma=1e-9 * norm)
    residual = (H @ E.vectors - E.vectors * E.values).norm(dim=0) / norm
    assert float(residual.max()) < 1e-2


def test_gmres_survives_a_least_squares_that_lapack_cannot_converge():
    """A Gauss-Newton matrix of 3 examples at eps = 1e-14 ||G|| (cond 1e14): numpy's SVD-based lstsq of
    the GMRES Hessenberg matrix (entries 1e11 apart) raised LinAlgError out of H.factor."""
    model = _tanh_mlp([8, 20, 20, 6], 3)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randint(0, 6, (3,), generator=g)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    Gd = G.to_dense()
    eps = 1e-14 * float(torch.linalg.eigvalsh(Gd).abs().max())
    b = torch.randn(G.shape[0], generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the failing least squares was met with one thread)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hessinv.AccuracyWarning)
            x, info = G.factor(eps).solve(b, return_info=True)
    finally:
        torch.set_num_threads(threads)
    A = Gd + eps * torch.eye(G.shape[0], dtype=torch.float64)
    assert rel(A @ x, b) <= 10 * rel(A @ torch.linalg.solve(A, b), b)


def test_rescue_routes_cost_nothing_where_rounding_explains_the_residual(monkeypatch):
    """An unperturbed factorization next to an eigenvalue (a shift-invert solve, cond 1e13): its residual
    is at the rounding floor, which no GMRES lowers; the shifted-sweep route ran anyway (133 iterations
    against 4)."""
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    model, lf = _tanh_mlp([10, 16, 16, 16, 10], 0), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    H = hessinv.hessian(model, lf, X, y)
    ev = torch.linalg.eigvalsh(autograd_gradient_hessian(model, lf, X, y)[1])
    b = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        F = H.factor(-float(ev[0]) + 1e-13 * float(ev.abs().max()))
        x, info = F.solve(b, return_info=True)
    assert not F.perturbed and info.krylov_iterations <= 10 and info.residual < 1e-3


def test_inverse_diagonal_of_a_rescued_factorization_takes_a_dense_route(monkeypatch):
    """Above the dense routes' sizes (set to 0 here), a factorization that only the rescue solves: its n
    identity columns went through up to 120 iterations of GMRES each, and then the shifted sweep's
    (inverse_diagonal of n = 7150: hours). Up to DENSE_RESCUE_N the dense inverse answers (13.5 s at
    n = 7150); beyond, many stalled columns take one dense LU, factored once."""
    monkeypatch.setattr(hessinv.curvature, "DENSE_FALLBACK_N", 0)
    monkeypatch.setattr(hessinv.curvature, "DENSE_ROUTE_MAX_N", 0)
    model, lf = _tanh_mlp([10, 16, 16, 16, 10], 0), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    H = hessinv.hessian(model, lf, X, y)
    Hd = autograd_gradient_hessian(model, lf, X, y)[1]
    eps = 1e-10 * float(torch.linalg.eigvalsh(Hd).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        F = H.factor(eps)
        d = F.inverse_diagonal()
    want = torch.linalg.inv(Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)).diagonal()
    assert F.perturbed and F._dense is not None
    # (cond 1e10: the two float64 matrices' rounding alone moves the inverse by up to u cond = 2e-6)
    assert float((d - want).abs().max() / want.abs().max()) < 100 * torch.finfo(torch.float64).eps * 1e10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)  # (16 columns: the dense LU, refined)
        x = F.solve(torch.eye(Hd.shape[0], dtype=torch.float64)[:, :16])
    assert F._dense_lu is not None
    assert float((x.diagonal() - want[:16]).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("rel_eps", [1e-6, 1e-10])
def test_many_right_hand_sides_through_the_dense_lu_are_refined(rel_eps):
    """64 right-hand sides of an ill-conditioned system take one dense LU (the review of that route: its
    bare answer left residuals 10-50x those of refinement and GMRES, and every later solve, a single column
    too, went the same way). Refined with the O(L) product, both stay below a dense LU's own residual."""
    model, lf = _tanh_mlp([10, 24, 24, 10], 0), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    H = hessinv.hessian(model, lf, X, y)
    Hd = autograd_gradient_hessian(model, lf, X, y)[1]
    eps = rel_eps * float(torch.linalg.eigvalsh(Hd).abs().max())
    A = Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)
    B = torch.randn(Hd.shape[0], 64, generator=g, dtype=torch.float64)

    def worst(X_: torch.Tensor, B_: torch.Tensor) -> float:
        return float(((A @ X_ - B_).norm(dim=0) / B_.norm(dim=0)).max())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        F = H.factor(eps)
        Xs = F.solve(B)
        x1 = F.solve(B[:, :1])
    lu = worst(torch.linalg.solve(A, B), B)
    assert worst(Xs, B) <= lu and worst(x1, B[:, :1]) <= lu


def test_dense_lu_answers_of_a_per_parameter_damping_are_refined():
    """64 columns of G + D (D ~ 1e-11 ||G|| per parameter, cond 1e11): the dense LU's refinement skipped
    the columns whose residual was within u ||A|| |x| (46 of 64), where one step lowers the dense-measured
    residual 5x (found by a review)."""
    from reference import autograd_gauss_newton

    model, lf = _tanh_mlp([10, 24, 24, 10], 0), nn.CrossEntropyLoss()
    torch.manual_seed(0)
    X, y = torch.randn(40, 10, dtype=torch.float64), torch.randint(0, 10, (40,))
    G, Gd = hessinv.gauss_newton(model, lf, X, y), autograd_gauss_newton(model, lf, X, y)
    n, norm = Gd.shape[0], float(torch.linalg.eigvalsh(Gd).abs().max())
    g = torch.Generator().manual_seed(1)
    D = 1e-11 * norm * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    D[::7] = 1e-3 * norm
    A, B = Gd + torch.diag(D), torch.randn(n, 64, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        Xs = G.factor(D).solve(B)
    worst = float(((A @ Xs - B).norm(dim=0) / B.norm(dim=0)).max())
    lu = float(((A @ torch.linalg.solve(A, B) - B).norm(dim=0) / B.norm(dim=0)).max())
    assert worst < 0.5 * lu


def test_min_eigenvalue_of_a_rank_deficient_psd_gauss_newton_matrix_is_exactly_zero():
    """A convex loss's G with fewer root rows (batch x outputs) than parameters has rank below n:
    lambda_min = 0 exactly, given without a product (a 10-512-3 MLP on 32 examples took 4.8 s for 6e-16);
    with more rows than parameters the Lanczos route still runs, against dense eigvalsh; a bad tol is
    still named."""
    from reference import autograd_gauss_newton

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)  # 15 rows, 51 parameters
    with mock.patch.object(type(G), "_apply", side_effect=AssertionError("a product")):
        assert G.min_eigenvalue() == 0.0
    with pytest.raises(hessinv.InvalidArgumentError):
        G.min_eigenvalue(tol=float("nan"))
    X2, y2 = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))  # 120 rows > 51
    G2 = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X2, y2)
    ev = torch.linalg.eigvalsh(autograd_gauss_newton(m, nn.CrossEntropyLoss(), X2, y2))
    assert abs(G2.min_eigenvalue() - float(ev[0])) <= 1e-7 * float(ev[-1])


def _float32_hessian_and_reference(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """The cross-entropy Hessian operator of a float32 ``model`` and its dense float64 reference (plain
    autograd's double backward on a float64 copy)."""
    from reference import autograd_gradient_hessian

    loss_fn = nn.CrossEntropyLoss()
    _, A = autograd_gradient_hessian(copy.deepcopy(model).double(), loss_fn, X.double(), y)
    return hessinv.hessian(model, loss_fn, X, y), A


def test_working_precision_refinement_makes_a_float32_solve_accurate_by_itself():
    """A probe of the solver on models outside the benchmark: the bare float32 sweep of a GELU/LayerNorm
    MLP was 4e-3 to 9e-3 off at cond ~1e3-1e4 (it does not pivot across stages). ``refine="working"``
    refines with the float32 operator's own products (no float64 copy): a few steps bring it below a
    float32 dense LU's residual, and the residual it reports is within a few times of the true one."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    w = 12
    m = nn.Sequential(
        nn.Linear(10, w), nn.GELU(), nn.Linear(w, w), nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, w), nn.ELU(),
        nn.Linear(w, 5),
    )  # fmt: skip
    H, A = _float32_hessian_and_reference(
        m, torch.randn(6, 10, generator=g), torch.randint(0, 5, (6,), generator=g)
    )
    n, eps = A.shape[0], 0.1
    A = A + eps * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g)

    def residual(x: torch.Tensor) -> float:
        return float((b.double() - A @ x.double()).norm() / b.double().norm())

    F = H.factor(eps)
    bare = residual(F.solve(b, refine=False))
    x, info = F.solve(b, refine="working", return_info=True)
    lu = residual(torch.linalg.solve(A.float(), b))
    assert bare > 1e-3 and residual(x) < min(1e-5, lu, bare / 100)
    assert info.refinement_steps >= 1 and residual(x) / 3 < info.residual < 3 * residual(x)
    with pytest.raises(hessinv.InvalidArgumentError, match="'working'"):
        F.solve(b, refine="float64")


def test_working_refinement_keeps_a_twin_hand_over_accurate():
    """A fuzzer of ``refine="working"``: (1) a float32 factorization that handed over to its float64 twin
    (its own sweep could not precondition) was "refined" with float32 residuals, whose rounding is the
    twin's answer's residual: forward error 1.8e-8 -> 2.3e-3; it refines as ``refine=True`` does now.
    (2) a tensor damping in an error message raised a raw TypeError."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(101)
    X, y, loss_fn = (
        torch.randn(12, 4, generator=g),
        torch.randint(0, 3, (12,), generator=g),
        nn.CrossEntropyLoss(),
    )
    H, A = _float32_hessian_and_reference(net, X, y)
    eps = 1e-6 * float(torch.linalg.eigvalsh(A).abs().max())
    F = H.factor(eps)
    assert F._twin_only  # (the case: the float32 sweep perturbed its pivots)
    b = torch.randn(A.shape[0], generator=g)
    exact = torch.linalg.solve(A + eps * torch.eye(A.shape[0], dtype=torch.float64), b.double())
    x, info = F.solve(b, refine="working", return_info=True)
    assert float((x.double() - exact).norm() / exact.norm()) < 1e-6
    assert info.residual < 1e-10  # (the float64 twin's refinement, as refine=True)

    net64 = copy.deepcopy(net).double()

    # a per-parameter damping that leaves G + D indefinite: the message names it (was a raw TypeError)
    G = hessinv.gauss_newton(net64, loss_fn, X.double(), y)
    D = torch.full((G.shape[0],), 0.01, dtype=torch.float64)
    D[0] = -0.05
    with pytest.raises(hessinv.IndefiniteError, match="D \\(per parameter\\)"):
        G.factor(D).inverse_sqrt(torch.randn(G.shape[0], 2, dtype=torch.float64))


def test_a_too_large_factorization_after_minres_says_what_ran(monkeypatch):
    """A size probe: ``H.solve`` ran MINRES for 95 s on a 64-256-256-10 MLP (batch 4096), then refused
    the factorization, saying nothing of the MINRES run. The refusal names it now."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    clock = itertools.count(0.0, 30.0)  # (each reading 30 s after the one before)
    monkeypatch.setattr(hessinv.curvature.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(type(H), "_krylov_solve", lambda *a, **k: None)

    def too_large(*args, **kwargs):
        raise hessinv.TooLargeError("the factorization needs 2.16e4 GiB")

    monkeypatch.setattr(type(H), "factor", too_large)
    with pytest.raises(hessinv.TooLargeError, match=r"2.16e4 GiB -- MINRES .* ran first \(30 s\)"):
        H.solve(H.gradient, damping=1e-3)


def test_a_singular_system_is_refused_without_krylov_work_its_first_iterate_already_proves(monkeypatch):
    """A refusal at eps = 0 waited for GMRES and the shifted sweep's GMRES on two right-hand sides (a
    rank-64 Gauss-Newton matrix of a 16-stage chain: 8.7 s; the Hessian of a 64-stage chain: 100 s). An
    iterate whose residual is what rounding of its own size explains while ``|A| |x| / |b| >= 1 / u``
    proves ``sigma_min(A) <= 11 u |A|``: no Krylov method for the Gauss-Newton matrix here, and no second
    probe solve where the first's size alone puts the cond estimate past 1 / u. The refusal and its advice
    are as before, and the message names only what ran."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(8, 8, bias=False), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(8, 3, bias=False)).double()
    X = torch.randn(8, 8, dtype=torch.float64)
    X[:, 0] = 0  # (the first layer's weights on it: zero rows and columns of H and G)
    y = torch.randint(0, 3, (8,))
    calls = []
    fgmres = hessinv.curvature.fgmres
    monkeypatch.setattr(hessinv.curvature, "fgmres", lambda *a, **k: (calls.append(1), fgmres(*a, **k))[1])
    for make, most in ((hessinv.gauss_newton, 0), (hessinv.hessian, 1)):
        calls.clear()
        with pytest.raises(hessinv.SingularError, match="Choose another damping") as err:
            make(model, nn.CrossEntropyLoss(), X, y).factor(0.0)
        assert len(calls) <= most, (make.__name__, len(calls))
        text = str(err.value)
        assert "cond estimate" in text and "nan" not in text
        assert ("GMRES" in text) == bool(calls)


def test_each_column_of_a_stalled_solve_is_solved_as_a_dense_lu_would():
    """Two right-hand sides on a perturbed factorization (cond 4.3e8): GMRES stalled on the gradient's
    column at a residual of 4.8e-9 -- below the dense fallback's 1e-8 for the worst column, 1.5e5 times
    what a backward-stable solve leaves -- and returned it with an error of 1.4e-2, where the column
    alone was solved to 1e-14 (a probe). Every column now ends within 1e3 u ||A|| ||x_j|| / ||b_j||."""
    torch.manual_seed(16)
    ln6 = nn.LayerNorm(6)
    with torch.no_grad():
        ln6.weight.add_(0.3 * torch.randn(6)), ln6.bias.add_(0.3 * torch.randn(6))
    mods = [nn.Dropout(0.3), ln6, nn.Dropout(0.3), nn.Linear(6, 7, bias=False), nn.ReLU(), nn.Linear(7, 5)]
    ln5 = nn.LayerNorm(5)
    with torch.no_grad():
        ln5.weight.add_(0.3 * torch.randn(5)), ln5.bias.add_(0.3 * torch.randn(5))
    model = nn.Sequential(*mods, nn.ReLU(), ln5, nn.Sigmoid(), nn.Linear(5, 1)).double().eval()
    X, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    g, A = autograd_gradient_hessian(model, nn.MSELoss(), X, y)
    eps = 1.883639901830316e-08
    A = 0.5 * (A + A.T) + eps * torch.eye(A.shape[0], dtype=A.dtype)
    b = torch.randn(A.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    b[:, 1] = g
    F = hessinv.hessian(model, nn.MSELoss(), X, y).factor(eps)
    x = F.solve(b)
    u, norm = torch.finfo(torch.float64).eps, float(torch.linalg.matrix_norm(A, 2))
    for j in range(2):
        r = float((b[:, j] - A @ x[:, j]).norm() / b[:, j].norm())
        assert r <= max(1e3 * u * norm * float(x[:, j].norm() / b[:, j].norm()), 1e-12), (j, r)


class _Res(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, z):
        return z + torch.sigmoid(self.lin(z))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 4)

    def forward(self, z):
        return self.conv(z.view(z.shape[0], 1, 7)).flatten(1)


def test_logdet_with_pivots_conditioned_just_above_sqrt_u_is_accurate():
    """A chain with 17 null directions at damping 1e-7..1e-8: no pivot perturbed, the smallest pivot
    conditioning 4e-8..4e-7 -- above sqrt(u), where the sweep's pivots were trusted -- and its
    log-determinant 3.9e-3 to 4.6e-3 off, unwarned (a probe). Its error is about u / c^2: the dense LU
    decides there now, and the answer is within rounding of dense ``eigvalsh``."""
    torch.manual_seed(435)
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(4)), ln.bias.add_(0.3 * torch.randn(4))
    mods = [nn.Dropout(0.3), ln, nn.Dropout(0.3), _Res(4)]
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(4)), bn.running_var.copy_(0.5 + torch.rand(4))
        bn.weight.add_(0.3 * torch.randn(4)), bn.bias.add_(0.3 * torch.randn(4))
    mods += [bn, nn.Linear(4, 2, bias=False), nn.Tanh(), nn.Dropout(0.3), nn.Linear(2, 7), _Conv()]
    model = nn.Sequential(*mods, nn.Linear(4, 2)).double().eval()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    _, A = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(0.5 * (A + A.T))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    for eps in (1e-7, 1.5e-8, 1e-8):
        F = H.factor(eps)
        c = min(f.pivot.conditioning() for f in F.factors if f is not None)
        assert not F.perturbed and c >= math.sqrt(torch.finfo(torch.float64).eps)  # (the case under test)
        want = float((ev + eps).abs().log().sum())
        assert abs(F.logdet() - want) <= 1e-6, (eps, F.logdet() - want)
