"""Low-rank (Gauss-Newton root, Woodbury) behaviour a mutation probe found unpinned (2026-12-07): each test
fails on the named mutant of lowrank.py or WoodburyFactorization. Float64 plain-autograd references."""

from __future__ import annotations

import math

import pytest
import torch
from reference import autograd_gauss_newton, autograd_output_jacobian
from torch import nn

import hessinv
from hessinv.lowrank import gauss_newton_root

DT = torch.float64


def _mse_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()  # C = 5 outputs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_budgeted_root_cut_inside_a_tie_picks_the_same_rows_for_every_batch_size(k):
    """L08 (the tie tolerance of _top_output_curvature set to 0): an MSE's Lambda_n = 2 / (B C) I ties all
    C output directions, and a budget of k < C per example cuts inside that eigenspace. The docstring:
    the kept directions are then the projections of the first seeded columns -- the same for every batch
    size -- not ones picked by rounding (which differs for each scale 1 / B). Example 0's rows, scaled by
    sqrt(B), must agree for batches of 2 and 3 examples; and they must be sqrt(2 / C) W^T J_0 with W
    (C, k) orthonormal (J_0: example 0's autograd output Jacobian)."""
    model = _mse_model()
    C = 5
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 4, generator=g, dtype=DT)
    Y = torch.randn(3, C, generator=g, dtype=DT)
    rows = {}
    for B in (2, 3):
        G = hessinv.gauss_newton(model, nn.MSELoss(), X[:B], Y[:B])
        U, S = gauss_newton_root(G.blocks, DT, X.device, max_rows=B * k)
        assert U.shape[0] == B * k and bool((S == 1).all())
        rows[B] = U[:k] * math.sqrt(B)  # example 0's rows come first
    scale = float(rows[3].abs().max())
    torch.testing.assert_close(rows[2], rows[3], rtol=0, atol=1e-10 * scale)
    # the rows are sqrt(2 / C) W^T J_0 with W orthonormal (C, k): W^T = rows J_0^+ / sqrt(2 / C)
    J0 = autograd_output_jacobian(model, X[:1])[0]  # (C, n), full row rank here
    Wt = rows[3] @ torch.linalg.pinv(J0) / math.sqrt(2.0 / C)
    torch.testing.assert_close(
        Wt @ J0, rows[3] / math.sqrt(2.0 / C), rtol=0, atol=1e-9 * scale / math.sqrt(2.0 / C)
    )
    torch.testing.assert_close(Wt @ Wt.T, torch.eye(k, dtype=DT), rtol=0, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tiny_exact_diagonal_output_curvature_of_a_saturated_label_is_kept(reduction):
    """L05 (the ``* ~exact`` factor of the root's drop tolerance removed): a multi-label BCEWithLogits whose
    second label is saturated (logit ~ -40: sigma (1 - sigma) ~ 4e-18, 2e-17 of the first label's ~0.2; a
    positive logit is no good: autograd's 1 - sigma rounds) has
    a diagonal Lambda_n, known exactly -- the root keeps those rows (module comment: "those of a diagonal
    Lambda_n (an elementwise loss) exactly"). The last layer's second row and bias see only that label:
    their block of U^T S U must match the float64 autograd Gauss-Newton (the mutant's block is 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[2].bias[1] = -40.0
    X = torch.randn(5, 3, dtype=DT)
    Y = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], dtype=DT)
    loss = nn.BCEWithLogitsLoss(reduction=reduction)
    G_ref = autograd_gauss_newton(model, loss, X, Y)
    G = hessinv.gauss_newton(model, loss, X, Y)
    U, S = G.root()
    G_root = U.T @ (S[:, None] * U)
    # the parameter order: W1 (12), b1 (4), W2 (8), b2 (2); W2[1, :] is 20:24, b2[1] is 25
    sat = torch.tensor([20, 21, 22, 23, 25])
    blk_ref, blk = G_ref[sat][:, sat], G_root[sat][:, sat]
    top = float(blk_ref.abs().max())
    assert 0 < top < 1e-15 * float(G_ref.abs().max())  # tiny, but not zero
    torch.testing.assert_close(blk, blk_ref, rtol=0, atol=1e-8 * top)
    torch.testing.assert_close(G_root, G_ref, rtol=0, atol=1e-12 * float(G_ref.abs().max()))


def test_a_psd_lambda_with_a_negative_rounding_eigenvalue_gives_no_row_of_negative_sign():
    """L06 (``keep = mu.abs() > tol`` for a positive semidefinite loss too). The existing
    test_a_confident_float32_softmax_gives_no_row_of_negative_sign no longer reaches the rule: the loss
    stage's float32 Lambda is now accurate (its smallest eigenvalue -3e-15, under the drop tolerance
    1.3e-12). Here that softmax's ``diag(p) - p p^T`` with the old rounding put back (smallest
    eigenvalue -2.6e-3 of its largest, true 0) is given as the loss stage's Lambda with psd=True: every
    row keeps sign +1, so K = diag(S) + U D^-1 U^T stays >= I (Cholesky), and U^T S U is the float64
    Gauss-Newton to float32 accuracy."""
    from hessinv.lowrank import WoodburyFactor
    from hessinv.stages.losses import LossBlocks

    p = torch.tensor(
        [8.648229e-07, 3.818240e-07, 0.99999237, 1.796388e-06, 2.704939e-07,
         1.352321e-06, 8.406568e-07, 1.785286e-07, 7.473007e-07, 1.419324e-06]
    )  # fmt: skip
    torch.manual_seed(0)
    lin = nn.Linear(3, 10)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(p.log())
    B = 8
    x, y = torch.randn(B, 3), torch.full((B,), 2)
    G = hessinv.gauss_newton(lin, nn.CrossEntropyLoss(), x, y)
    q = torch.softmax(lin(x).detach().double(), 1)
    Lam = (torch.diag_embed(q) - q[:, :, None] * q[:, None, :]) / B
    # the rounding the old float32 Lambda carried: -2.6e-3 ||Lambda|| along its null vector 1 / sqrt(C)
    Lam = (Lam - 2.6e-3 * float(Lam.abs().max()) * torch.full((10, 10), 0.1, dtype=torch.float64)).float()
    assert float(torch.linalg.eigvalsh(Lam.double()).min()) < -1e-3 * float(Lam.abs().max())
    q = q.float()
    grad = (q - nn.functional.one_hot(y, 10).float()) / B
    blocks = list(G.blocks[:-1]) + [LossBlocks(grad, Lam, psd=True)]
    U, S = gauss_newton_root(blocks, torch.float32, x.device)
    assert bool((S > 0).all())
    ref = autograd_gauss_newton(lin.double(), nn.CrossEntropyLoss(), x.double(), y)
    Gr = (U.T @ (S[:, None] * U)).double()
    assert float((Gr - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    F = WoodburyFactor(U, S, torch.full((40,), 1e-6))  # D^-1 U U^T far above 1: a row's sign shows in K
    assert F.positive_definite and F.cholesky


@pytest.mark.parametrize("damping", [0.05, "vector"])
def test_woodbury_samples_have_the_inverse_as_covariance(damping):
    """C08 (``D^{1/2} z_2`` of WoodburyFactorization.sample without its D^{1/2}): x = (G + D)^{-1} (U^T z_1 +
    D^{1/2} z_2) has covariance (G + D)^{-1}; without the root it is A^{-1} (G + I) A^{-1}, 1/D^2 rather
    than 1/D along G's null space. 40000 seeded samples: the empirical covariance against the float64
    inverse of the autograd Gauss-Newton plus D (sampling error ~ 1%)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    lf = nn.CrossEntropyLoss()
    Gr = autograd_gauss_newton(net, lf, X, y)
    n = Gr.shape[0]
    D = 0.05 if damping == 0.05 else torch.linspace(0.02, 0.3, n, dtype=DT)
    Dm = torch.diag(torch.full((n,), D, dtype=DT) if isinstance(D, float) else D)
    cov_ref = torch.linalg.inv(Gr + Dm)
    F = hessinv.gauss_newton(net, lf, X, y).factor(D, method="woodbury")
    assert F.woodbury is not None  # (the Woodbury form's own sampler)
    x = F.sample(40000, generator=torch.Generator().manual_seed(0))
    cov = x @ x.T / x.shape[1]
    assert float((cov - cov_ref).norm()) <= 0.05 * float(cov_ref.norm())


