"""The curvature and solver API on inputs a numerical user tries (2026-12-05, twenty-eighth session): each
test fails on the code before its fix."""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hessinv
import hessinv.spectrum as S


def _small(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    X = torch.randn(5, 3, dtype=dtype)
    y = torch.randint(0, 2, (5,))
    return m, X, y


def test_a_sparse_right_hand_side_is_the_same_numbers():
    """A sparse vector (``v.to_sparse()``) is multiplied and solved as its dense copy (a raw
    NotImplementedError from torch before)."""
    m, X, y = _small()
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    F = H.factor(0.1)
    v = torch.randn(H.shape[0], 2, dtype=torch.float64)
    v[1] = 0
    assert torch.equal(H @ v.to_sparse(), H @ v)
    assert torch.equal(F.solve(v.to_sparse()), F.solve(v))


def test_return_info_takes_a_boolean_as_refine_does():
    m, X, y = _small()
    F = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).factor(0.1)
    with pytest.raises(hessinv.InvalidArgumentError, match="return_info"):
        F.solve(torch.ones(F.op.shape[0], dtype=torch.float64), return_info="no")


def test_a_one_entry_damping_tensor_is_a_number_for_the_gauss_newton_matrix_too():
    """``G.factor(torch.tensor([0.1]))`` is ``G.factor(0.1)``, as for the Hessian (a ShapeMismatchError
    before: taken as a per-parameter damping of the wrong length)."""
    m, X, y = _small()
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    g = G.gradient
    assert torch.equal(G.factor(torch.tensor([0.1], dtype=torch.float64)).solve(g), G.factor(0.1).solve(g))


def test_a_histogram_never_has_a_negative_count(monkeypatch):
    """Bin edges closer together than a float32 operator's counts can tell apart (around its null space)
    gave counts that decrease, and bins of -9 and -49 eigenvalues, silently: the counts are made
    non-decreasing, with an AccuracyWarning. (The counts of a float32 Gauss-Newton matrix that showed it
    are exact by construction below 0 since: the rounding is imitated here, 3 eigenvalues counted in and
    out at alternate edges, on a float32 Hessian.)"""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    torch.manual_seed(0)
    X, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    nrm = H.norm_estimate()
    edges = np.linspace(-1e-7, 1e-7, 41) * nrm
    real = type(H)._count_below
    flips = {float(v): 3 * (k % 2) for k, v in enumerate(edges)}

    def rounded(self, x):  # (the count at alternate edges 3 higher: decreasing in between)
        return real(self, x) + flips.get(float(x), 0)

    monkeypatch.setattr(type(H), "_count_below", rounded)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = S.spectral_histogram(H, edges)
        N = S.eigenvalue_counts(H, edges)
    assert bool((np.diff(N) < 0).any())
    assert h.counts.min() >= 0 and h.n == H.shape[0]
    assert any(issubclass(x.category, hessinv.AccuracyWarning) for x in w)


