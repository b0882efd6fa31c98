"""log|det|, its sign, eigenvalue counts, histograms and the posterior square root against dense
references (plain autograd double backward + ``torch.linalg``), on random float64 chains."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gauss_newton, autograd_hessian, chains

import hessinv
from hessinv import spectrum
from hessinv.errors import IndefiniteError, InvalidArgumentError

OPS = {
    "hessian": (hessinv.Hessian, autograd_hessian),
    "gauss_newton": (hessinv.GaussNewton, autograd_gauss_newton),
}


def dense(prob, kind):
    cls, ref = OPS[kind]
    return cls(prob.model, prob.loss_fn, prob.inputs, prob.targets), ref(
        prob.model, prob.loss_fn, prob.inputs, prob.targets
    )


def separated_shifts(lam: torch.Tensor, rel: float = 1e-6) -> list[float]:
    """Shifts between consecutive distinct eigenvalues (gaps above ``rel * ||H||``), plus beyond both ends."""
    lam = lam.sort().values
    scale = max(float(lam.abs().max()), 1e-12)
    mids = [0.5 * float(a + b) for a, b in zip(lam[:-1], lam[1:], strict=True) if float(b - a) > rel * scale]
    return [
        float(lam[0]) - 0.1 * scale - 1e-3,
        *mids[:: max(1, len(mids) // 6)],
        float(lam[-1]) + 0.1 * scale + 1e-3,
    ]


@settings(max_examples=10)
@given(prob=chains(max_depth=5, max_width=6, max_batch=5), kind=st.sampled_from(sorted(OPS)))
def test_counts_match_dense_eigenvalues(prob, kind):
    H, D = dense(prob, kind)
    lam = torch.linalg.eigvalsh(D)
    shifts = separated_shifts(lam)
    got = spectrum.eigenvalue_counts(H, shifts)
    want = [int((lam < s).sum()) for s in shifts]
    assert got.tolist() == want, prob.description


@settings(max_examples=10)
@given(
    prob=chains(max_depth=5, max_width=6, max_batch=5),
    kind=st.sampled_from(sorted(OPS)),
    eps=st.sampled_from([1e-2, 0.3, 1.0, -0.2, -2.0]),
)
def test_logdet_and_sign_match_dense(prob, kind, eps):
    H, D = dense(prob, kind)
    n = D.shape[0]
    A = D + eps * torch.eye(n, dtype=D.dtype)
    lam = torch.linalg.eigvalsh(A)
    if float(lam.abs().min()) < 1e-6 * max(float(lam.abs().max()), 1.0):
        return  # singular to the accuracy of the dense reference
    sign, ref = torch.linalg.slogdet(A)
    f = H.factor(eps)
    s, got = f.slogdet()
    assert s == float(sign), prob.description
    assert got == pytest.approx(float(ref), rel=1e-9, abs=1e-8 * n), prob.description
    assert f.logdet() == got
    assert spectrum.logdet(H, eps) == (s, got)
    assert f.inertia.negative == int((lam < 0).sum())


@settings(max_examples=8)
@given(prob=chains(max_depth=4, max_width=6, max_batch=5), kind=st.sampled_from(sorted(OPS)))
def test_inverse_sqrt_is_a_square_root_of_the_inverse(prob, kind):
    H, D = dense(prob, kind)
    n = D.shape[0]
    eps = 1.0 + max(0.0, -float(torch.linalg.eigvalsh(D)[0]))  # positive definite H + eps I
    f = H.factor(eps)
    S = f.inverse_sqrt(torch.eye(n, dtype=D.dtype))
    Ci = torch.linalg.inv(D + eps * torch.eye(n, dtype=D.dtype))
    assert torch.allclose(S @ S.T, Ci, rtol=1e-8, atol=1e-10 * float(Ci.abs().max())), prob.description


def test_samples_have_the_inverse_as_covariance():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    X, y = torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 1])  # wide input: low-rank pivot
    G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
    f = G.factor(0.5, method="riccati")  # (auto: the Woodbury form, B C = 4 rows)
    assert any(type(fl.pivot).__name__ == "LowRankPivot" for fl in f.factors if fl is not None)
    k = 40000
    Z = f.sample(k, generator=torch.Generator().manual_seed(0))
    C = Z @ Z.T / k
    Ci = torch.linalg.inv(autograd_gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y) + 0.5 * torch.eye(29))
    # entrywise standard error of a sample covariance: sqrt((C_ii C_jj + C_ij^2) / k)
    se = ((Ci.diagonal()[:, None] * Ci.diagonal()[None, :] + Ci**2) / k).sqrt()
    assert float(((C - Ci).abs() / se).max()) < 6.0


def test_sample_of_an_indefinite_matrix_raises():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    H = hessinv.hessian(
        net, torch.nn.MSELoss(), torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2).double()
    )
    f = H.factor(-5.0)
    assert f.inertia.negative > 0
    with pytest.raises(IndefiniteError, match="negative eigenvalues"):
        f.sample(2)


def test_histogram_counts_and_range():
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    X, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    lam = torch.linalg.eigvalsh(autograd_hessian(net, torch.nn.CrossEntropyLoss(), X, y)).numpy()
    lo, hi = spectrum.spectral_range(H)
    assert lo <= lam.min() and lam.max() < hi
    h = spectrum.spectral_histogram(H, bins=9)
    assert h.below == 0 and h.above == 0 and h.n == H.shape[0]
    edges = h.edges
    assert h.counts.tolist() == np.histogram(lam, edges)[0].tolist()  # no eigenvalue on an inner edge here
    h2 = spectrum.spectral_histogram(H, bins=[-0.01, 0.0, 0.01])
    assert h2.below == int((lam < -0.01).sum()) and h2.above == int((lam >= 0.01).sum())
    with pytest.raises(ValueError):
        spectrum.spectral_histogram(H, bins=[0.1, 0.0])


def test_range_of_a_positive_semidefinite_matrix_starts_at_zero():
    """A Gauss-Newton matrix has no negative eigenvalue: the range starts at 0 (it was [-r, r): half of a
    histogram's bins, and their factorizations, on an empty half), and still holds every eigenvalue;
    the (indefinite) Hessian keeps its negative end."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
    lam = torch.linalg.eigvalsh(G.to_dense())
    lo, hi = spectrum.spectral_range(G)
    assert lo == 0.0 and float(lam.max()) < hi <= 4.2 * float(lam.max())
    h = spectrum.spectral_histogram(G, bins=8)
    assert h.below == 0 and h.above == 0 and h.edges[0] == 0.0
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    lo, hi = spectrum.spectral_range(H)
    assert lo < 0 < hi


def test_count_at_an_exact_null_space():
    """A Gauss-Newton matrix with a null space: N(0) counts none of its (numerically zero) eigenvalues."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    G = hessinv.gauss_newton(
        net, torch.nn.CrossEntropyLoss(), torch.randn(2, 6).double(), torch.tensor([0, 1])
    )
    assert spectrum.eigenvalue_counts(G, [0.0]).tolist() == [0]
    assert spectrum.num_negative_eigenvalues(G) == 0
    assert spectrum.eigenvalue_counts(G, [1e-300, 1e3]).tolist()[1] == G.shape[0]


def test_inertia_with_zero_tol_at_an_exact_eigenvalue_counts_the_null_space_as_zero():
    """A deep linear net's Hessian has a null space (12 of 28 eigenvalues below 1e-12): ``inertia(0,
    tol=0)`` must count it as zero, as the docstring says (the dense recount split it into 6 negative
    and 6 positive ones, (14, 0, 14), with no warning)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear
    net = torch.nn.Sequential(lin(3, 3), lin(3, 3), lin(3, 1)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    H = hessinv.hessian(net, torch.nn.MSELoss(), X, y)
    lam = torch.linalg.eigvalsh(H.to_dense())
    tiny = 1e-9 * float(lam.abs().max())
    expected = (int((lam < -tiny).sum()), int((lam.abs() <= tiny).sum()), int((lam > tiny).sum()))
    assert expected[1] == 12
    # (and says that it did: the counts are at the resolution, not at the tol=0 asked for -- a probe's
    # float32 tanh Hessian came back (48, 109, 49) without a word)
    with pytest.warns(hessinv.AccuracyWarning, match=r"tol=0\): H \+ shift I is singular.*12 eigenvalue"):
        zero_tol = H.inertia(0.0, tol=0)
    assert tuple(zero_tol) == expected == tuple(H.inertia(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hessinv.AccuracyWarning)  # (none where nothing sits at the shift)
        assert H.inertia(1.0, tol=0) == (0, 0, 28)


def test_slogdet_of_a_float32_factorization_handed_to_its_float64_twin():
    """A float32 sweep that must perturb pivots hands over to the float64 twin: the sign comes from the
    twin (its dense LU there), as the log does -- it came from the float32 sweep's uncertified inertia
    (15 negative eigenvalues against 10: sign -1 against +1)."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    F = H.factor(1e-12)
    assert F._twin_only
    A = H._residual_operator().to_dense() + 1e-12 * torch.eye(H.shape[0], dtype=torch.float64)
    sign, logabs = torch.linalg.slogdet(A)
    got = F.slogdet()
    assert got[0] == float(sign) and abs(got[1] - float(logabs)) < 1e-6 * abs(float(logabs))


@pytest.mark.parametrize("seed", range(4))
def test_counts_where_a_pivot_is_singular_but_h_is_not(seed):
    """A first layer of 9 x 14 weights seen by 11 examples: its pivot is singular to working precision at
    shift 0 while H is not (|lambda| >= 1e-6). The sweep alone counted 2-12 of 155 eigenvalues on the
    wrong side (every seed); an ill-conditioned pivot now sends the count to a dense LDL^T."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(9, 14), torch.nn.GELU(), torch.nn.Linear(14, 1)).double()
    X, y = torch.randn(11, 9, dtype=torch.float64), torch.randn(11, 1, dtype=torch.float64)
    H = hessinv.hessian(net, torch.nn.MSELoss(), X, y)
    lam = torch.linalg.eigvalsh(autograd_hessian(net, torch.nn.MSELoss(), X, y))
    assert float(lam.abs().min()) > 5e-7
    want = int((lam < 0).sum())
    assert H.inertia(0.0, tol=0) == (want, 0, len(lam) - want)
    assert spectrum.eigenvalue_counts(H, [0.0]).tolist() == [want]
    # the two eigenvalues nearest 0, certified by those counts although the factorization at 0 is not
    e = H.eigenpairs(2, "nearest", sigma=0.0)
    near = lam[lam.abs().argsort()[:2]].sort().values
    assert e.certified and torch.allclose(e.values, near, rtol=0, atol=1e-12)


def test_counts_that_may_be_off_say_so(monkeypatch):
    """Above the dense recount's size an ill-conditioned sweep's count is kept, with one AccuracyWarning
    from the public call (naming the caller's shift); eigenpairs then withholds its certificate."""
    monkeypatch.setattr(hessinv.curvature, "DENSE_RECOUNT_N", 10)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 14), torch.nn.GELU(), torch.nn.Linear(14, 1)).double()
    X, y = torch.randn(11, 9, dtype=torch.float64), torch.randn(11, 1, dtype=torch.float64)
    H = hessinv.hessian(net, torch.nn.MSELoss(), X, y)
    with pytest.warns(hessinv.AccuracyWarning, match=r"inertia\(0, tol=0\).*wrong side") as rec:
        H.inertia(0.0, tol=0)
    assert len(rec) == 1 and rec[0].filename == __file__
    with pytest.warns(hessinv.AccuracyWarning, match="eigenvalue_counts"):
        spectrum.eigenvalue_counts(H, [0.0, 1e-9])