def test_woodbury_inverse_diagonal_honours_a_tol_below_its_rounding_estimate(monkeypatch):
    """C10 (the gate ``err.max() <= 0.1 tol top`` of WoodburyFactorization.inverse_diagonal reduced to
    ``isfinite``): the docstring -- the Woodbury diagonal is taken where its rounding estimate is within a
    tenth of ``tol`` of the largest entry, else the dense float64 inverse or refined solves. At the
    default tol (estimate ~5e-15 relative) the Woodbury answer is taken; at tol = 1e-15 it is not. Both
    agree with the float64 inverse of the autograd Gauss-Newton plus damping."""
    import hessinv.curvature as hc

    calls = []
    orig = hc.Factorization._inverse_diagonal_by_solves

    def spy(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(hc.Factorization, "_inverse_diagonal_by_solves", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    lf = nn.CrossEntropyLoss()
    Gr = autograd_gauss_newton(net, lf, X, y)
    ref = torch.linalg.inv(Gr + 0.01 * torch.eye(Gr.shape[0], dtype=DT)).diagonal()
    F = hessinv.gauss_newton(net, lf, X, y).factor(0.01, method="woodbury")
    W = F._solver()
    d, err = W.inverse_diagonal()
    assert 1e-16 < float(err.max()) / float(d.abs().max()) < 1e-9  # (the premise: 1e-15 is below it)
    torch.testing.assert_close(F.inverse_diagonal(), ref, rtol=1e-10, atol=0)
    assert calls == []
    torch.testing.assert_close(F.inverse_diagonal(tol=1e-15), ref, rtol=1e-10, atol=0)
    assert calls == [1]


def test_zero_damping_on_a_parameter_without_curvature_names_it():
    """C11 (the check ``gjj[zero] > 0`` in WoodburyFactorization skipped): a zero damping entry on a
    parameter whose column of G is zero (a first-layer weight of an input feature that is 0 on the whole
    batch; autograd's G has a zero column there) is refused up front, naming the parameter -- the mutant
    reached a generic 'singular to working precision' from the dense fallback instead."""
    from hessinv.errors import SingularError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    X[:, 0] = 0.0
    lf = nn.CrossEntropyLoss()
    Gr = autograd_gauss_newton(net, lf, X, y)
    assert bool((Gr[3] == 0).all())  # weight (1, 0): no curvature
    D = torch.full((Gr.shape[0],), 0.1, dtype=DT)
    D[3] = 0.0
    with pytest.raises(SingularError, match="parameter 3 has zero damping and no curvature"):
        hessinv.gauss_newton(net, lf, X, y).factor(D, method="woodbury")


def test_budgeted_output_curvature_keeps_the_eigenvalues_of_largest_modulus():
    """L09 (_top_output_curvature sorting the Ritz values by value, not modulus): the docstring keeps the
    ``k`` eigenpairs of largest modulus -- an indefinite Lambda_n (a non-convex loss) whose dominant
    eigenvalue is negative keeps it (the mutant kept +5 and +1 over -10)."""
    from hessinv.lowrank import _top_output_curvature

    g = torch.Generator().manual_seed(0)
    C = 12
    Q = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=DT))[0]
    lam = torch.tensor([-10.0, 5.0, 1.0, 0.5, -0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001], dtype=DT)
    L = Q @ torch.diag(lam) @ Q.T

    class Loss:
        def hzz(self, X):
            return L @ X

    for k, want in ((1, [-10.0]), (2, [-10.0, 5.0])):
        mu, V = _top_output_curvature(Loss(), 1, C, k, DT, torch.device("cpu"))
        torch.testing.assert_close(mu[0], torch.tensor(want, dtype=DT), rtol=1e-8, atol=0)
        torch.testing.assert_close(L @ V[0], V[0] * mu[0], rtol=0, atol=1e-8)


def test_update_damping_takes_index_minus_n():
    """L23 (``-n <= idx.min()`` -> ``-n < idx.min()``): update_damping takes indices in [-n, n) as D[idx]
    does; -n is entry 0. Both solves against the float64 dense inverse of U^T S U + D."""
    from hessinv.lowrank import WoodburyFactor

    g = torch.Generator().manual_seed(3)
    U = torch.randn(4, 9, generator=g, dtype=DT)
    S = torch.ones(4, dtype=DT)
    D = torch.rand(9, generator=g, dtype=DT) + 1.0
    R = torch.randn(9, 2, generator=g, dtype=DT)
    F = WoodburyFactor(U, S, D)
    F.update_damping(torch.tensor([-9]), torch.tensor([3.0], dtype=DT))
    D2 = D.clone()
    D2[0] = 3.0
    want = torch.linalg.solve(U.T @ U + torch.diag(D2), R)
    torch.testing.assert_close(F.solve(R), want, rtol=1e-10, atol=1e-12)
    assert float(F.D[0]) == 3.0
