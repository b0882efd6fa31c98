"""Woodbury and inverse-quadratic fixes: ``inverse_quadratic`` of ``G + D`` with a tiny ``D_j``, float32
quadratics of very large and very small ``v``, the unrefined Woodbury solve with a tiny ``D_j``, a float32
``G + D`` with a zero entry of ``D``, and ``inverse_sqrt``'s argument checks on a float32 factorization
handed over to its float64 twin. References: plain autograd derivatives and dense float64 algebra."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessinv


def _flat_call(model: nn.Module):
    """``(theta, out)``: the float64 parameters flattened and ``out(theta, X)``, a float64 copy of the
    model called with them."""
    m = copy.deepcopy(model).double()
    named = list(m.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def out(t, X):
        params, i = {}, 0
        for k, p in named:
            params[k] = t[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return functional_call(m, params, (X.double(),))

    return theta, out


def dense_gn(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``J^T Lambda J`` in float64 by plain autograd (J: outputs by parameters, Lambda: the loss's
    Hessian in the outputs)."""
    theta, out = _flat_call(model)
    J = jacobian(lambda t: out(t, X).reshape(-1), theta)
    o = out(theta, X).detach()
    Lam = hessian(lambda z: loss_fn(z.view(o.shape), y), o.reshape(-1))
    return J.T @ Lam @ J