@pytest.mark.parametrize("shift", [1e-300, 1e-60, 1e-30])
def test_counts_at_tiny_shifts_next_to_a_null_space(shift):
    """A dead-ReLU Hessian (135 exactly zero eigenvalues): a shift of 1e-300 left a pivot eigenvalue whose
    inverse overflowed the Schur complements (NonFiniteError, 'Qxx contains NaN or infinity'); it is
    singular to working precision there, and the count moves to the resolution as at shift 0."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 3),
    ).double()
    with torch.no_grad():
        net[0].bias[:2] = -100.0
    X, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    lam = torch.linalg.eigvalsh(autograd_hessian(net, torch.nn.CrossEntropyLoss(), X, y))
    z = H.zero_tolerance()
    assert spectrum.eigenvalue_counts(H, [-shift]).tolist() == [int((lam < -z).sum())]
    assert H.inertia(shift, tol=0) == (
        int((lam < -z).sum()),
        int((lam.abs() <= z).sum()),
        int((lam > z).sum()),
    )


@pytest.mark.parametrize("shift", [1e-45, -1e-45, 3.1e-132])
def test_float32_counts_at_shifts_below_its_range(shift):
    """A float32 Hessian with inputs wider than the batch (low-rank pivots, a null space of about 90):
    shifts of 1e-45 / 1e-132 are 0 to working precision. Counting there overflowed (C / shift) into an
    unnamed RuntimeError; now the eigenvalues within the resolution count as zero, as at shift 0."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(14, 6), torch.nn.GELU(), torch.nn.Linear(6, 4), torch.nn.GELU(), torch.nn.Linear(4, 1)
    )
    X, y = 3 * torch.randn(2, 14), torch.randn(2, 1)
    H = hessinv.hessian(net, torch.nn.MSELoss(), X, y)
    lam = torch.linalg.eigvalsh(autograd_hessian(net.double(), torch.nn.MSELoss(), X.double(), y.double()))
    z = H.zero_tolerance()
    got = H.inertia(shift, tol=0)
    assert got == (int((lam < -z).sum()), int((lam.abs() <= z).sum()), int((lam > z).sum()))
    below = int(spectrum.eigenvalue_counts(H, [shift])[0])
    assert int((lam < -z).sum()) <= below <= int((lam <= z).sum())


