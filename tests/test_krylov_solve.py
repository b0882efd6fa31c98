"""One-off solves: MINRES on the products first where a factorization costs far more, its answer kept
only at the factorization's accuracy; against dense float64 references."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    autograd_gauss_newton,
    autograd_gradient_hessian,
    autograd_hessian_vector_product,
    chains,
)
from torch import nn

import hessinv
from hessinv import curvature
from hessinv.curvature import minres


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_minres_on_symmetric_indefinite_matrices(n, k, negative, seed):
    """Every column's residual at its tolerance (the recursive estimate: up to rounding of the true
    one), the norm bound below ||A||, on spectra with a share of negative eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    lam = torch.where(torch.rand(n, generator=g) < negative, -lam, lam)
    A = Q @ torch.diag(lam) @ Q.T
    B = torch.randn(n, k, generator=g, dtype=torch.float64)
    X, its, anorm, converged = minres(lambda V: A @ V, B, 1e-12, 10 * n + 50)
    rel = float(((B - A @ X).norm(dim=0) / B.norm(dim=0)).max())
    assert converged and rel <= 1e-9, (rel, its)
    assert 0 < anorm <= float(lam.abs().max()) * (1 + 1e-12)
    assert its <= 10 * n + 50


def test_minres_gives_up_where_it_cannot_converge_in_its_budget():
    """A spectrum spread over 1e8 with a zero in its middle's reach: it stops well before its budget."""
    n = 400
    lam = torch.cat([torch.logspace(-8, 0, n // 2), -torch.logspace(-8, 0, n // 2)]).double()
    B = torch.ones(n, 1, dtype=torch.float64)
    calls = []

    def apply(V):
        calls.append(1)
        return lam[:, None] * V

    _, its, _, converged = minres(apply, B, 1e-14, 60)
    assert its == len(calls) and its < 60 and not converged


@settings(max_examples=30, deadline=None)
@given(chains(max_depth=4, max_width=6, max_batch=5), st.sampled_from([1e-2, 1.0, 10.0]), st.booleans())
def test_krylov_first_solves_equal_dense_ones(prob, eps, gauss_newton):
    """With the cost rule set to take MINRES first everywhere: the answer is that of a dense float64 solve
    to its condition number, and its reported residual is the true one; up to cond 1e4 MINRES gives it
    (beyond, it or the factorization)."""
    if gauss_newton:
        A = autograd_gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
        op = hessinv.gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    else:
        A = autograd_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)[1]
        op = hessinv.hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    n = A.shape[0]
    A = A + eps * torch.eye(n, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(A).abs()
    if float(ev.min()) < 1e-8 * float(ev.max()):
        return  # (near-singular: the factorization's tests)
    b = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with (
        mock.patch.object(curvature, "KRYLOV_FIRST_RATIO", 0.0),
        mock.patch.object(curvature, "KRYLOV_SHARE", 1e9),  # (the products' budget: 3000 each)
    ):
        x, info = op.solve(b, eps, return_info=True)
    ref = torch.linalg.solve(A, b)
    cond = float(ev.max() / ev.min())
    if cond <= 1e4:  # MINRES answers these (at most n products a cycle in exact arithmetic)
        assert info.krylov_iterations > 0 and info.refinement_steps == 0, prob.description
    assert float((x - ref).norm() / ref.norm()) <= 1e-11 * cond, prob.description
    true = float(((b - A @ x).norm(dim=0) / b.norm(dim=0)).max())
    assert true <= 1e-11 and info.residual <= 1e-12
    # (the two products' rounding: u ||A|| |x| / |b| apart)
    slack = (
        64 * torch.finfo(torch.float64).eps * float(ev.max()) * float((x.norm(dim=0) / b.norm(dim=0)).max())
    )
    assert math.isclose(true, info.residual, rel_tol=0.5, abs_tol=slack)


def _mlp(batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)).double()
    return net, torch.randn(batch, 16, dtype=torch.float64), torch.randint(0, 5, (batch,))


def test_a_large_batch_solve_takes_minres_and_a_hard_one_the_factorization():
    """A 16-32-32-5 MLP on 400 examples (the factorization ~1e4 products by the cost model): G + I takes
    MINRES (tens of products, no factorization made); H at a damping that leaves it nearly singular and
    indefinite gives MINRES up within its budget and is factored, as before."""
    net, X, y = _mlp(400)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    # (the budget in time: a product timed on a loaded machine must not decide the route here)
    with (
        mock.patch.object(curvature, "Factorization", side_effect=AssertionError("factored")),
        mock.patch.object(curvature, "KRYLOV_FACTOR_RATE", 1e8),
    ):
        x, info = G.solve(G.gradient, 1.0, return_info=True)
    assert 0 < info.krylov_iterations < 100 and info.refinement_steps == 0
    A = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y) + torch.eye(G.shape[0], dtype=torch.float64)
    assert float((A @ x - G.gradient).norm() / G.gradient.norm()) <= 1e-12
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    Hd = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1]
    ev = torch.linalg.eigvalsh(Hd)
    eps = -float(ev[ev.numel() // 3]) + 1e-9 * float(ev.abs().max())  # a third of them below: indefinite
    made = []
    real = curvature.Factorization

    def spy(*a, **kw):
        made.append(1)
        return real(*a, **kw)

    with mock.patch.object(curvature, "Factorization", side_effect=spy):
        x, info = H.solve(H.gradient, eps, return_info=True)
    assert made and info.krylov_iterations == 0  # (MINRES gave up after 30 products)
    A = Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64)
    assert float((A @ x - H.gradient).norm() / H.gradient.norm()) <= 1e-8


def test_singular_systems_are_still_refused_by_name():
    """G at damping 0 with fewer rows than parameters: MINRES cannot reach the target, and the
    factorization's SingularError names the system, as without the Krylov route."""
    net, X, y = _mlp(400)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X[:3], y[:3])
    with mock.patch.object(curvature, "KRYLOV_FIRST_RATIO", 0.0), pytest.raises(hessinv.SingularError):
        G.solve(G.gradient + 1.0, 0.0)


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1.0, 1e150])
def test_krylov_first_at_extreme_scales_of_the_right_hand_side(scale):
    """A right-hand side of entries 1e-300 (its squared norm underflows) or 1e150: the solution scales
    with it (MINRES on each column scaled to unit size), not x = 0 with a reported residual of 0."""
    net, X, y = _mlp(400)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    ref, _ = G.solve(G.gradient, 1.0, return_info=True)
    # (the budget in time: a product timed on a loaded machine must not decide the route here -- a full
    # suite beside three other processes took the factorization at 1e150)
    with mock.patch.object(curvature, "KRYLOV_FACTOR_RATE", 1e8):
        x, info = G.solve(G.gradient * scale, 1.0, return_info=True)
    assert info.krylov_iterations > 0 and info.residual <= 1e-12
    assert float((x / scale - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_gauss_newton_at_zero_damping_is_left_to_the_factorization():
    """G + 0 I is singular wherever G has fewer rows than parameters: no MINRES answer (one of many)."""
    net, X, y = _mlp(400)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    with mock.patch.object(curvature, "minres", side_effect=AssertionError("took MINRES")):
        with pytest.raises(hessinv.SingularError):
            G.solve(G.gradient, 0.0)


def test_a_float32_operator_takes_minres_on_its_float64_twin():
    """The default dtype: ``G.solve`` of a float32 MLP's operator on 400 examples takes MINRES on the
    float64 twin's products; the float64 iterate's residual is reported, the float32 answer is that
    iterate rounded (its own residual about u32 cond), as the factorization's refined solves give it."""
    net, X, y = _mlp(400)
    net32 = copy.deepcopy(net).float()
    G = hessinv.gauss_newton(net32, nn.CrossEntropyLoss(), X.float(), y)
    with mock.patch.object(curvature, "Factorization", side_effect=AssertionError("factored")):
        x, info = G.solve(G.gradient, 1.0, return_info=True)
    assert x.dtype == torch.float32 and 0 < info.krylov_iterations < 100 and info.residual <= 1e-12
    A = autograd_gauss_newton(copy.deepcopy(net32).double(), nn.CrossEntropyLoss(), X.float().double(), y)
    A = A + torch.eye(A.shape[0], dtype=torch.float64)
    ref = torch.linalg.solve(A, G.gradient.double())
    assert float((x.double() - ref).norm() / ref.norm()) <= 1e-6
    assert 0 < info.returned_residual <= 1e-6


@settings(max_examples=20, deadline=None)
@given(chains(max_depth=4, max_width=6, max_batch=6), st.sampled_from([1e-6, 1e-9]), st.booleans())
def test_a_solve_to_a_tolerance_reaches_it(prob, rtol, gauss_newton):
    """``solve(..., rtol=)``: MINRES on the products first whatever the cost model says (a 64-256-256-10
    MLP's Gauss-Newton at damping 1e-3, to 1e-8: 0.82 -> 0.13 s, a helper's comparison with CG), the
    true relative residual (against the dense autograd matrix) within ``rtol``; where MINRES does not
    get there, the factorization answers to its own accuracy."""
    make = hessinv.gauss_newton if gauss_newton else hessinv.hessian
    op = make(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    if gauss_newton:
        A = autograd_gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    else:
        A = autograd_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)[1]
    n = A.shape[0]
    eps = 0.1 * max(float(torch.linalg.matrix_norm(A, 2)), 1e-3)
    Aeps = A + eps * torch.eye(n, dtype=torch.float64)
    if float(torch.linalg.cond(Aeps)) > 1e8:
        return  # (near singular: the factorization's case, tested elsewhere)
    b = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, info = op.solve(b, damping=eps, rtol=rtol, return_info=True)
    true = float(((b - Aeps @ x).norm(dim=0) / b.norm(dim=0)).max())
    assert true <= 2 * rtol and info.residual <= rtol * 1.01, (true, info)


def test_a_solve_to_a_tolerance_takes_the_products_and_checks_its_argument():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    X, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    # (the products MINRES may spend are a factorization's time by one product's timing: 80 needed here,
    # which an Intel Xeon's products bought and an AMD EPYC's 2 ms ones did not -- a slow factorization
    # rate, so that only the products' cap bounds them)
    with (
        mock.patch.object(type(G), "factor", side_effect=AssertionError("factored")),
        mock.patch.object(hessinv.curvature, "KRYLOV_FACTOR_RATE", 1e6),
    ):
        x, info = G.solve(G.gradient, damping=1e-3, rtol=1e-8, return_info=True)
    assert info.krylov_iterations > 0 and info.residual <= 1e-8
    for bad in (0.0, 1.0, -1e-3, float("nan"), "1e-8"):
        with pytest.raises(hessinv.HessinvError, match="rtol"):
            G.solve(G.gradient, damping=1e-3, rtol=bad)


def test_minres_answers_a_conv_chain_whose_factorization_costs_a_thousand_products():
    """A 6-stage Conv1d chain on 32 examples (n = 4378): ``H.solve`` spent 44 s factoring (the sweep, or
    the dense route priced at a product the model put 15x below its time) after MINRES was given 15
    products, where it needs about 60 (1.6 s; a probe). The dense route is now priced by a timed
    product, the MINRES budget by the route the factorization takes, and a converging MINRES goes on.
    The residual is checked with plain autograd's Hessian-vector product."""
    torch.manual_seed(0)
    layers = [nn.Conv1d(4, 8, 5, padding=2), nn.Tanh()]
    for _ in range(5):
        layers += [nn.Conv1d(8, 8, 5, padding=2), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 32, 3)).double()
    X, y = torch.randn(32, 4, 32, dtype=torch.float64), torch.randint(0, 3, (32,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    g = H.gradient
    with mock.patch.object(curvature, "Factorization", side_effect=AssertionError("factored")):
        x, info = H.solve(g, 1.0, return_info=True)
    assert info.krylov_iterations > 15
    Hx = autograd_hessian_vector_product(net, nn.CrossEntropyLoss(), X, y, x)
    assert float((Hx + x - g).norm() / g.norm()) <= 1e-12
