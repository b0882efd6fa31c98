"""What a mutation probe of the chain, stage oracles, spectrum and influence (2026-12-07) found unpinned:
each mutated line passed its module's tests; each test below fails on its mutant. Plain-autograd float64
references.

- a dense generic stage's diag(Hxx) added once per chunk of examples in the diagonal sweep (3.4x off);
- ``num_negative_eigenvalues`` ignoring its ``tol``; the histogram's first edge at 0 not moved to ``-tol``;
  the spectral range not grown past an underestimated norm;
- probability targets of negative mass taken as a positive semi-definite output curvature (G 149% off);
- the influence weight counting ignored targets;
- the hidden-skip (stash) checks of the gradient and of per-example rows loosened;
- probability targets with label smoothing uncovered; the eigenpairs interval not widened by its floor."""

from unittest import mock

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv import riccati, spectrum

DT = torch.float64


class ExpScale(nn.Module):  # a generic stage whose parameters enter nonlinearly: Hxx != 0
    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(d, dtype=DT))

    def forward(self, z):
        return z * self.s.exp()


def test_example_diagonal_sweep_in_chunks_adds_a_dense_stage_hxx_once():
    """G_exdiag_hxx_every_chunk: DenseBlocks.example_curvature_diagonal adds diag(Hxx) (the batch's) with
    the first chunk of examples only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), ExpScale(5), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    _, H_ref = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    for rows in (1, 3, 8):
        with mock.patch.object(riccati, "_example_rows", lambda blocks, r=rows: r):
            d = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).diagonal()
        assert float((d - H_ref.diagonal()).abs().max()) <= 1e-12 * float(H_ref.abs().max()), rows


def _indefinite_hessian() -> tuple[hessinv.Hessian, torch.Tensor]:
    """A small tanh net's Hessian and its eigenvalues by plain autograd (float64, ascending)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    _, H_ref = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    return hessinv.hessian(net, nn.CrossEntropyLoss(), X, y), torch.linalg.eigvalsh(H_ref)


def test_num_negative_eigenvalues_uses_the_tol_given():
    """S_numneg_tol_ignored."""
    H, lam = _indefinite_hessian()
    for tol in (0.5 * float(-lam[0]), 2 * float(-lam[0])):
        assert spectrum.num_negative_eigenvalues(H, tol) == int((lam < -tol).sum())


def test_histogram_first_edge_at_zero_keeps_a_float32_null_space_in_the_first_bin():
    """S_hist_zero_edge_first: an edge at 0 that is the first edge is moved to -tol too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3))
    X, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    for bins in (4, [0.0, 1.0, 10.0]):
        assert spectrum.spectral_histogram(G, bins=bins).below == 0


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_spectral_range_grows_past_an_underestimated_norm(side):
    """S_range_hi_offby1 / S_range_lo_offby1: with the start r between the two largest (smallest)
    eigenvalues, the loops must grow until every eigenvalue is inside."""
    H, lam = _indefinite_hessian()
    H.norm_estimate()
    mid = float(lam[-2] + lam[-1]) / 2 if side == "top" else -float(lam[0] + lam[1]) / 2
    H._norm = mid / 1.05
    lo, hi = spectrum.spectral_range(H)
    assert lo <= float(lam[0]) and float(lam[-1]) < hi
    h = spectrum.spectral_histogram(H, bins=5)
    assert (h.below, h.above) == (0, 0)


def test_gauss_newton_of_negative_mass_probability_targets_is_not_taken_as_psd():
    """L_psd_always: rows of negative target mass make Lambda_n negative semidefinite; the operator must not
    be flagged PSD (its root dropped the negative part: G 149% off, inertia (0, 25, 6), lambda_min 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(6, 3, dtype=DT)
    T = torch.softmax(torch.randn(6, 3, dtype=DT), 1)
    T[:3] *= -2.0
    G_ref = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, T)
    lam = torch.linalg.eigvalsh(G_ref)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, T)
    assert float((G.to_dense() - G_ref).norm()) <= 1e-12 * float(G_ref.norm())
    assert G.inertia().negative == int((lam < -1e-8).sum())
    assert G.min_eigenvalue() == pytest.approx(float(lam[0]), rel=1e-8)