def test_cli_spectrum_writes_json_and_plot(tmp_path, capsys):
    import json

    from hessinv.cli import main

    out = tmp_path / "spec"
    args = ["spectrum", "--samples", "120", "--batch", "16", "--depth", "2", "--width", "3", "--bins", "5"]
    assert main([*args, "--curvature", "gauss-newton", "--out", str(out)]) == 0
    rec = json.loads((out / "spectrum.json").read_text())
    assert sum(rec["counts"]) + rec["below"] + rec["above"] == rec["n_params"]
    assert rec["eigenvalues_below_zero"] == 0 and rec["logdet_sign"] == 1.0  # Gauss-Newton: PSD
    printed = capsys.readouterr().out
    assert rec["trace"] > 0 and "trace" in printed and "eigenvalues < 0" in printed  # (PSD, not zero)
    assert (out / "spectrum.png").stat().st_size > 0
    assert main([*args, "--range", "0.5,0.1", "--out", str(out)]) == 2
    assert main([*args, "--bins", "0", "--out", str(out)]) == 2


def test_modified_factorization_refuses_and_woodbury_answers():
    from hessinv.errors import InvalidArgumentError

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
    W = G.factor(0.3, method="woodbury")
    assert W.slogdet() == (1.0, pytest.approx(G.factor(0.3).logdet(), rel=1e-10))
    S = W.inverse_sqrt(torch.eye(G.shape[0], dtype=torch.float64))  # (it was refused: the Woodbury form now)
    A = G.to_dense() + 0.3 * torch.eye(G.shape[0], dtype=torch.float64)
    assert torch.allclose(A @ S @ S.T @ A, A, atol=1e-12)
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    M = H.factor(1e-3, modify="abs")
    assert any(f.pivot.modified for f in M.factors if f is not None)
    with pytest.raises(InvalidArgumentError, match="modif"):
        M.logdet()