def dense_hessian(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The float64 Hessian in the flat parameters by plain autograd."""
    theta, out = _flat_call(model)
    H = hessian(lambda t: loss_fn(out(t, X), y), theta)
    return 0.5 * (H + H.T)


def _tiny_damping_case(seed: int, tiny: float):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    X = torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    lf = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(m, lf, X, y)
    A = dense_gn(m, lf, X, y)
    n = A.shape[0]
    D = torch.full((n,), 0.1 * float(torch.linalg.eigvalsh(A)[-1]), dtype=torch.float64)
    D[13] = tiny
    return G, A + torch.diag(D), D


def test_woodbury_inverse_quadratic_tiny_damping_entry():
    # defect 1: one D_j = 1e-17 among 0.1 ||G||, cond(G + D) = 77: the single Woodbury solve was 18% off
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 2)).double()
    X = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    lf = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(m, lf, X, y)
    A = dense_gn(m, lf, X, y)
    n = A.shape[0]
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for tiny in [1e-12, 1e-17, -1e-15]:
        D = torch.full((n,), 0.1 * float(torch.linalg.eigvalsh(A)[-1]), dtype=torch.float64)
        D[0] = tiny
        M = A + torch.diag(D)
        ev = torch.linalg.eigvalsh(M)
        assert float(ev.abs().max() / ev.abs().min()) < 1e3
        ref = float(v @ torch.linalg.solve(M, v))
        q = G.factor(D).inverse_quadratic(v)
        assert abs(q - ref) <= 1e-12 * abs(ref), (tiny, q, ref)


@pytest.mark.parametrize("eps", [0.1, 5.0])
def test_float32_inverse_quadratic_of_huge_and_tiny_vectors(eps):
    # defect 2: v of 1e19 gave NaN / inf, v of 1e-20 gave 0.0, for answers that are ordinary floats
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X = torch.randn(5, 3)
    y = torch.tensor([0, 1, 0, 1, 1])
    lf = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, lf, X, y)
    n = H.shape[0]
    M = dense_hessian(m, lf, X.double(), y) + eps * torch.eye(n, dtype=torch.float64)
    F = H.factor(eps)
    v0 = torch.randn(n, dtype=torch.float64)
    for sc in [1.0, 1e19, 1e-20, 1e-22]:
        v = (v0 * sc).float()
        ref = float(v.double() @ torch.linalg.solve(M, v.double()))
        q = F.inverse_quadratic(v)
        # float32 sweep: good to about cond u32 (the float64 reference is of the float64 model)
        assert np.isfinite(q) and abs(q - ref) <= 1e-3 * abs(ref), (sc, q, ref)


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_woodbury_unrefined_solve_with_tiny_damping_entry(seed):
    # defect 3: with one D_j = +-1e-15 the raw Woodbury solve (K holding 1 / D_j) had relative residuals
    # of 1e-4 to 2e-2 -- too poor to precondition refinement (5 steps and GMRES for a cond-100 system)
    for tiny in [1e-15, -1e-15]:
        G, M, D = _tiny_damping_case(seed, tiny)
        ev = torch.linalg.eigvalsh(M)
        cond = float(ev.abs().max() / ev.abs().min())
        assert cond < 1e3
        b = torch.randn(M.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        F = G.factor(D)
        x0 = F.solve(b, refine=False)
        assert float((b - M @ x0).norm() / b.norm()) <= 1e-12
        x, info = F.solve(b, return_info=True)
        xl = torch.linalg.solve(M, b)
        assert float((x - xl).norm() / xl.norm()) <= 1e-13
        assert info.refinement_steps <= 2 and info.krylov_iterations == 0


def test_float32_woodbury_zero_damping_entry_is_not_singular():
    # defect 4: a float32 G + D with one zero entry of D at cond(G + D) = 2.8e4 raised SingularError
    torch.manual_seed(31)
    m = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2))
    X = torch.randn(3, 4)
    y = torch.randint(0, 2, (3,))
    lf = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(m, lf, X, y)
    A = dense_gn(m, lf, X, y)
    n = A.shape[0]
    D = torch.full((n,), 1e-4 * float(torch.linalg.eigvalsh(A)[-1]), dtype=torch.float64)
    D[5] = 0.0
    D = D.float().double()  # the float32 damping, exactly
    M = A + torch.diag(D)
    ev = torch.linalg.eigvalsh(M)
    assert 1e4 < float(ev[-1] / ev[0]) < 1e5 and float(ev[0]) > 0
    F = G.factor(D.float())
    assert tuple(F.inertia) == (0, 0, n) and F.positive_definite
    b = torch.randn(n, generator=torch.Generator().manual_seed(0))
    x = F.solve(b)
    xl = torch.linalg.solve(M, b.double())
    # the float32 model's G is the float64 model's to u32: the solution to about cond u32
    assert float((x.double() - xl).norm() / xl.norm()) <= 1e-2
    sign, logabs = F.slogdet()
    ref_sign, ref_log = torch.linalg.slogdet(M)
    assert sign == float(ref_sign) and abs(logabs - float(ref_log)) <= 1e-4 * abs(float(ref_log))


def test_twin_inverse_sqrt_checks_its_argument():
    # defect 5: a float32 factorization handed over to its float64 twin skipped inverse_sqrt's checks
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    X = torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    n = G.shape[0]
    F = G.factor(1e-6, method="riccati")
    assert F._twin_only
    with pytest.raises(hessinv.errors.InvalidArgumentError):
        F.inverse_sqrt(np.zeros(n, dtype=np.float32))
    with pytest.raises(hessinv.errors.InvalidArgumentError):
        F.inverse_sqrt([0.0] * n)
    with pytest.raises(hessinv.errors.DtypeMismatchError):
        F.inverse_sqrt(torch.randn(n, dtype=torch.float64))
    z = torch.randn(n)
    out = F.inverse_sqrt(z)
    assert out.shape == (n,) and out.dtype == torch.float32
    assert torch.equal(out, F.inverse_sqrt(z[:, None])[:, 0])


def test_gauss_newton_factor_takes_the_root_where_that_is_cheaper():
    """``G.factor(eps)`` (method ``"auto"``): a 10-40-40-5 MLP on 60 examples (``n = 2285``, ``B C = 300``
    rows of the root; the factorization would take the dense route) is factored through the root (about
    4.4e8 modelled flops against the dense route's 6.5e9), exactly: its solve, log-determinant and inertia
    against the dense float64 ``G + eps I``; 300 examples (1500 rows, over ``n / 2``) keep the sweep, and
    so does a wide last layer on 8 examples (16-64-300, n = 20588: the sweep's low-rank pivots, 0.34 s,
    against Woodbury's 3.8 s), and a damping far below the float range."""
    from reference import autograd_gauss_newton

    from hessinv.curvature import WoodburyFactorization

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 5)).double()
    X, y = torch.randn(60, 10, dtype=torch.float64), torch.randint(0, 5, (60,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    F = G.factor(1e-3)
    assert isinstance(F, WoodburyFactorization) and not G._woodbury_cheaper(1e-200)
    I = torch.eye(G.shape[0], dtype=torch.float64)
    A = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y) + 1e-3 * I
    g = G.gradient
    x = torch.linalg.solve(A, g)
    assert float((F.solve(g) - x).norm() / x.norm()) <= 1e-10
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-12)
    assert F.positive_definite and F.inertia.negative == 0
    X3, y3 = torch.randn(300, 10, dtype=torch.float64), torch.randint(0, 5, (300,))
    G3 = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X3, y3)
    assert not G3._woodbury_cheaper(1e-3)
    wide = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 300)).double()
    X8, y8 = torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 300, (8,))
    assert not hessinv.gauss_newton(wide, nn.CrossEntropyLoss(), X8, y8)._woodbury_cheaper(1e-3)
    for bad in ("0.1", None, [0.1]):  # (a TypeError from the cost rule's comparison, once)
        with pytest.raises(hessinv.InvalidArgumentError):
            G.factor(bad)


