"""A per-parameter damping ``D`` with zero entries on a float64 Gauss-Newton matrix: where the Woodbury
capacitance matrix ``K`` is singular to working precision while ``G + D`` is not (``cond(K)`` is not
``cond(G + D)``), ``G + D`` is factored densely (``n <=`` ``DENSE_FALLBACK_N``) and every method answers
from that; singular ``G + D`` is still refused, and beyond the dense limit the refusal says what to do.
References: ``J^T Lambda J`` by plain autograd and dense torch.linalg algebra."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessinv
import hessinv.curvature as curvature

U64 = torch.finfo(torch.float64).eps

# at cond(G + D) ~ 1e11 a float64 residual floors near u cond (LU's too), above sqrt(u): the solve's
# AccuracyWarning says so; the residual itself is checked below against LU's
pytestmark = pytest.mark.filterwarnings("ignore::hessinv.AccuracyWarning")


def dense_gn(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``J^T Lambda J`` in float64 by plain autograd (J: outputs by flat parameters, Lambda: the loss's
    Hessian in the outputs)."""
    m = copy.deepcopy(model).double()
    named = list(m.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def out(t):
        params, i = {}, 0
        for k, p in named:
            params[k] = t[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return functional_call(m, params, (X.double(),))

    J = jacobian(lambda t: out(t).reshape(-1), theta)
    o = out(theta).detach()
    Lam = hessian(lambda z: loss_fn(z.view(o.shape), y), o.reshape(-1))
    return J.T @ Lam @ J


def _relres(M: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    return float((b - M @ x).norm() / b.norm())


def _check_against_dense(F, M: torch.Tensor, seed: int) -> None:
    """Solve, inverse quadratic, slogdet, inertia and definiteness of ``F`` against the dense ``M``."""
    n = M.shape[0]
    ev = torch.linalg.eigvalsh(M)
    top = float(ev.abs().max())
    cond = top / float(ev.abs().min())
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x_ref = torch.linalg.solve(M, b)
    # a float64 residual floors near u cond (the rounded exact solution's own): LU's sets the bar
    bar = max(1e-12, 20 * _relres(M, x_ref, b))
    x, info = F.solve(b.to(F.op.dtype), return_info=True)
    assert info.residual <= bar
    if F.op.dtype == torch.float64:
        assert _relres(M, x, b) <= bar
        assert float((x - x_ref).norm() / x_ref.norm()) <= 100 * n * U64 * cond
    q_ref = float(b @ x_ref)
    assert abs(F.inverse_quadratic(b.to(F.op.dtype)) - q_ref) <= 100 * n * U64 * cond * abs(q_ref)
    sign, logabs = F.slogdet()
    sign_ref, logabs_ref = torch.linalg.slogdet(M)
    assert sign == float(sign_ref)
    # each log|lambda_i| is good to about n u ||M|| / |lambda_i| (backward stability)
    tol = 10 * n * U64 * float((top / ev.abs()).sum())
    assert abs(logabs - float(logabs_ref)) <= tol
    assert abs(F.logdet() - float(logabs_ref)) <= tol
    neg = int((ev < 0).sum())
    assert F.inertia == hessinv.Inertia(neg, 0, n - neg)
    assert F.inertia_certified
    assert F.positive_definite == (neg == 0)


def _saved_case(dtype: torch.dtype = torch.float64):
    """The probe's refused case (trial 6 of its scan): a 4-4-4 tanh net on 2 examples, ``D`` at 1e-6
    ``||G||`` with six zero entries; ``cond(G + D) = 3.6e11``."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(dtype)
    X = torch.randn(2, 4, dtype=dtype)
    y = torch.randint(0, 4, (2,))
    lf = nn.CrossEntropyLoss()
    A = dense_gn(m, lf, X, y)
    n = A.shape[0]
    D = torch.full((n,), 1e-6 * float(torch.linalg.eigvalsh(A)[-1]), dtype=torch.float64)
    D[[6, 11, 23, 33, 36, 37]] = 0.0
    D = D.to(dtype).double()  # (the damping the operator's dtype holds)
    return hessinv.gauss_newton(m, lf, X, y), A + torch.diag(D), D


def test_saved_case_float64_factored_densely():
    G, M, D = _saved_case()
    ev = torch.linalg.eigvalsh(M)
    assert 1e11 < float(ev.max() / ev.min()) < 1e12  # nonsingular to working precision
    F = G.factor(D)
    _check_against_dense(F, M, seed=0)


def test_saved_case_float32_twin_factored_densely():
    # a float32 operator hands over to its float64 twin, which was refused the same way
    G, M, D = _saved_case(torch.float32)
    F = G.factor(D.float())
    _check_against_dense(F, M, seed=1)


def _random_chain(seed: int):
    g = torch.Generator().manual_seed(seed)
    din, hid, C, B = (
        int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in [(1, 5), (1, 5), (2, 4), (1, 5)]
    )
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(din, hid), nn.Tanh(), nn.Linear(hid, C)).double()
    X = torch.randn(B, din, dtype=torch.float64, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return m, X, y, g


@pytest.mark.parametrize("seed", [6, 10, 16, 39, 42, 45, 48, 51])
def test_random_chains_zero_damping_entries(seed):
    # zero entries in D (some others negative: G + D indefinite) at 1e-4 .. 1e-8 ||G||: every case with
    # cond(G + D) <= 1e12 is factored and answers as the dense references do (each seed has a level
    # whose capacitance matrix is singular to working precision)
    m, X, y, g = _random_chain(seed)
    lf = nn.CrossEntropyLoss()
    A = dense_gn(m, lf, X, y)
    n = A.shape[0]
    nrm = float(torch.linalg.eigvalsh(A)[-1])
    dense = 0
    for lvl in [1e-4, 1e-6, 1e-8]:
        D = torch.full((n,), lvl * nrm, dtype=torch.float64)
        if seed % 3 == 0:
            D[torch.rand(n, generator=g) < 0.2] *= -1
        D[torch.rand(n, generator=g) < 0.3] = 0.0
        D[torch.diagonal(A) == 0] = lvl * nrm
        M = A + torch.diag(D)
        ev = torch.linalg.eigvalsh(M)
        if float(ev.abs().max() / ev.abs().min()) > 1e12:
            continue
        F = hessinv.gauss_newton(m, lf, X, y).factor(D)
        dense += F.woodbury is None
        _check_against_dense(F, M, seed=seed)
    assert dense >= 1  # (the dense route was exercised)


def _duplicate_feature_case():
    """A linear softmax layer whose first two input features are equal: ``G``'s columns of the weights
    ``W[0, 0]`` and ``W[0, 1]`` are identical, so with zero damping on both ``G + D`` is exactly singular
    (no column of ``G`` is zero)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    X[:, 1] = X[:, 0]
    y = torch.tensor([0, 1, 1, 0, 1])
    lf = nn.CrossEntropyLoss()
    A = dense_gn(m, lf, X, y)
    D = torch.full((A.shape[0],), 1e-3 * float(torch.linalg.eigvalsh(A)[-1]), dtype=torch.float64)
    D[[0, 1]] = 0.0
    return hessinv.gauss_newton(m, lf, X, y), A + torch.diag(D), D


def test_singular_g_plus_d_still_refused():
    G, M, D = _duplicate_feature_case()
    ev = torch.linalg.eigvalsh(M).abs()
    assert float(ev.min()) <= M.shape[0] * U64 * float(ev.max())  # singular to working precision
    with pytest.raises(hessinv.SingularError, match="damping > 0"):
        G.factor(D)


def test_zero_column_with_zero_damping_still_refused():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    X[:, 2] = 0.0  # W[:, 2] gets no curvature: G's columns 2 and 5 are zero
    y = torch.tensor([0, 1, 1, 0])
    lf = nn.CrossEntropyLoss()
    A = dense_gn(m, lf, X, y)
    assert float(A[2].abs().max()) == 0.0
    D = torch.full((A.shape[0],), 1e-3, dtype=torch.float64)
    D[2] = 0.0
    with pytest.raises(hessinv.SingularError, match="damping > 0"):
        hessinv.gauss_newton(m, lf, X, y).factor(D)


def test_refusal_beyond_dense_limit_says_what_to_do(monkeypatch):
    G, M, D = _saved_case()
    monkeypatch.setattr(curvature, "DENSE_FALLBACK_N", M.shape[0] - 1)
    with pytest.raises(hessinv.SingularError, match="capacitance") as e:
        G.factor(D)
    assert "may be nonsingular" in str(e.value)
    assert "small positive value" in str(e.value)