@pytest.mark.parametrize("bins", [np.int64(5), np.int32(5), torch.tensor(5), np.array(5)])
def test_histogram_bin_count_of_any_integer_type(bins):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    H = hessinv.hessian(
        net, torch.nn.CrossEntropyLoss(), torch.randn(6, 3).double(), torch.tensor([0, 1] * 3)
    )
    want = spectrum.spectral_histogram(H, bins=5)
    got = spectrum.spectral_histogram(H, bins=bins)
    assert np.array_equal(got.edges, want.edges) and np.array_equal(got.counts, want.counts)


@pytest.mark.parametrize("bins", [5.0, True, "5"])
def test_histogram_bins_neither_a_count_nor_edges(bins):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    H = hessinv.hessian(
        net, torch.nn.CrossEntropyLoss(), torch.randn(6, 3).double(), torch.tensor([0, 1] * 3)
    )
    with pytest.raises(InvalidArgumentError, match="bins must be an int .the number of bins. or a 1-d"):
        spectrum.spectral_histogram(H, bins=bins)


def test_a_tensor_instead_of_an_operator_is_named():
    """``eigenvalue_counts(torch.eye(3), [0.0])`` raised a raw AttributeError (found by a probe)."""
    from hessinv import spectrum

    for call in (
        lambda: spectrum.eigenvalue_counts(torch.eye(3), [0.0]),
        lambda: spectrum.spectral_range(torch.eye(3)),
        lambda: spectrum.num_negative_eigenvalues(torch.eye(3)),
        lambda: spectrum.logdet(torch.eye(3)),
    ):
        with pytest.raises(hessinv.InvalidArgumentError, match="expected a curvature operator"):
            call()