def test_eigenpairs_that_a_cluster_hides_are_said_to_be_uncertain(monkeypatch):
    """A Gauss-Newton matrix too large for dense eigh (here: the limit lowered to 50) whose null space
    Lanczos does not resolve: eigenpairs(3, "smallest") returns two null vectors and a value 1e-2 ||G||
    above hundreds of zero eigenvalues, flagged only by certified=False before; now with an
    AccuracyWarning."""
    import hessinv.curvature as hc

    monkeypatch.setattr(hessinv.curvature.GaussNewton, "EIG_ROOT_MAX_FLOPS", 0.0)  # (the shift-invert route)
    monkeypatch.setattr(hc, "_DENSE_EIG_MAX", 50)
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 5)).double()
    torch.manual_seed(0)
    X, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 5, (6,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e = G.eigenpairs(3, "smallest")
    ev = torch.linalg.eigvalsh(G.to_dense())
    assert float((e.values - ev[:3]).abs().max()) > 1e-3 * float(ev.abs().max())  # (the case: missed)
    assert not e.certified
    assert any(issubclass(x.category, hessinv.AccuracyWarning) for x in w)


def test_a_nonsingular_system_of_2890_parameters_is_solved():
    """An SPD Gauss-Newton system G + eps I of 2890 parameters at cond 3.5e11 (cond u = 8e-5): the
    factorization said positive definite and its solve raised SingularError ("singular to working
    precision") -- the sweep, with no pivoting across stages, breaks down there and the dense LU was
    limited to n <= 2048. It answers now, with the residual a dense LU reaches."""
    torch.manual_seed(1)
    w = [20, 40, 40, 10]
    layers = []
    for i in range(3):
        layers += [nn.Linear(w[i], w[i + 1])] + ([nn.Tanh()] if i < 2 else [])
    m = nn.Sequential(*layers).double()
    torch.manual_seed(0)
    X, y = torch.randn(8, 20, dtype=torch.float64), torch.randint(0, 10, (8,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    assert G.shape[0] == 2890
    eps = 1e-12
    b = torch.randn(2890, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, info = G.factor(eps).solve(b, return_info=True)
    A = G.to_dense() + eps * torch.eye(2890, dtype=torch.float64)
    x_lu = torch.linalg.solve(A, b)
    res = lambda v: float((b - (G @ v + eps * v)).norm() / b.norm())  # noqa: E731
    assert info.residual == pytest.approx(res(x), rel=1e-6)
    assert res(x) <= 10 * res(x_lu)


@pytest.mark.parametrize("B", [8, 2000])
def test_a_shift_that_cancels_the_curvature_is_singular(B):
    """``H = I`` (a linear least-squares fit on an orthogonal, centred design) at ``eps = -1``: ``H + eps
    I`` is zero up to rounding. The pivots (8 examples: the sweep; 2000: the dense route) measured
    themselves -- rounding noise of 1e-16 -- so nothing was perturbed: ``solve`` refused, but ``slogdet``
    said (1.0, -361), ``inverse_diagonal`` 4e15 and the inertia (4, 0, 6), unflagged. Singularity is
    judged against ``|eps|`` too now: every route raises SingularError."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(B, 4, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(M - M.mean(0))
    X = Q * B**0.5
    m = nn.Sequential(nn.Linear(4, 2)).double()
    y = torch.randn(B, 2, generator=g, dtype=torch.float64)
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    # (a sum over B examples: rounding up to ~B u; 5.5e-14 at B = 2000 on an AMD EPYC)
    assert (H.to_dense() - torch.eye(10, dtype=torch.float64)).abs().max() < 1e-12
    for eps in (-1.0, -H.min_eigenvalue()):
        with pytest.raises(hessinv.SingularError):
            F = H.factor(eps)
            F.slogdet()
            F.inverse_diagonal()
    F = H.factor(-0.5)  # (nonsingular: eigenvalues 0.5)
    assert F.slogdet() == (1.0, pytest.approx(10 * np.log(0.5), rel=1e-12))


def test_eigenpairs_certify_where_a_factorization_is_affordable(monkeypatch):
    """The inertia count that certifies ARPACK's pairs costs a factorization: on wide layers 100x the
    products (a 64-256-256-10 MLP: 53 s and 9 GB against ARPACK's 0.4 s, a probe). By default it is made
    where affordable (CERTIFY_MAX_FLOPS, memory), else the pairs come back uncertified from products
    alone; ``certify=True`` always counts, ``certify=False`` never. Values against dense eigvalsh."""
    import hessinv.curvature as hc

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 30),
        torch.nn.Tanh(),
        torch.nn.Linear(30, 30),
        torch.nn.Tanh(),
        torch.nn.Linear(30, 3),
    ).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(H.to_dense())
    scale = float(ev.abs().max())
    for which, ref in (("largest", ev[-3:]), ("smallest", ev[:3])):
        certified = H.eigenpairs(3, which)  # small: affordable, counted
        assert certified.certified and certified.factorizations >= 1
        assert float((certified.values - ref).abs().max()) <= 1e-8 * scale
        for e in (H.eigenpairs(3, which, certify=False), None):
            if e is None:
                monkeypatch.setattr(hc, "CERTIFY_MAX_FLOPS", 0.0)  # as if one factorization were too dear
                e = H.eigenpairs(3, which)
                monkeypatch.undo()
            assert not e.certified and e.factorizations == 0
            assert float((e.values - ref).abs().max()) <= 1e-8 * scale
            assert float(e.residuals.max()) <= 1e-6 * scale
    monkeypatch.setattr(hc, "CERTIFY_MAX_FLOPS", 0.0)
    assert H.eigenpairs(3, "largest", certify=True).certified
    H32 = hessinv.hessian(copy.deepcopy(net).float(), torch.nn.CrossEntropyLoss(), X.float(), y)
    e32 = H32.eigenpairs(2, "largest", certify=False)
    assert not e32.certified and float((e32.values - ev[-2:]).abs().max()) <= 1e-4 * scale
    with pytest.raises(hessinv.InvalidArgumentError, match="certify"):
        H.eigenpairs(1, "largest", certify="yes")


def test_eigenpairs_by_default_falls_back_to_the_certified_route(monkeypatch):
    """Where the count is judged too dear and ARPACK on the products does not converge, the default
    (``certify=None``) takes the certified routes, as before -- a review found it raising instead;
    ``certify=False`` raises a ConvergenceError that says what to do."""
    import hessinv.curvature as hc

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 3)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(H.to_dense())
    monkeypatch.setattr(hc, "CERTIFY_MAX_FLOPS", 0.0)
    monkeypatch.setattr(hc, "LANCZOS_PRODUCTS", 1)  # ARPACK gives up
    monkeypatch.setattr(hc, "_DENSE_EIG_MAX", 64)  # (as for a large operator)
    e = H.eigenpairs(2, "smallest")
    assert e.certified and float((e.values - ev[:2]).abs().max()) <= 1e-8 * float(ev.abs().max())
    with pytest.raises(hessinv.ConvergenceError, match="certify=True"):
        H.eigenpairs(2, "smallest", certify=False)


def _honesty_problem():
    from reference import autograd_gradient_hessian

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    _, Hd = autograd_gradient_hessian(net, loss_fn, X, y)
    return hessinv.hessian(net, loss_fn, X, y), 0.5 * (Hd + Hd.T)


def _true_residual(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    """``|b - A x| / |b|`` with b and x scaled by the same exact power of two (no underflow)."""
    s = 2.0 ** round(float(torch.log2(b.abs().max())))
    return float(((b / s) - A @ (x / s)).norm() / (b / s).norm())


@pytest.mark.parametrize("refine", [True, "working"])
@pytest.mark.parametrize("scale, eps", [(1e-320, 1.0), (1e-306, 1e12)])
def test_a_solution_below_the_smallest_normal_number_reports_its_own_residual(refine, scale, eps):
    """A right-hand side of 1e-320 (or a solution of 1e-318): the returned x is subnormal, with a few digits,
    and the solve reported the unit-scaled iterate's residual (1e-16) against a true 1.6e-4 (a probe). Now
    the residual of x as returned, with an AccuracyWarning; a normal-range solve pays nothing for it."""
    H, Hd = _honesty_problem()
    n = Hd.shape[0]
    A = Hd + eps * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
    F = H.factor(eps)
    with pytest.warns(hessinv.AccuracyWarning, match="smallest normal number"):
        x, info = F.solve(b, refine=refine, return_info=True)
    true = _true_residual(A, b, x)
    assert true > 1e-9  # (the case: digits lost)
    assert info.residual == pytest.approx(true, rel=1e-3) and info.returned_residual == info.residual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = F.solve(b / scale, refine=refine, return_info=True)
    assert info.residual <= 1e-13 and _true_residual(A, b / scale, x) <= 1e-13


def test_minres_reports_the_residual_of_a_subnormal_solution(monkeypatch):
    """The MINRES route of H.solve(..., rtol=...) measured its residual before scaling x back: 1.35e-7
    reported against a true 1.3e-4 for a right-hand side of 1e-320 (a probe)."""
    monkeypatch.setattr(hessinv.curvature, "KRYLOV_RTOL_SHARE", 1e9)  # (MINRES, however cheap factoring is)
    H, Hd = _honesty_problem()
    n = Hd.shape[0]
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-320
    with pytest.warns(hessinv.AccuracyWarning, match="smallest normal number"):
        x, info = H.solve(b, 1.0, rtol=1e-6, return_info=True)
    assert info.krylov_iterations > 0
    true = _true_residual(Hd + torch.eye(n, dtype=torch.float64), b, x)
    assert info.residual == pytest.approx(true, rel=1e-3)


def test_refine_working_refuses_a_solution_beyond_the_range_and_measures_the_2_norm():
    """refine='working' returned inf entries with a residual of 1.6e-15 for a right-hand side of 1e308
    at damping 0.1 (refine=True raised NonFiniteError), and measured its residual in the max norm, not the
    2-norm SolveInfo defines (4-10x below it on wider models): both found by a probe."""
    H, Hd = _honesty_problem()
    n = Hd.shape[0]
    b = torch.full((n,), 1e308, dtype=torch.float64)
    for refine in (True, "working", False):
        with pytest.raises(hessinv.NonFiniteError, match="overflowed"):
            H.factor(0.1).solve(b, refine=refine)
    torch.manual_seed(1)
    w = 24
    net = nn.Sequential(nn.Linear(10, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 5)).double()
    X, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 5, (32,))
    H2 = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    E = torch.eye(H2.shape[0], 4, dtype=torch.float64)
    x, info = H2.factor(0.01).solve(E, refine="working", max_refine=0, return_info=True)
    R = E - H2 @ x - 0.01 * x
    assert info.residual == pytest.approx(float((R.norm(dim=0) / E.norm(dim=0)).max()), rel=1e-6)


def test_a_float32_modify_abs_factorization_that_modified_nothing_takes_the_twins_logdet():
    """factor(eps, modify='abs') of a float32 model at a positive definite H + eps I modifies no pivot (M =
    H + eps I, so logdet is allowed), but summed its float32 pivots: 3.5e-2 off where factor(eps).logdet()
    took the float64 twin's, 4e-12 (a probe)."""
    import copy

    from reference import autograd_gradient_hessian

    torch.manual_seed(3)
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.Tanh()]
    for _ in range(8):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(6, 3))
    for p in net.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=2.0 / p.shape[1] ** 0.5)
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    _, Hd = autograd_gradient_hessian(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), X.double(), y)
    Hd = 0.5 * (Hd + Hd.T)
    eps = -1.0001 * float(torch.linalg.eigvalsh(Hd)[0])
    ref = float(torch.linalg.slogdet(Hd + eps * torch.eye(Hd.shape[0], dtype=torch.float64))[1])
    F = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).factor(eps, modify="abs")
    assert F.positive_definite
    assert F.logdet() == pytest.approx(ref, abs=1e-8)