def test_gauss_newton_factor_takes_the_root_against_the_sweep_too(monkeypatch):
    """Where the factorization would take the sweep (the dense route off here, as above 12288 parameters),
    the root is compared with the sweep's cost counted with its pivots as factored: a 16-48-48-5 MLP on 6
    examples (30 rows of the root against 3.4k parameters) goes through the root -- a 64-128-64-10 MLP on
    64 examples took 13.8 s by the sweep, 0.4 s so -- and answers as the dense float64 G + eps I does."""
    from reference import autograd_gauss_newton

    from hessinv.curvature import WoodburyFactorization

    monkeypatch.setattr(hessinv.curvature, "DENSE_ROUTE_MAX_N", 0)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 5)).double()
    X, y = torch.randn(6, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    F = G.factor(1e-2)
    assert isinstance(F, WoodburyFactorization)
    A = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y) + 1e-2 * torch.eye(
        G.shape[0], dtype=torch.float64
    )
    x = torch.linalg.solve(A, G.gradient)
    assert float((F.solve(G.gradient) - x).norm() / x.norm()) <= 1e-10
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-12)


def test_woodbury_factor_names_what_it_cannot_take():
    """A probe of hessinv.lowrank: a vector right-hand side of length n came back as an n x n matrix, a
    (1, k) one was broadcast to n rows, S = 2 (or a zero) gave solves 2-6% off and a wrong inertia, an
    index n + 3 of update_damping changed D[3], an integer U truncated a damping of 1.7 to 1, free = 0
    gave NaN -- each silently; other inputs raised torch's errors. Each is exact or named now."""
    from hessinv.errors import DtypeMismatchError, InvalidArgumentError, ShapeMismatchError, SingularError
    from hessinv.lowrank import WoodburyFactor

    g = torch.Generator().manual_seed(0)
    n, r = 12, 4
    U = torch.randn(r, n, generator=g, dtype=torch.float64)
    S = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    D = torch.rand(n, generator=g, dtype=torch.float64) + 2.0
    F = WoodburyFactor(U, S, D)
    A = torch.diag(D) + U.T @ torch.diag(S) @ U
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x = F.solve(b)  # a vector in, a vector out
    assert x.shape == (n,)
    torch.testing.assert_close(A @ x, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(F.solve(b[:, None])[:, 0], x, rtol=0, atol=0)
    for bad, error in (
        (torch.randn(1, 2, dtype=torch.float64), ShapeMismatchError),
        (torch.randn(n + 1, dtype=torch.float64), ShapeMismatchError),
        (b.float(), DtypeMismatchError),
        (b.tolist(), InvalidArgumentError),
    ):
        with pytest.raises(error):
            F.solve(bad)
    with pytest.raises(SingularError):
        F.solve(b, free=torch.zeros(n, dtype=torch.float64))
    for S_bad in (2 * S, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)):
        with pytest.raises(InvalidArgumentError, match="S must hold signs"):
            WoodburyFactor(U, S_bad, D)
    for args, error in (
        ((U, S[:, None], D), ShapeMismatchError),
        ((U, S.tolist(), D), ShapeMismatchError),
        ((U.long(), S, 1.7), InvalidArgumentError),
        ((U.float(), S.float(), 1e39), InvalidArgumentError),
        ((U, S, "1"), InvalidArgumentError),
        ((U, S, 1 + 1j), InvalidArgumentError),
    ):
        with pytest.raises(error):
            WoodburyFactor(*args)
    before = F.D.clone()
    for idx, values, error in (
        ([n + 3], torch.tensor([5.0], dtype=torch.float64), InvalidArgumentError),
        (torch.tensor([1.7]), torch.tensor([5.0], dtype=torch.float64), InvalidArgumentError),
        ([1, 2], torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64), ShapeMismatchError),
    ):
        with pytest.raises(error):
            F.update_damping(idx, values)
    assert torch.equal(F.D, before)
    # what the checks must not refuse (a fuzzer of them): numpy's scalars, a 0-d tensor, nothing to update
    import numpy as np

    for d in (np.float32(0.5), np.int64(1), torch.tensor(0.5)):
        WoodburyFactor(U, S, d).solve(b)
    F.update_damping([], torch.tensor([]))
    with pytest.raises(InvalidArgumentError):
        WoodburyFactor(U, S.to(torch.complex128), D)
    with pytest.raises(InvalidArgumentError):
        F.update_damping([1], torch.tensor([1 + 1j]))
    F.update_damping([-1, 3], [5.0, 6.0])  # (a list of values; negative indices count from the end)
    A2 = A.clone()
    A2[n - 1, n - 1] += 5.0 - D[n - 1]
    A2[3, 3] += 6.0 - D[3]
    torch.testing.assert_close(A2 @ F.solve(b), b, rtol=0, atol=1e-12)


