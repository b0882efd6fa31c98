"""The exact diagonal and trace of the curvature (``CurvatureOperator.diagonal`` / ``trace``) on the shapes
the random chains of test_curvature.py and the zoo of test_zoo.py do not reach: a Linear too wide for its
``p x p`` block, the dense route, float32, parameters listed out of stage order."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian, zero_linear_problem
from torch import nn

import hessinv


def _mlp(sizes, act=nn.Tanh, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def test_a_linear_too_wide_for_its_block_gets_its_diagonal_without_it():
    """p = 120,040 parameters in the first Linear: its p x p block (115 GB) is never formed; each entry
    is checked against e_i^T (H e_i) by the O(L) product."""
    net = _mlp([3000, 40, 5])
    X, y = torch.randn(4, 3000, dtype=torch.float64), torch.randint(0, 5, (4,))
    for op in (hessinv.hessian, hessinv.gauss_newton):
        H = op(net, nn.CrossEntropyLoss(), X, y)
        d = H.diagonal()
        assert d.shape == (H.shape[0],)
        idx = torch.cat(
            [torch.randint(0, 120_040, (12,)), torch.arange(120_000, 120_040, 5), torch.tensor([-1, -3])]
        )
        idx = idx % H.shape[0]
        E = torch.zeros(H.shape[0], len(idx), dtype=torch.float64)
        E[idx, torch.arange(len(idx))] = 1.0
        ref = (H @ E)[idx, torch.arange(len(idx))]
        assert torch.allclose(d[idx], ref, rtol=1e-10, atol=1e-14 * float(ref.abs().max()))


def test_the_dense_route_gives_the_same_diagonal():
    """A large batch on a small model: the factorizations take the dense route (one n x n block), and so
    does the diagonal."""
    net = _mlp([4, 8, 8, 10])
    X, y = torch.randn(800, 4, dtype=torch.float64), torch.randint(0, 10, (800,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert H._swept() is not H  # (the route this test is about)
    _, H_ref = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    assert (H.diagonal() - H_ref.diagonal()).abs().max() <= 1e-12 * H_ref.abs().max()
    assert H.trace() == pytest.approx(float(H_ref.trace()), rel=1e-12, abs=1e-12 * float(H_ref.abs().max()))


def test_float32_operator_diagonal_is_float32_and_close():
    net = _mlp([6, 10, 10, 3], dtype=torch.float32, seed=3)
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    d = H.diagonal()
    assert d.dtype == torch.float32
    net64 = _mlp([6, 10, 10, 3], seed=3)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    _, H_ref = autograd_gradient_hessian(net64, nn.CrossEntropyLoss(), X.double(), y)
    assert (d.double() - H_ref.diagonal()).abs().max() <= 1e-5 * H_ref.abs().max()


def test_parameters_listed_out_of_stage_order_and_frozen_ones():
    """The diagonal follows the operator's vector order (``model.parameters()``, trainable only): a bias
    registered before its weight, a frozen layer."""
    net = _mlp([5, 7, 6, 3], act=nn.Sigmoid, seed=1)
    lin = net[2]
    w = lin.weight
    del lin.weight
    lin.weight = w  # re-registered: the bias now comes first in parameters()
    net[0].weight.requires_grad_(False)
    X, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    for op, ref in ((hessinv.hessian, None), (hessinv.gauss_newton, autograd_gauss_newton)):
        H = op(net, nn.CrossEntropyLoss(), X, y)
        R = (
            autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1]
            if ref is None
            else ref(net, nn.CrossEntropyLoss(), X, y)
        )
        assert H.shape == tuple(R.shape)
        assert (H.diagonal() - R.diagonal()).abs().max() <= 1e-12 * R.abs().max()


def test_per_layer_traces_from_the_diagonal():
    """``diagonal()`` split by the parameters' sizes: each layer's trace (what Hessian-aware quantization
    ranks layers by) equals the trace of its diagonal block of the dense Hessian."""
    net = _mlp([4, 6, 6, 6, 2], act=nn.GELU, seed=2)
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    _, H_ref = autograd_gradient_hessian(net, nn.MSELoss(), X, y)
    sizes = [p.numel() for p in net.parameters()]
    got = [float(t.sum()) for t in torch.split(H.diagonal(), sizes)]
    blocks = torch.split(torch.arange(H.shape[0]), sizes)
    want = [float(H_ref[i][:, i].trace()) for i in blocks]
    assert got == pytest.approx(want, rel=1e-11, abs=1e-13)
    assert H.trace() == pytest.approx(sum(want), rel=1e-11)


# -- the inverse's diagonal (Factorization.inverse_diagonal) ----------------------------------------------
def _inverse_diagonal_ref(A: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.linalg.inv(A + eps * torch.eye(A.shape[0], dtype=A.dtype)).diagonal()


def test_inverse_diagonal_on_the_dense_route_and_a_wide_low_rank_pivot():
    """One n x n block (the dense route), a Linear whose pivot is factored in low-rank form (inputs
    wider than the batch), and a wide stage inside the chain, at a positive definite and an indefinite
    shift."""
    cases = [
        (_mlp([4, 8, 8, 10]), torch.randn(800, 4, dtype=torch.float64), 10, 800),
        (_mlp([40, 6, 3]), torch.randn(5, 40, dtype=torch.float64), 3, 5),
        # a wide stage between others (p = 1640 > B d = 160): the sweep keeps no p x p covariance there
        (_mlp([3, 40, 40, 3], act=nn.Sigmoid), torch.randn(4, 3, dtype=torch.float64), 3, 4),
    ]
    for net, X, C, B in cases:
        y = torch.randint(0, C, (B,))
        H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
        _, A = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
        ev = torch.linalg.eigvalsh(A)
        for eps in (-float(ev[0]) + 0.05, 0.3 * abs(float(ev[0])) + 1e-3):
            F = H.factor(eps)
            ref = _inverse_diagonal_ref(A, eps)
            assert (F.inverse_diagonal() - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert any(f is not None and hasattr(f.pivot, "Qz") for f in F.factors)  # (the low-rank pivot)


def test_inverse_diagonal_of_perturbed_pivots_falls_back_exactly(monkeypatch):
    """A zero-initialized linear net at eps = 0: the last pivot is exactly zero and is perturbed, so the
    sweep's factors are another matrix's; the answer comes from the dense inverse, and above the dense
    limit from refined solves."""
    from hessinv import curvature

    m, X, Y = zero_linear_problem()
    H = hessinv.hessian(m, nn.MSELoss(), X, Y)
    _, A = autograd_gradient_hessian(m, nn.MSELoss(), X, Y)
    inv = torch.linalg.inv(A)  # H = [[0, C], [C^T, 0]]: its inverse's diagonal is zero
    scale = float(inv.abs().max())
    F = H.factor(0.0)
    assert F.perturbed
    assert float(F.inverse_diagonal().abs().max()) <= 1e-12 * scale
    monkeypatch.setattr(curvature, "DENSE_ROUTE_MAX_N", 4)
    F = H.factor(0.0)
    assert float(F.inverse_diagonal().abs().max()) <= 1e-12 * scale
    # at eps = 1e-3 the diagonal is not zero: entry by entry
    F = H.factor(1e-3)
    ref = _inverse_diagonal_ref(A, 1e-3)
    assert float((F.inverse_diagonal() - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_inverse_diagonal_below_float64_comes_from_the_float64_twin():
    net = _mlp([6, 10, 10, 3], dtype=torch.float32, seed=3)
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    net64 = _mlp([6, 10, 10, 3], seed=3)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    _, A = autograd_gradient_hessian(net64, nn.CrossEntropyLoss(), X.double(), y)
    eps = 1e-4 - float(torch.linalg.eigvalsh(A)[0])  # cond ~ 1e4 and more: float32 alone gives ~1e-3
    ref = _inverse_diagonal_ref(A, eps)
    d = H.factor(eps).inverse_diagonal()
    assert d.dtype == torch.float32
    assert (d.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    H64 = hessinv.hessian(net64, nn.CrossEntropyLoss(), X.double(), y)
    d = H64.factor(eps, precision="mixed").inverse_diagonal()
    assert d.dtype == torch.float64 and (d - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_inverse_diagonal_refuses_what_it_cannot_give():
    net = _mlp([4, 5, 3], seed=4)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    eps = 0.5 * abs(hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).min_eigenvalue())
    M = H.factor(eps, modify="abs")
    if M._pivots_modified:  # (the modified matrix is not H + eps I)
        with pytest.raises(hessinv.InvalidArgumentError, match="inverse_diagonal"):
            M.inverse_diagonal()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["scalar", "vector", "outlier", "zeros"])
def test_woodbury_inverse_diagonal_and_square_root(kind, dtype):
    """The Woodbury factorization's ``diag((G + D)^{-1})``, square root and samples against the dense
    float64 inverse (they were refused: 'needs the Riccati factorization'), for a scalar damping, a
    per-parameter one, one with an outlying tiny entry and one with zero entries (factored apart)."""
    net = _mlp([5, 8, 3], seed=7)
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    G64 = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    n = G64.shape[0]
    g = torch.Generator().manual_seed(3)
    D = 0.05 if kind == "scalar" else torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 1e-3
    if kind == "outlier":
        D[3] = 1e-9
    elif kind == "zeros":
        D[0] = D[7] = 0.0
    I = torch.eye(n, dtype=torch.float64)
    A = G64.to_dense() + (torch.diag(D) if isinstance(D, torch.Tensor) else D * I)
    Ai = torch.linalg.inv(A)
    G = hessinv.gauss_newton(net.to(dtype), nn.CrossEntropyLoss(), X.to(dtype), y)
    W = G.factor(D.to(dtype) if isinstance(D, torch.Tensor) else D, method="woodbury")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    d = W.inverse_diagonal()
    assert d.dtype == dtype and (d.double() - Ai.diagonal()).abs().max() <= tol * Ai.diagonal().max()
    S = W.inverse_sqrt(torch.eye(n, dtype=dtype)).double()
    assert (S @ S.T - Ai).abs().max() <= 10 * tol * Ai.abs().max()
    draws = W.sample(4, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, 4) and draws.dtype == dtype and bool(torch.isfinite(draws).all())


def test_woodbury_samples_have_the_posterior_covariance():
    """``(G + D)^{-1} (U^T z_1 + D^{1/2} z_2)``: the empirical covariance of 40000 draws is the inverse
    (relative error of each entry about 0.5% at this count; 5% allowed)."""
    net = _mlp([5, 8, 3], seed=8)
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    n = G.shape[0]
    for D in (0.05, torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.01):
        I = torch.eye(n, dtype=torch.float64)
        A = G.to_dense() + (torch.diag(D) if isinstance(D, torch.Tensor) else D * I)
        Ai = torch.linalg.inv(A)
        s = G.factor(D, method="woodbury").sample(40000, generator=torch.Generator().manual_seed(0))
        assert ((s @ s.T / s.shape[1] - Ai).abs().max() / Ai.abs().max()) < 0.05


def test_gauss_newton_diagonal_from_its_root_where_that_is_cheaper(monkeypatch):
    """``G = U^T diag(S) U`` with ``r = B C`` rows small against the sweep's ``a x a`` blocks (where the
    stages do not give per-example blocks: taken so here), or the root already formed: the diagonal is
    ``sum_q S_q U_q^2`` from the root, equal to the sweep's and to autograd's."""
    from hessinv import curvature
    from hessinv.curvature import GaussNewton

    monkeypatch.setattr(curvature, "examples_apart", lambda blocks: False)
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Linear(6, 40), nn.LayerNorm(40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)
    )
    net = net.double()
    X, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    d = G.diagonal()
    assert G._root is not None  # (the route this test is about)
    ref = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    assert (d - ref.diagonal()).abs().max() <= 1e-12 * ref.abs().max()
    monkeypatch.setattr(GaussNewton, "ROOT_DIAGONAL_SHARE", 0.0)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    assert (G.diagonal() - d).abs().max() <= 1e-12 * ref.abs().max() and G._root is None
    monkeypatch.undo()
    mlp = _mlp([6, 40, 40, 3], act=nn.ReLU, seed=5)  # examples kept apart: the root only where at hand
    ref = autograd_gauss_newton(mlp, nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(mlp, nn.CrossEntropyLoss(), X, y)
    assert (G.diagonal() - ref.diagonal()).abs().max() <= 1e-12 * ref.abs().max() and G._root is None
    G.root()
    assert (G.diagonal() - ref.diagonal()).abs().max() <= 1e-12 * ref.abs().max()


def test_inverse_diagonal_takes_the_dense_inverse_where_that_is_cheaper():
    """A batch much larger than the model (``a = 4800 > n = 1482``): the forward sweep's ``a x a`` blocks
    cost more than forming and inverting ``G + eps I`` -- that route, and the same numbers."""
    import hessinv.curvature as hc

    net = _mlp([64, 16, 16, 10], seed=6)
    X, y = torch.randn(300, 64, dtype=torch.float64), torch.randint(0, 10, (300,))
    ref = _inverse_diagonal_ref(autograd_gauss_newton(net, nn.CrossEntropyLoss(reduction="sum"), X, y), 0.3)
    # the factorization itself takes the dense route since its first stage's coupling of 300 x 16 outputs
    # is counted (540 ms for the factorization, a solve and this diagonal, against 2.2 s through the sweep);
    # the sweep kept, the inverse diagonal still takes the dense inverse
    for sweep in (True, False):
        with mock.patch.object(hc, "_dense_route", (lambda *a, **k: False) if sweep else hc._dense_route):
            G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(reduction="sum"), X, y)
            F = G.factor(0.3)
            assert (G._swept() is G) == sweep
            if sweep:
                assert F._dense_inverse_cheaper()  # (the route this test is about)
            assert (F.inverse_diagonal() - ref).abs().max() <= 1e-10 * ref.abs().max()
    narrow = _mlp([4] + [6] * 12 + [3], seed=6)
    Xn, yn = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert (
        not hessinv.gauss_newton(narrow, nn.CrossEntropyLoss(), Xn, yn).factor(0.3)._dense_inverse_cheaper()
    )


def test_inverse_diagonal_of_a_singular_matrix_is_refused():
    """``eps = -lambda_k`` exactly: ``H + eps I`` singular to working precision. The dense inverse's LU
    met no exact zero pivot and returned entries of 1e14-1e16 (a review); now a SingularError, as
    ``solve`` and ``slogdet`` give."""
    torch.manual_seed(2)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, A = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(A)
    for k in (0, 36, len(ev) - 1):
        with pytest.raises(hessinv.SingularError, match="singular to working precision"):
            H.factor(-float(ev[k])).inverse_diagonal()


def test_inverse_diagonal_inside_the_spectrum_is_checked_against_refined_solves():
    """An indefinite shift next to a middle eigenvalue (cond 1e4-1e6): the unrefined forward sweep lost
    up to 4e4x more than cond u (3.7e-9 at cond 1e4, 4.3e-6 at 1e6: a review); its result is checked at a
    few entries per stage and replaced where it does not hold to ``tol`` (default 1e-8 of the largest
    entry; ``tol=1e-12`` asks for cond u)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, A = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    ev, V = torch.linalg.eigh(A)
    top, k = float(ev.abs().max()), len(ev) // 2
    for dist in (1e-4, 1e-6):
        eps = -float(ev[k]) + dist * top
        ref = (V**2 / (ev + eps)).sum(1)
        cond = float((ev + eps).abs().max() / (ev + eps).abs().min())
        F = H.factor(eps)
        err = float((F.inverse_diagonal(tol=1e-12) - ref).abs().max() / ref.abs().max())
        assert err <= 100 * cond * torch.finfo(torch.float64).eps, (dist, err, cond)
        err = float((F.inverse_diagonal() - ref).abs().max() / ref.abs().max())
        assert err <= 1e-8, (dist, err, cond)
    with pytest.raises(hessinv.InvalidArgumentError, match="tol"):
        F.inverse_diagonal(tol=0.0)