def test_inverse_quadratic_of_an_indefinite_matrix_is_refined():
    """v^T (H + eps I)^-1 v from the unrefined sweep sum k^T D^-1 k: on indefinite H + eps I its terms of
    both signs cancel, 2.7e-7 off at cond 1e3 (10^3-10^5 x u cond, a fuzzer's find); the refined solve's
    value is backward stable."""
    from reference import autograd_gradient_hessian

    worst = 0.0
    for seed in range(40):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).double()
        X, y = torch.randn(1, 1, dtype=torch.float64), torch.randn(1, 1, dtype=torch.float64)
        _, D = autograd_gradient_hessian(model, nn.MSELoss(), X, y)
        eps = 1e-3 * float(torch.linalg.eigvalsh(D).abs().max())
        A = D + eps * torch.eye(4, dtype=torch.float64)
        cond = float(torch.linalg.cond(A))
        if cond > 1e4:
            continue
        v = torch.randn(4, dtype=torch.float64)
        q = hessinv.hessian(model, nn.MSELoss(), X, y).factor(eps).inverse_quadratic(v)
        ref = float(v @ torch.linalg.solve(A, v))
        worst = max(worst, abs(q - ref) / abs(ref) / (cond * 2.2e-16))
    assert worst < 100


def test_inverse_diagonals_check_takes_a_bounded_sample_of_entries(monkeypatch):
    """The check of the selected inversion solved 4 columns per stage (and refined them): 4L columns of
    O(L) solves each, quadratic in depth -- 9.1 s at depth 128 against a 0.35 s factorization (a probe).
    A sample of at most INVERSE_DIAGONAL_MAX_PROBES entries now; the diagonal still that of the inverse."""
    from hessinv import curvature as cv

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(3, 4), nn.Tanh()]
    for _ in range(30):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    m = nn.Sequential(*layers, nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    seen = []
    real = cv._identity_columns

    def spy(n, idx, *args):
        seen.append(len(idx))
        return real(n, idx, *args)

    monkeypatch.setattr(cv, "_identity_columns", spy)
    d = H.factor(1.0).inverse_diagonal()
    assert seen and max(seen) <= cv.INVERSE_DIAGONAL_MAX_PROBES
    ref = torch.linalg.inv(H.to_dense() + torch.eye(H.shape[0], dtype=torch.float64)).diagonal()
    assert torch.allclose(d, ref, rtol=1e-9, atol=0)


def test_a_singular_deep_chains_refusal_names_a_few_stages_and_a_count():
    """A singular ``H`` (eps = 0) of a deep width-2 chain perturbs pivots at dozens of stages: the refusal
    listed every one (5 KB at depth 200, the advice at its end; a probe); it names the first three, the
    last and how many more, and still ends with what to do."""
    torch.manual_seed(0)
    layers: list = [torch.nn.Linear(2, 2)]
    for _ in range(31):
        layers += [torch.nn.Tanh(), torch.nn.Linear(2, 2)]
    m = torch.nn.Sequential(*layers).double()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    H = hessinv.hessian(m, torch.nn.MSELoss(), X, y)
    with pytest.raises(hessinv.SingularError) as e:
        H.factor(0.0).solve(torch.ones(H.shape[0], dtype=torch.float64))
    msg = str(e.value)
    assert re.search(r"\.\.\. \d+ more \(\d+ eigenvalues in all\) \.\.\.", msg), msg
    assert len(msg) < 1000 and "Choose another damping" in msg


def test_inertia_with_a_tol_beyond_the_float32_range_counts_every_eigenvalue_as_zero():
    """``inertia(shift, tol)`` with ``shift + tol`` past float32's range (tol = 1e60) swept at it: a pivot
    overflowed and the user got a NonFiniteError naming a Riccati pivot, as if the model were broken.
    Every eigenvalue lies within the interval: all count as zero, as in float64 (a probe)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    X, Y = torch.randn(4, 4), torch.randn(4, 4)
    for dtype in (torch.float32, torch.float64):
        H = hessinv.hessian(net.to(dtype), nn.MSELoss(), X.to(dtype), Y.to(dtype))
        for tol in (1e30, 1e60, 1e300):
            assert tuple(H.inertia(0.0, tol)) == (0, 32, 0)
        assert sum(H.inertia(0.0, 1e-30)) == 32  # (a real count still: nothing forced)
    # eigenvalues beyond the sweep's range (float32: 1.8e15) are counted too -- clamping shift + tol to it
    # had counted six eigenvalues of 2e16-4e16 as positive at tol = 1e17 (a review)
    m = nn.Linear(3, 2)
    X, Y = 2e8 * torch.randn(16, 3), torch.randn(16, 2)
    H = hessinv.hessian(m, nn.MSELoss(), X, Y)
    lam = torch.linalg.eigvalsh(H.to_dense().double())
    assert float(lam.max()) > 1e16
    assert tuple(H.inertia(0.0, 1e17)) == (0, 8, 0)


def test_sample_of_a_modified_factorization_is_refused_under_its_own_name():
    """``F.sample()`` on a ``modify="abs"`` factorization whose pivots were modified was refused as
    "inverse_sqrt: ..." -- a method the caller never called (a probe)."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False)).double()
    X, Y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    F = hessinv.hessian(m, nn.MSELoss(), X, Y).factor(1e-3, modify="abs")
    assert F._pivots_modified
    with pytest.raises(hessinv.InvalidArgumentError, match=r"^sample: .*modify='abs'.*factor without modify"):
        F.sample(2)


def test_products_and_solves_are_differentiable_in_the_right_hand_side():
    # (a probe: a right-hand side that requires grad was detached silently -- the gradient through
    # G @ w, F.solve(w), G.solve(w) and inverse_hvp(w) was missing, 8-96% of it, with no word;
    # torch.linalg.solve is differentiable in b)
    from hessinv.influence import InfluenceFunction

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    G = hessinv.gauss_newton(net, loss_fn, X, y)
    n = G.shape[0]
    A = G.to_dense() + 0.1 * torch.eye(n, dtype=torch.float64)
    a = torch.randn(n, 2, dtype=torch.float64)
    F = G.factor(0.1)
    infl = InfluenceFunction(net, loss_fn, curvature="gauss_newton", damping=0.1).fit(X, y)
    maps = {
        "G @ w": (lambda w: G @ w, A - 0.1 * torch.eye(n, dtype=torch.float64)),
        "w @ G": (lambda w: (w.T @ G).T, A - 0.1 * torch.eye(n, dtype=torch.float64)),
        "F.solve": (F.solve, torch.linalg.inv(A)),
        "F.solve, return_info": (lambda w: F.solve(w, return_info=True)[0], torch.linalg.inv(A)),
        "G.solve": (lambda w: G.solve(w, damping=0.1), torch.linalg.inv(A)),
        "inverse_hvp": (lambda w: infl.inverse_hvp(w.T).T, torch.linalg.inv(A)),
    }
    for name, (f, M) in maps.items():
        w = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
        out = f(w)
        assert torch.allclose(out, M @ w.detach(), rtol=1e-9, atol=1e-9), name
        ((out * a).sum() + (w * w).sum()).backward()
        assert torch.allclose(w.grad, M @ a + 2 * w.detach(), rtol=1e-9, atol=1e-9), name
    x, info = F.solve(a[:, 0].clone().requires_grad_(), return_info=True)
    x.sum().backward()
    assert F.last_info is info  # (the backward pass's solve leaves the forward's info)
    with torch.no_grad():  # (and no graph where grad mode is off)
        assert not F.solve(a[:, 0].clone().requires_grad_()).requires_grad