def test_a_tiny_per_parameter_damping_is_refused_by_name_like_the_same_number():
    """``G.factor(torch.full((n,), 1e-16)).solve(v)`` raised torch's "Boolean value of Tensor with more than
    one value is ambiguous" from the singularity test (``abs(damping)`` of a tensor), where the number 1e-16
    gets a named SingularError (a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(2, 3, dtype=torch.float64), torch.randint(0, 3, (2,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    for d in (1e-16, torch.full((G.shape[0],), 1e-16, dtype=torch.float64)):
        with pytest.raises(hessinv.SingularError, match="singular to working precision"):
            G.factor(d).solve(v)


def test_a_per_parameter_damping_on_many_examples_of_a_small_model_is_factored_densely():
    """``G.factor(D)`` with a per-parameter ``D`` always took the root and the Woodbury system ``K`` of ``r =
    batch x classes`` rows: 31 parameters on 4000 examples built an 8000 x 8000 ``K`` (5-12 s, cubic in the
    batch) where the number ``0.1`` took the sweep's 0.06 s (a probe). Far more rows than parameters: the
    dense ``n x n`` ``G + D``, without the root; the answers those of ``G + D``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(200, 3, dtype=torch.float64), torch.randint(0, 3, (200,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    n = G.shape[0]
    D = torch.rand(n, dtype=torch.float64) * 0.1 + 0.01
    F = G.factor(D)
    assert F.woodbury is None and G._root is None
    A = G.to_dense() + torch.diag(D)
    b = torch.randn(n, dtype=torch.float64)
    assert torch.allclose(F.solve(b), torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-12)
    assert tuple(F.inertia) == (0, 0, n)