def test_influence_weight_counts_the_examples_the_loss_counts():
    """I_count_all_examples: a summed loss with ignored targets: H ~ (N_counted / B_counted) H_B."""
    from hessinv.influence import InfluenceFunction, per_example_gradients

    torch.manual_seed(0)
    N, B, lam = 40, 10, 1e-1
    X, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    y[:4] = -100
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    lf = nn.CrossEntropyLoss(reduction="sum")
    f = InfluenceFunction(net, lf, "hessian", lam).fit(X, y, X[:B], y[:B])
    _, HB = autograd_gradient_hessian(net, lf, X[:B], y[:B])
    G = per_example_gradients(net, lf, X, y)
    A = (36 / 6) * HB + lam * torch.eye(len(HB), dtype=DT)
    torch.testing.assert_close(f.self_influence(), (torch.linalg.solve(A, G.T).T * G).sum(1))


class _Stash(nn.Module):
    def forward(self, x):
        self.saved = x
        return x


class _AddStash(nn.Module):
    def __init__(self, st, c):
        super().__init__()
        object.__setattr__(self, "st", st)
        self.c = c

    def forward(self, x):
        return x + self.c * self.st.saved


def _stash_net(c):
    torch.manual_seed(0)
    st = _Stash()
    net = nn.Sequential(
        nn.Linear(4, 8), st, nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), _AddStash(st, c), nn.Linear(8, 3)
    ).double()
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    net(X)
    return net, X, y


@pytest.mark.parametrize("c", [1e-2, 1e-4])
def test_a_weak_hidden_skip_is_refused_too(c):
    """CH_grad_check_loose: the gradient check's tolerance (10 sqrt(u)): a stash read with weight 1e-2 gave
    a Hessian 1% off under a 1e6x looser check."""
    net, X, y = _stash_net(c)
    with pytest.raises(hessinv.NotAChainError, match="differs from autograd's"):
        hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)


def test_per_example_rows_of_a_weak_hidden_skip_are_exact():
    """CH_rowcheck_floor_loose: the rows' check against the first example alone (rows 1e-6 off passed a
    looser floor)."""
    from hessinv.influence import per_example_gradients

    net, X, y = _stash_net(1e-6)
    lf = nn.CrossEntropyLoss()
    R = per_example_gradients(net, lf, X, y)
    ps = list(net.parameters())
    rows = [torch.autograd.grad(lf(net(X[i : i + 1]), y[i : i + 1]), ps) for i in range(len(X))]
    ref = torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows])

    assert float(((R - ref).norm(dim=1) / ref.norm(dim=1)).max()) <= 1e-12


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_probability_targets_with_label_smoothing_against_dense(weighted, reduction):
    """Probability targets with label smoothing (and class weights): no test covered them, and the loss
    value's own check (rtol 1e-4) would let a smoothing below ~1e-4 go uncounted."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, T = torch.randn(6, 3, dtype=DT), torch.softmax(torch.randn(6, 3, dtype=DT), 1)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT) if weighted else None
    for eps in (0.2, 1e-5):
        lf = nn.CrossEntropyLoss(label_smoothing=eps, weight=w, reduction=reduction)
        g_ref, H_ref = autograd_gradient_hessian(net, lf, X, T)
        H = hessinv.hessian(net, lf, X, T)
        assert float((H.to_dense() - H_ref).norm()) <= 1e-12 * float(H_ref.norm())
        assert float((H.gradient - g_ref).norm()) <= 1e-12 * float(g_ref.norm())
        G_ref = autograd_gauss_newton(net, lf, X, T)
        G = hessinv.gauss_newton(net, lf, X, T)
        assert float((G.to_dense() - G_ref).norm()) <= 1e-12 * float(G_ref.norm())


def test_eigenpairs_interval_is_widened_by_at_least_the_zero_tolerance():
    """The certificate counts the eigenvalues in the span of the values found, widened by at least
    ``sqrt(u) ||G||`` (a Gauss-Newton matrix's null space from the logits' common shift sits within
    rounding of 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3)).double()
    X, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 3, (12,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    lam = torch.linalg.eigvalsh(autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y))
    tol = G.zero_tolerance()
    for k in (1, 2, 3):
        e = G.eigenpairs(k, "smallest", certify=True)
        lo, hi = e.interval
        assert hi >= float(e.values[-1]) + tol and lo <= float(e.values[0]) - tol
        assert torch.allclose(e.values, lam[:k], atol=1e-8 * float(lam.abs().max()))