def test_a_float32_gauss_newton_range_starts_at_zero():
    """A float32 Gauss-Newton matrix's null space counts partly below 0 by rounding (21 of 69 here): the
    range was (-||G||, ||G||) and the histogram spent half its bins on an empty negative half. Its
    ``lo`` is 0 as in float64, the rounding-level ones counted in ``below``."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 2, 7), torch.randint(0, 3, (12,))
    m = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(15, 3)
    )
    G = hessinv.gauss_newton(m, torch.nn.CrossEntropyLoss(), X, y)
    lo, hi = spectrum.spectral_range(G)
    assert lo == 0.0 and hi > 0
    h = spectrum.spectral_histogram(G, bins=4)
    assert int(h.counts.sum()) + h.below + h.above == G.shape[0]


def test_a_hessian_s_small_negative_eigenvalue_stays_in_range():
    """A float64 Hessian with eigenvalues (-1e-10, 1): its range must hold both (the Gauss-Newton
    matrix's rounding allowance must not hide a real negative eigenvalue of a Hessian)."""
    m = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.3], [0.2]]))
    X, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)

    def loss(o, t):
        return 0.5 * (o[:, 0] - t[:, 0]).pow(2).sum() - 0.5e-10 * o[:, 1].pow(2).sum()

    H = hessinv.hessian(m, loss, X, y)
    lo, hi = spectrum.spectral_range(H)
    assert lo < -1e-10 and hi > 1.0
    assert spectrum.spectral_histogram(H, bins=4).below == 0


@settings(max_examples=25, deadline=None)
@given(
    prob=chains(max_batch=3),
    kind=st.sampled_from(sorted(OPS)),
    block=st.integers(1, 6),
    steps=st.integers(1, 80),
)
def test_block_lanczos_basis_and_ritz_pairs_against_dense(prob, kind, block, steps):
    """The block Lanczos behind ``min_eigenvalue`` on random chains, Gauss-Newton matrices (low rank: a
    block that is partly an invariant subspace) included, and bases that run into ``n``: the basis is
    orthonormal, ``T = Q^T H Q`` (so every Ritz value is a Rayleigh quotient, never below
    ``lambda_min``), and the residuals it reports are the Ritz pairs' actual ``|H x - theta x|``."""
    op, Hd = dense(prob, kind)
    n = op.shape[0]
    theta, S, Q, res, b = op._lanczos(steps, block=block)
    k = Q.shape[1]
    assert k <= min(max(steps, block), n) and len(theta) == k
    scale = max(float(Hd.abs().max()), 1e-300)
    assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=torch.float64), atol=1e-12)
    X = Q @ torch.as_tensor(S)
    assert np.allclose(theta, torch.diag(X.T @ Hd @ X).numpy(), atol=1e-11 * scale)
    assert float(theta[0]) >= float(torch.linalg.eigvalsh(Hd)[0]) - 1e-11 * scale
    actual = (Hd @ X - X * torch.as_tensor(theta)).norm(dim=0).numpy()
    assert np.allclose(res, actual, atol=1e-9 * scale)
    assert (b == 0.0) == (not res.any()) or k == n