def test_gauss_newton_diagonal_of_a_large_lookup_table_takes_the_root():
    """An Embedding of 20,000 x 16 (a generic stage: its dense per-example blocks would hold 1e11 numbers,
    a TooLargeError before): the root's rows give the diagonal exactly, in milliseconds."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(20000, 16), nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5))
    m = m.double()
    X, y = torch.randint(0, 20000, (8, 4)), torch.randint(0, 5, (8,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    d = G.diagonal()
    U, S = G.root()
    idx = torch.cat([torch.unique(X.flatten())[:5] * 16 + 3, torch.arange(G.shape[0] - 40, G.shape[0])])
    E = torch.zeros(G.shape[0], len(idx), dtype=torch.float64)
    E[idx, torch.arange(len(idx))] = 1.0
    ref = (G @ E)[idx, torch.arange(len(idx))]
    assert torch.allclose(d[idx], ref, rtol=1e-12, atol=1e-15)
    assert int((d != 0).sum()) < 2000  # (rows of tokens outside the batch: zero)


def test_inverse_diagonal_refuses_a_sweep_that_would_not_fit(monkeypatch):
    from hessinv import riccati

    net = _mlp([4] + [8] * 10 + [3], seed=7)
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    F = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).factor(1.0)
    assert not F._dense_inverse_cheaper()  # (the sweep is the route)
    monkeypatch.setattr(riccati, "_capacity_bytes", lambda device: 1)
    monkeypatch.setattr(riccati, "_memory_bytes", lambda device: 10_000)
    with pytest.raises(hessinv.TooLargeError, match="inverse_diagonal: the forward sweep would need"):
        F.inverse_diagonal()


def test_inverse_diagonal_at_cond_1e9_keeps_the_sweep_instead_of_n_solves(monkeypatch):
    """n = 2932 (above the dense limit), positive definite at cond ~1e9: refinement and GMRES stall near a
    residual of 4e-8, and the check required sqrt(u) of them, so the sweep fell back to n / 256 refined
    solves (38 s against 0.09 s, a review) that were no more accurate. The check now allows for the
    solves' own forward error (cond times their backward error), and keeps the sweep's diagonal where it
    agrees with them (or where they cannot check it, with an AccuracyWarning)."""
    from hessinv.curvature import Factorization

    net = _mlp([8] + [16] * 11 + [4], seed=0)
    X, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    F = H.factor(-H.min_eigenvalue() + 1e-9 * H.norm_estimate())
    assert H.shape[0] > 2048 and not F._dense_inverse_cheaper()

    def refused(*args, **kwargs):
        raise AssertionError("n refined solves")

    monkeypatch.setattr(Factorization, "_inverse_diagonal_by_solves", refused)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inverse_diagonal", hessinv.AccuracyWarning)
        d = F.inverse_diagonal()
    assert bool((d > 0).all())  # (positive definite: positive variances)


def test_inverse_diagonal_that_refined_solves_cannot_check(monkeypatch):
    """Where the probes' solves are themselves too inaccurate to judge the sweep (a forward error above
    1e-2): the dense inverse answers up to the dense route's size; above it the sweep's diagonal is kept
    with an AccuracyWarning (n such solves would be no better)."""
    from hessinv import curvature
    from hessinv.curvature import Factorization

    net = _mlp([4, 6, 6, 3], seed=8)
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    F = G.factor(0.1, method="riccati")  # (auto: Woodbury, as B C = 30 < n / 2)
    ref = _inverse_diagonal_ref(autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y), 0.1)
    raw = Factorization._raw
    monkeypatch.setattr(Factorization, "_raw", lambda self, R: 0.5 * raw(self, R))  # solves gaining no digit
    routes = []
    by_solves = Factorization._inverse_diagonal_by_solves
    monkeypatch.setattr(
        Factorization, "_inverse_diagonal_by_solves", lambda self, *a: routes.append(a) or by_solves(self, *a)
    )
    assert (F.inverse_diagonal() - ref).abs().max() <= 1e-12 * ref.abs().max() and len(routes) == 1
    monkeypatch.setattr(curvature, "DENSE_ROUTE_MAX_N", 4)
    with pytest.warns(hessinv.AccuracyWarning, match="could not be checked"):
        d = F.inverse_diagonal()
    assert (d - ref).abs().max() <= 1e-12 * ref.abs().max() and len(routes) == 1


def test_inverse_diagonal_of_graded_chains_keeps_its_bound_and_takes_no_gmres(monkeypatch):
    """Saturated tanh chains (weights x 2.5-3.5) at small dampings: the probes, a sample, met the bound
    while the worst of 687 entries was 3x over it (a third review: 2.5e-6 of the largest entry against
    7.9e-7), and the probes' solves ran flexible GMRES to its cap on every column (17.8 s to check a
    0.012 s sweep). The check now asks a tenth of the bound of its sample and refines without GMRES."""
    from hessinv.curvature import Factorization

    def no_gmres(*args, **kwargs):
        raise AssertionError("GMRES in the check")

    monkeypatch.setattr(Factorization, "_gmres_columns", no_gmres)
    for depth, width, scale, seed, eps in [(16, 6, 3.5, 2, 3.16228e-05), (14, 7, 3.0, 7, 1e-07)]:
        torch.manual_seed(seed)
        layers, w = [], 5
        for _ in range(depth):
            lin = nn.Linear(w, width)
            with torch.no_grad():
                lin.weight.mul_(scale)
            layers += [lin, nn.Tanh()]
            w = width
        net = nn.Sequential(*layers, nn.Linear(w, 3)).double()
        torch.manual_seed(seed)
        X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        _, A = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
        lam, V = torch.linalg.eigh(0.5 * (A + A.T))
        truth = (V * V / (lam + eps)).sum(1)
        cond = float((lam + eps).abs().max() / (lam + eps).abs().min())
        d = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).factor(eps).inverse_diagonal()
        bound = max(1e-8, 100 * torch.finfo(torch.float64).eps * cond)
        assert float((d - truth).abs().max() / truth.abs().max()) <= bound, (depth, cond)


def test_a_gauss_newton_diagonal_after_a_factorization_keeps_the_per_example_sweep(monkeypatch):
    """Once a factorization had made G's root, ``G.diagonal()`` summed ``S_q U_qj^2`` over its ``r n``
    entries instead of the per-example sweep: 94 against 1.7 ms at width 128, depth 6 (a probe). The sweep
    stays where every stage keeps examples apart; the numbers are the same."""
    from hessinv import curvature as cv

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4)
    ).double()
    X, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    before = G.diagonal()
    G.factor(1e-3)
    assert G._root is not None
    swept = []
    real = cv.CurvatureOperator.diagonal

    def spy(self):
        swept.append(1)
        return real(self)

    monkeypatch.setattr(cv.CurvatureOperator, "diagonal", spy)
    after = G.diagonal()
    assert swept and torch.allclose(after, before, rtol=1e-12, atol=0)


@pytest.mark.parametrize("curvature", [hessinv.hessian, hessinv.gauss_newton])
def test_float32_inputs_whose_squares_overflow_get_their_diagonal(curvature):
    # (a probe: inputs of 1e20 in float32 -- the Linear rows' x^2 is 1e40, inf, and inf * sech^2 = 0 of a
    # saturated unit NaN: NonFiniteError "scale the loss down", though H, its products and its solves are
    # finite; to_dense gives the diagonal)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(16, 4) * 1e20, torch.randint(0, 3, (16,))
    op = curvature(net, nn.CrossEntropyLoss(), X, y)
    want = op.to_dense().diagonal()
    assert bool(torch.isfinite(want).all()) and float(want.abs().max()) > 0.1
    got = op.diagonal()
    assert got.dtype == torch.float32 and float((got - want).norm() / want.norm()) < 1e-5
    assert op.trace() == pytest.approx(float(want.double().sum()), rel=1e-5)
