"""Models whose forward uses their parameters in another order than ``model.parameters()`` lists them: every
public vector and matrix of the operators, factorizations, Laplace, influence, spectrum and diagnostics is in
``model.parameters()`` (``parameters_to_vector``) order.

Three such models (a parameter of the model itself listed first and used last, with a head registered
before the body; a ViT-like position vector listed first and added after the first Linear; a nested
submodule registered after the head whose own children are registered out of order), each checked in
float64 against

* plain-autograd dense references over the flat parameters in ``model.parameters()`` order
  (``tests/reference.py``), and
* its *ordered twin*: the same network with its submodules registered in the order forward uses them, the
  same weights copied; ``idx`` (built from the parameters' identities) takes a twin vector to the model's
  order, ``out_model == out_twin[idx]``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    autograd_gauss_newton,
    autograd_gradient_hessian,
    autograd_output_jacobian,
    autograd_per_example_gradients,
    flat_loss_fn,
)
from torch import Tensor, nn

import hessinv
import hessinv.curvature
from hessinv import diagnostics, spectrum
from hessinv.curvature import MixedFactorization, WoodburyFactorization
from hessinv.influence import InfluenceFunction, influence_scores, output_jacobians, per_example_gradients
from hessinv.laplace import Laplace

DT = torch.float64
KINDS = ["head_first", "vit", "nested"]
N_TRAIN, N_TEST, D_IN, WIDTH, C = 12, 4, 6, 8, 3


# -- the models and their ordered twins ------------------------------------------------------------
class HeadFirst(nn.Module):
    """Its own parameter ``t`` is listed first and used last; ``head`` is registered before ``body``."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(WIDTH, C)
        self.body = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) * self.t


class ViTLike(nn.Module):
    """A position vector listed first, added after the first Linear."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(WIDTH))
        self.inp = nn.Linear(D_IN, WIDTH)
        self.out = nn.Linear(WIDTH, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x) + self.pos
        return self.out(torch.tanh(h))


class Block(nn.Module):
    """Its children registered in the reverse order of their use."""

    def __init__(self):
        super().__init__()
        self.second = nn.Linear(WIDTH, WIDTH)
        self.first = nn.Linear(D_IN, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


class Nested(nn.Module):
    """The head registered before a nested block whose own children are out of order."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(WIDTH, C)
        self.enc = Block()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.enc(x)))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.t


class AddPos(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos


def _models(kind: str) -> tuple[nn.Module, nn.Module, list[tuple[nn.Parameter, nn.Parameter]], nn.Parameter]:
    """``(model, twin, [(model's parameter, twin's parameter), ...], the first Linear's bias)``, the twin's
    weights copied."""
    torch.manual_seed({"head_first": 1, "vit": 2, "nested": 3}[kind])
    if kind == "head_first":
        m = HeadFirst().double()
        tw = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, C), Scale()).double()
        pairs = [(m.body[0].weight, tw[0].weight), (m.body[0].bias, tw[0].bias),
                 (m.head.weight, tw[2].weight), (m.head.bias, tw[2].bias), (m.t, tw[3].t)]  # fmt: skip
    elif kind == "vit":
        m = ViTLike().double()
        tw = nn.Sequential(nn.Linear(D_IN, WIDTH), AddPos(), nn.Tanh(), nn.Linear(WIDTH, C)).double()
        pairs = [(m.inp.weight, tw[0].weight), (m.inp.bias, tw[0].bias), (m.pos, tw[1].pos),
                 (m.out.weight, tw[3].weight), (m.out.bias, tw[3].bias)]  # fmt: skip
    else:
        m = Nested().double()
        tw = nn.Sequential(
            nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, C)
        ).double()
        pairs = [(m.enc.first.weight, tw[0].weight), (m.enc.first.bias, tw[0].bias),
                 (m.enc.second.weight, tw[2].weight), (m.enc.second.bias, tw[2].bias),
                 (m.out.weight, tw[4].weight), (m.out.bias, tw[4].bias)]  # fmt: skip
    with torch.no_grad():
        for p, q in pairs:
            p.mul_(1.5)  # (more curvature than the default init: an indefinite Hessian)
            q.copy_(p)
    return m, tw, pairs, pairs[1][0]


def _index(model: nn.Module, twin: nn.Module, pairs) -> Tensor:
    """``idx`` with ``v_model = v_twin[idx]`` for flat vectors in each one's ``parameters()`` order."""
    start, at = {}, 0
    for q in twin.parameters():
        start[id(q)], at = at, at + q.numel()
    twin_of = {id(p): q for p, q in pairs}
    assert len(twin_of) == len(list(model.parameters())) == len(list(twin.parameters()))
    parts = []
    for p in model.parameters():
        q = twin_of[id(p)]
        assert q.shape == p.shape
        parts.append(torch.arange(start[id(q)], start[id(q)] + q.numel()))
    return torch.cat(parts)


@dataclass
class Case:
    kind: str
    model: nn.Module
    twin: nn.Module
    idx: Tensor  # v_model = v_twin[idx]
    first_bias: nn.Parameter  # the model's first Linear's bias
    X: Tensor
    y: Tensor  # class indices
    y_reg: Tensor  # regression targets (N, C)
    Xte: Tensor
    yte: Tensor
    g: Tensor  # dense references, model.parameters() order (mean cross-entropy on (X, y))
    H: Tensor
    G: Tensor

    @property
    def n(self) -> int:
        return self.H.shape[0]

    def dense(self, curvature: str) -> Tensor:
        return self.H if curvature == "hessian" else self.G

    def to_model(self, v: Tensor, dim: int = 0) -> Tensor:
        """A twin-ordered tensor's parameter axis ``dim`` in the model's order."""
        return v.index_select(dim, self.idx)

    def to_twin(self, v: Tensor, dim: int = 0) -> Tensor:
        return v.index_select(dim, torch.argsort(self.idx))


@cache
def _case(kind: str) -> Case:
    model, twin, pairs, first_bias = _models(kind)
    idx = _index(model, twin, pairs)
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(N_TRAIN, D_IN, generator=gen, dtype=DT)
    y = torch.randint(0, C, (N_TRAIN,), generator=gen)
    y_reg = torch.randn(N_TRAIN, C, generator=gen, dtype=DT)
    Xte = torch.randn(N_TEST, D_IN, generator=gen, dtype=DT)
    yte = torch.randint(0, C, (N_TEST,), generator=gen)
    ce = nn.CrossEntropyLoss()
    g, H = autograd_gradient_hessian(model, ce, X, y)
    G = autograd_gauss_newton(model, ce, X, y)
    return Case(
        kind, model, twin, idx, first_bias, X, y, y_reg, Xte, yte, g, 0.5 * (H + H.T), 0.5 * (G + G.T)
    )


@pytest.fixture(params=KINDS)
def case(request) -> Case:
    return _case(request.param)


def _op(curvature: str, model: nn.Module, c: Case):
    make = hessinv.hessian if curvature == "hessian" else hessinv.gauss_newton
    return make(model, nn.CrossEntropyLoss(), c.X, c.y)


def close(a, b, rtol: float = 1e-8, what: str = "") -> None:
    """``max |a - b| <= rtol max |b|`` (normwise: entries near 0 are compared at the whole's scale)."""
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    err = float((a - b).abs().max()) / scale if b.numel() else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def _eye(n: int) -> Tensor:
    return torch.eye(n, dtype=DT)


def _rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _pd_damping(A: Tensor) -> float:
    """A damping that makes ``A + d I`` positive definite with condition number about 50."""
    lam = torch.linalg.eigvalsh(A)
    return max(0.0, -float(lam[0])) + 0.02 * float(lam.abs().max())


def _gap_points(lam: Tensor, m: int) -> list[float]:
    """``m`` points in the ``m`` widest gaps between consecutive eigenvalues ``lam`` (ascending)."""
    gaps = lam[1:] - lam[:-1]
    top = torch.topk(gaps, m).indices.sort().values
    return [float(0.5 * (lam[k] + lam[k + 1])) for k in top]


def _whitening_error(samples: Tensor, A: Tensor) -> float:
    """``max |L^T X X^T L / k - I|`` for samples X (n, k) of ``N(0, A^{-1})``, ``A = L L^T``."""
    L = torch.linalg.cholesky(A)
    W = L.T @ samples
    return float((W @ W.T / samples.shape[1] - _eye(A.shape[0])).abs().max())


# -- the harness itself --------------------------------------------------------------------------
def test_references_and_twin_agree(case):
    """The permutation is not the identity, the twin computes the same function, and the dense references
    of the model are the twin's permuted."""
    c = case
    assert not torch.equal(c.idx, torch.arange(c.n))
    assert torch.allclose(c.model(c.X), c.twin(c.X), rtol=1e-13, atol=1e-13)
    ce = nn.CrossEntropyLoss()
    gt, Ht = autograd_gradient_hessian(c.twin, ce, c.X, c.y)
    close(c.g, c.to_model(gt), 1e-12, "gradient")
    close(c.H, c.to_model(c.to_model(Ht, 0), 1), 1e-12, "Hessian")
    close(c.G, c.to_model(c.to_model(autograd_gauss_newton(c.twin, ce, c.X, c.y), 0), 1), 1e-12, "G")
    # flat_loss_fn's loss is over the same flat vector: its gradient is the reference gradient
    x0, loss, _ = flat_loss_fn(c.model, ce, c.X, c.y)
    x = x0.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(loss(x), x)
    close(gx, c.g, 1e-12, "flat_loss_fn gradient")
    close(x0, torch.nn.utils.parameters_to_vector(c.model.parameters()).detach(), 0.0, "flat vector")
    # and the Hessian is not invariant under the permutation (the tests below can tell the orders apart)
    assert float((c.H - c.H[c.idx][:, c.idx]).abs().max()) > 1e-3 * float(c.H.abs().max())


# -- products -------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_products_dense_diagonal_trace(case, curvature):
    c = case
    A = c.dense(curvature)
    op, tw = _op(curvature, c.model, c), _op(curvature, c.twin, c)
    n = c.n
    assert op.shape == (n, n)
    v, V, K = _rand(n, seed=1), _rand(n, 4, seed=2), _rand(3, n, seed=3)
    close(op @ v, A @ v, 1e-10, "H @ v")
    close(op @ V, A @ V, 1e-10, "H @ V")
    close(op.matmul(V), A @ V, 1e-10, "H.matmul(V)")
    close(K @ op, K @ A, 1e-10, "K @ H (rmatmul)")
    close(v @ op, A @ v, 1e-10, "v @ H")
    close(op.to_dense(), A, 1e-10, "to_dense")
    close(op.diagonal(), A.diagonal(), 1e-10, "diagonal")
    assert op.trace() == pytest.approx(float(A.trace()), rel=1e-10, abs=1e-12 * float(A.abs().max()))
    lin = op.as_linear_operator()
    close(torch.as_tensor(lin.matvec(v.numpy())), A @ v, 1e-10, "LinearOperator.matvec")
    close(torch.as_tensor(lin.matmat(V.numpy())), A @ V, 1e-10, "LinearOperator.matmat")
    close(torch.as_tensor(lin.rmatvec(v.numpy())), A @ v, 1e-10, "LinearOperator.rmatvec")
    close(op.gradient, c.g, 1e-12, "gradient")
    assert float(op.loss) == pytest.approx(float(nn.CrossEntropyLoss()(c.model(c.X), c.y)), rel=1e-13)
    # against the ordered twin: the same numbers, permuted
    close(op @ v, c.to_model(tw @ c.to_twin(v)), 1e-12, "twin H @ v")
    close(op.to_dense(), c.to_model(c.to_model(tw.to_dense(), 0), 1), 1e-12, "twin to_dense")
    close(op.diagonal(), c.to_model(tw.diagonal()), 1e-12, "twin diagonal")
    close(op.gradient, c.to_model(tw.gradient), 1e-12, "twin gradient")


# -- spectra --------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_eigenpairs_min_eigenvalue_inertia(case, curvature, monkeypatch):
    c = case
    A = c.dense(curvature)
    lam = torch.linalg.eigvalsh(A)
    norm = float(lam.abs().max())
    op = _op(curvature, c.model, c)
    whiches = ["smallest", "largest"] if curvature == "hessian" else ["largest"]
    for which in whiches:
        ep = op.eigenpairs(k=3, which=which)
        ref = lam[:3] if which == "smallest" else lam[-3:]
        close(ep.values, ref, 1e-8, f"eigenpairs({which}) values")
        Vv = ep.vectors
        assert Vv.shape == (c.n, 3)
        # each vector an eigenvector of the dense matrix in parameters() order (up to sign/rotation)
        res = (A @ Vv - Vv * ep.values).norm(dim=0)
        assert float(res.max()) <= 1e-6 * norm, f"eigenpairs({which}) residuals {res.tolist()}"
        close(Vv.T @ A @ Vv, torch.diag(ep.values), 1e-6, f"eigenpairs({which}) Rayleigh quotients")
    if curvature == "gauss_newton":  # also by shift-invert Lanczos through the sweep, not from the root
        monkeypatch.setattr(hessinv.curvature.GaussNewton, "EIG_ROOT_MAX_FLOPS", 0.0)
        op2 = _op(curvature, c.model, c)
        ep = op2.eigenpairs(k=2, which="largest")
        close(ep.values, lam[-2:], 1e-8, "G eigenpairs by the sweep")
        res = (A @ ep.vectors - ep.vectors * ep.values).norm(dim=0)
        assert float(res.max()) <= 1e-6 * norm
    lmin = op.min_eigenvalue(tol=1e-10)
    assert abs(lmin - float(lam[0])) <= 1e-8 * norm
    for s in _gap_points(lam, 3):
        inertia = op.inertia(-s)  # eigenvalues of H - s I
        below = int((lam < s).sum())
        assert tuple(inertia) == (below, 0, c.n - below), (s, tuple(inertia))


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_spectrum_functions(case, curvature):
    c = case
    A = c.dense(curvature)
    lam = torch.linalg.eigvalsh(A)
    op = _op(curvature, c.model, c)
    shifts = _gap_points(lam, 4)
    counts = spectrum.eigenvalue_counts(op, shifts)
    assert counts.tolist() == [int((lam < s).sum()) for s in shifts]
    hist = spectrum.spectral_histogram(op, bins=shifts)
    N = [int((lam < s).sum()) for s in shifts]
    assert hist.counts.tolist() == list(np.diff(N)) and hist.below == N[0] and hist.above == c.n - N[-1]
    tol = math.sqrt(torch.finfo(DT).eps) * float(lam.abs().max())
    lo, hi = spectrum.spectral_range(op)  # (G's lo is 0: its null space is -1e-16 in the dense eigvalsh)
    assert lo <= float(lam[0]) + tol and float(lam[-1]) < hi
    assert spectrum.num_negative_eigenvalues(op) == int((lam < -tol).sum())
    d = _pd_damping(A) if curvature == "gauss_newton" else 0.37 * float(lam.abs().max())
    sign, logabs = spectrum.logdet(op, d)
    ref_sign, ref_log = torch.linalg.slogdet(A + d * _eye(c.n))
    assert sign == float(ref_sign) and logabs == pytest.approx(float(ref_log), rel=1e-10, abs=1e-10)


# -- solves and factorizations ----------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_operator_solve(case, curvature):
    c = case
    A = c.dense(curvature)
    d = _pd_damping(A)
    op, tw = _op(curvature, c.model, c), _op(curvature, c.twin, c)
    Ad = A + d * _eye(c.n)
    b, B = _rand(c.n, seed=4), _rand(c.n, 3, seed=5)
    close(op.solve(b, damping=d), torch.linalg.solve(Ad, b), 1e-9, "solve(b)")
    x, info = op.solve(B, damping=d, return_info=True)
    close(x, torch.linalg.solve(Ad, B), 1e-9, "solve(B)")
    assert info.residual <= 1e-10
    x = op.solve(b, damping=d, rtol=1e-10)  # MINRES on the products first
    assert float((Ad @ x - b).norm() / b.norm()) <= 1e-9
    close(op.solve(op.gradient, damping=d), torch.linalg.solve(Ad, c.g), 1e-9, "solve(gradient)")
    close(op.solve(b, damping=d), c.to_model(tw.solve(c.to_twin(b), damping=d)), 1e-10, "twin solve")
    if curvature == "hessian":  # an indefinite H + eps I, eps in a gap of the spectrum
        lam = torch.linalg.eigvalsh(A)
        eps = -_gap_points(lam[lam.numel() // 4 : 3 * lam.numel() // 4], 1)[0]
        Ae = A + eps * _eye(c.n)
        x = op.solve(b, damping=eps)
        assert float((Ae @ x - b).norm() / b.norm()) <= 1e-10
        close(x, torch.linalg.solve(Ae, b), 1e-7, "indefinite solve")


@pytest.mark.parametrize("route", ["sweep", "dense", "mixed"])
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_factorization(case, curvature, route, monkeypatch):
    """``F = op.factor(eps)`` by the Riccati sweep over the stages, by the dense route (``H`` formed whole),
    and by the mixed-precision sweep: every vector in ``model.parameters()`` order."""
    c = case
    if route == "dense":
        monkeypatch.setattr(hessinv.curvature, "_dense_route", lambda *a, **k: True)
    A = c.dense(curvature)
    d = _pd_damping(A)
    Ad = A + d * _eye(c.n)
    Ainv = torch.linalg.inv(Ad)
    op, tw = _op(curvature, c.model, c), _op(curvature, c.twin, c)
    kw: dict = {"precision": "mixed"} if route == "mixed" else {}
    if curvature == "gauss_newton":
        kw["method"] = "riccati"  # (auto would take the Woodbury form here: test_woodbury)
    F, Ft = op.factor(d, **kw), tw.factor(d, **kw)
    if route == "mixed":
        assert isinstance(F, MixedFactorization)
    else:
        assert type(F) is hessinv.Factorization
    assert F.positive_definite and tuple(F.inertia) == (0, 0, c.n)
    b, B = _rand(c.n, seed=6), _rand(c.n, 4, seed=7)
    close(F.solve(b), Ainv @ b, 1e-9, "F.solve(b)")
    close(F.solve(B), Ainv @ B, 1e-9, "F.solve(B)")
    close(F.solve(b), c.to_model(Ft.solve(c.to_twin(b))), 1e-10, "twin F.solve")
    close(F.inverse_diagonal(), Ainv.diagonal(), 1e-7, "inverse_diagonal")
    close(F.inverse_diagonal(), c.to_model(Ft.inverse_diagonal()), 1e-7, "twin inverse_diagonal")
    assert F.inverse_quadratic(b) == pytest.approx(float(b @ Ainv @ b), rel=1e-9)
    assert F.inverse_quadratic(b) == pytest.approx(Ft.inverse_quadratic(c.to_twin(b)), rel=1e-9)
    # the square root: S S^T = (H + eps I)^-1, and S Z linear in Z
    S = F.inverse_sqrt(_eye(c.n))
    close(S @ S.T, Ainv, 1e-9, "inverse_sqrt: S S^T")
    Z = _rand(c.n, 3, seed=8)
    close(F.inverse_sqrt(Z), S @ Z, 1e-10, "inverse_sqrt(Z)")
    close(F.inverse_sqrt(Z[:, 0]), S @ Z[:, 0], 1e-10, "inverse_sqrt(z)")
    # samples of N(0, (H + eps I)^-1): whitened by the precision's Cholesky factor they are white
    k = 6000
    Xs = F.sample(k, generator=torch.Generator().manual_seed(0))
    assert Xs.shape == (c.n, k)
    assert _whitening_error(Xs, Ad) < 0.15
    # (the check tells the orders apart: the twin's samples, not permuted, are not white here)
    assert _whitening_error(Ft.sample(k, generator=torch.Generator().manual_seed(0)), Ad) > 0.3
    ref_sign, ref_log = torch.linalg.slogdet(Ad)
    assert F.logdet() == pytest.approx(float(ref_log), rel=1e-10, abs=1e-10)
    sign, logabs = F.slogdet()
    assert sign == float(ref_sign) == 1.0 and logabs == pytest.approx(float(ref_log), rel=1e-10, abs=1e-10)


def test_indefinite_factorization_and_if_positive_definite(case):
    c = case
    lam = torch.linalg.eigvalsh(c.H)
    eps = -_gap_points(lam[lam.numel() // 4 : 3 * lam.numel() // 4], 1)[0]
    Ae = c.H + eps * _eye(c.n)
    op = _op("hessian", c.model, c)
    F = op.factor(eps)
    below = int((lam + eps < 0).sum())
    assert tuple(F.inertia) == (below, 0, c.n - below) and not F.positive_definite
    b = _rand(c.n, seed=9)
    x = F.solve(b)
    assert float((Ae @ x - b).norm() / b.norm()) <= 1e-10
    sign, logabs = F.slogdet()
    ref_sign, ref_log = torch.linalg.slogdet(Ae)
    assert sign == float(ref_sign) and logabs == pytest.approx(float(ref_log), rel=1e-9, abs=1e-9)
    assert op.factor_if_positive_definite(eps) is None
    d = _pd_damping(c.H)
    Fp = op.factor_if_positive_definite(d)
    assert Fp is not None and op.is_positive_definite(d)
    close(Fp.solve(b), torch.linalg.solve(c.H + d * _eye(c.n), b), 1e-9, "factor_if_positive_definite")


# -- Gauss-Newton: its root and the Woodbury factorization -----------------------------------------
def _damping_vector(c: Case, scale: float) -> Tensor:
    """A per-parameter damping (model.parameters() order) that varies over [0.1, 2] x scale, one value per
    parameter tensor and a ramp inside each: no permutation of the parameters leaves it as it is."""
    parts = []
    for j, p in enumerate(c.model.parameters()):
        parts.append(torch.linspace(0.1 + 0.3 * j, 0.2 + 0.3 * j, p.numel(), dtype=DT))
    return scale * torch.cat(parts)


def test_gauss_newton_root(case):
    c = case
    G, Gt = _op("gauss_newton", c.model, c), _op("gauss_newton", c.twin, c)
    U, S = G.root()
    assert U.shape[1] == c.n
    close(U.T @ (S[:, None] * U), c.G, 1e-10, "U^T S U")
    Ut, St = Gt.root()
    close(c.to_model(Ut.T @ (St[:, None] * Ut), 0).index_select(1, c.idx), U.T @ (S[:, None] * U), 1e-10)


@pytest.mark.parametrize("damping", ["scalar", "vector", "vector_with_zeros"])
def test_woodbury(case, damping):
    c = case
    lam_max = float(torch.linalg.eigvalsh(c.G)[-1])
    if damping == "scalar":
        D = 0.05 * lam_max
        Dm = D * _eye(c.n)
    else:
        D = _damping_vector(c, 0.05 * lam_max)
        if damping == "vector_with_zeros":  # the first Linear's bias undamped (factored apart, exactly)
            at = 0
            for p in c.model.parameters():
                if p is c.first_bias:
                    D[at : at + p.numel()] = 0.0
                at += p.numel()
        Dm = torch.diag(D)
    A = c.G + Dm
    Ainv = torch.linalg.inv(A)
    G, Gt = _op("gauss_newton", c.model, c), _op("gauss_newton", c.twin, c)
    F = G.factor(D, method="woodbury") if damping == "scalar" else G.factor(D)
    Dt = D if damping == "scalar" else c.to_twin(D)
    Ft = Gt.factor(Dt, method="woodbury") if damping == "scalar" else Gt.factor(Dt)
    assert isinstance(F, WoodburyFactorization)
    b, B = _rand(c.n, seed=10), _rand(c.n, 3, seed=11)
    close(F.solve(b), Ainv @ b, 1e-9, "Woodbury solve(b)")
    close(F.solve(B), Ainv @ B, 1e-9, "Woodbury solve(B)")
    close(F.solve(b), c.to_model(Ft.solve(c.to_twin(b))), 1e-10, "twin Woodbury solve")
    close(G.solve(b, damping=D), Ainv @ b, 1e-9, "G.solve(b, damping=D)")
    close(F.inverse_diagonal(), Ainv.diagonal(), 1e-7, "Woodbury inverse_diagonal")
    assert F.inverse_quadratic(b) == pytest.approx(float(b @ Ainv @ b), rel=1e-9)
    S = F.inverse_sqrt(_eye(c.n))
    close(S @ S.T, Ainv, 1e-8, "Woodbury inverse_sqrt: S S^T")
    Z = _rand(c.n, 2, seed=12)
    close(F.inverse_sqrt(Z), S @ Z, 1e-9, "Woodbury inverse_sqrt(Z)")
    k = 6000
    Xs = F.sample(k, generator=torch.Generator().manual_seed(1))
    assert Xs.shape == (c.n, k) and _whitening_error(Xs, A) < 0.15
    assert _whitening_error(Ft.sample(k, generator=torch.Generator().manual_seed(1)), A) > 0.3
    sign, logabs = F.slogdet()
    ref_sign, ref_log = torch.linalg.slogdet(A)
    assert sign == float(ref_sign) == 1.0
    assert logabs == pytest.approx(float(ref_log), rel=1e-9) and F.logdet() == pytest.approx(logabs)
    assert tuple(F.inertia) == (0, 0, c.n) and F.positive_definite


def test_auto_factor_of_a_small_curvature_batch(case):
    """``G.factor(eps)`` by whatever route it picks for a small batch (the Woodbury form where cheaper)."""
    c = case
    d = 0.05 * float(torch.linalg.eigvalsh(c.G)[-1])
    F = _op("gauss_newton", c.model, c).factor(d)
    Ainv = torch.linalg.inv(c.G + d * _eye(c.n))
    b = _rand(c.n, seed=13)
    close(F.solve(b), Ainv @ b, 1e-9, f"{type(F).__name__}.solve")
    close(F.inverse_diagonal(), Ainv.diagonal(), 1e-7, f"{type(F).__name__}.inverse_diagonal")


# -- Laplace ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_laplace(case, likelihood):
    c = case
    delta, sigma = 0.7, 0.8
    y = c.y if likelihood == "classification" else c.y_reg
    lf = (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else nn.MSELoss(reduction="sum")
    )
    scale = 1.0 if likelihood == "classification" else 0.5 / sigma**2
    kw = {} if likelihood == "classification" else {"sigma_noise": sigma}
    Gs = autograd_gauss_newton(c.model, lf, c.X, y)
    P = scale * 0.5 * (Gs + Gs.T) + delta * _eye(c.n)
    cov = torch.linalg.inv(P)
    la = Laplace(c.model, likelihood, prior_precision=delta, **kw).fit(c.X, y)
    lt = Laplace(c.twin, likelihood, prior_precision=delta, **kw).fit(c.X, y)
    theta = torch.nn.utils.parameters_to_vector(c.model.parameters()).detach()
    close(la.mean, theta, 0.0, "mean")
    close(la.posterior_covariance(), cov, 1e-9, "posterior_covariance")
    close(la.posterior_variance(), cov.diagonal(), 1e-7, "posterior_variance")
    close(la.posterior_variance(), c.to_model(lt.posterior_variance()), 1e-7, "twin posterior_variance")
    J = autograd_output_jacobian(c.model, c.Xte)  # (N, C, n), parameters() order
    close(la.functional_variance(J), J @ cov @ J.mT, 1e-9, "functional_variance")
    close(
        la.functional_variance(J), lt.functional_variance(c.to_twin(J, 2)), 1e-9, "twin functional_variance"
    )
    k = 6000
    Th = la.sample(k, generator=torch.Generator().manual_seed(2))
    assert Th.shape == (k, c.n)
    assert _whitening_error((Th - theta).T, P) < 0.15
    # prior mean as a vector in parameters() order
    mu = _rand(c.n, seed=14)
    la.prior_mean, lt.prior_mean = mu, c.to_twin(mu)
    assert la.scatter() == pytest.approx(delta * float(((theta - mu) ** 2).sum()), rel=1e-12)
    if likelihood == "classification":
        loglik = -float(lf(c.model(c.X), y))
    else:
        sse = float(lf(c.model(c.X), y))
        loglik = -sse / (2 * sigma**2) - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    logdet_ratio = float(torch.linalg.slogdet(P)[1]) - c.n * math.log(delta)
    ref = loglik - 0.5 * (logdet_ratio + delta * float(((theta - mu) ** 2).sum()))
    assert la.log_marginal_likelihood() == pytest.approx(ref, rel=1e-9)
    assert la.log_marginal_likelihood() == pytest.approx(lt.log_marginal_likelihood(), rel=1e-10)
    # the predictive (linearized) is the twin's
    if likelihood == "classification":
        close(la(c.Xte), lt(c.Xte), 1e-10, "glm predictive")
    else:
        f_mu, f_var = la(c.Xte)
        t_mu, t_var = lt(c.Xte)
        close(f_mu, t_mu, 1e-12, "predictive mean")
        close(f_var, J @ cov @ J.mT, 1e-9, "predictive variance")
        close(f_var, t_var, 1e-9, "twin predictive variance")


# -- influence -----------------------------------------------------------------------------------
def test_per_example_gradients_and_output_jacobians(case):
    c = case
    ce = nn.CrossEntropyLoss()
    ref = autograd_per_example_gradients(c.model, ce, c.X, c.y)
    close(per_example_gradients(c.model, ce, c.X, c.y), ref, 1e-12, "per_example_gradients")
    H = _op("hessian", c.model, c)
    close(
        per_example_gradients(c.model, ce, c.X, c.y, chain=H.chain), ref, 1e-12, "with the operator's chain"
    )
    close(per_example_gradients(c.model, ce, c.X, c.y, chunk=5), ref, 1e-12, "in chunks")
    twin = per_example_gradients(c.twin, ce, c.X, c.y)
    close(per_example_gradients(c.model, ce, c.X, c.y), c.to_model(twin, 1), 1e-12, "twin rows")
    close(
        output_jacobians(c.model, c.Xte), autograd_output_jacobian(c.model, c.Xte), 1e-12, "output_jacobians"
    )


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_influence(case, curvature):
    c = case
    ce = nn.CrossEntropyLoss()
    A = c.dense(curvature)
    d = _pd_damping(A)
    Ainv = torch.linalg.inv(A + d * _eye(c.n))
    inf = InfluenceFunction(c.model, ce, curvature=curvature, damping=d).fit(c.X, c.y)
    it = InfluenceFunction(c.twin, ce, curvature=curvature, damping=d).fit(c.X, c.y)
    assert inf.positive_definite and tuple(inf.inertia) == (0, 0, c.n)
    Gtr = autograd_per_example_gradients(c.model, ce, c.X, c.y)
    Gte = autograd_per_example_gradients(c.model, ce, c.Xte, c.yte)
    close(inf.train_gradients, Gtr, 1e-12, "train_gradients")
    V = _rand(5, c.n, seed=15)
    close(inf.inverse_hvp(V), V @ Ainv, 1e-9, "inverse_hvp(V)")
    close(inf.inverse_hvp(V[0]), Ainv @ V[0], 1e-9, "inverse_hvp(v)")
    close(inf.inverse_hvp(V), c.to_model(it.inverse_hvp(c.to_twin(V, 1)), 1), 1e-10, "twin inverse_hvp")
    scores = inf.influences(c.Xte, c.yte)
    ref = -(Gte @ Ainv @ Gtr.T)
    close(scores, ref, 1e-9, "influences")
    close(scores, it.influences(c.Xte, c.yte), 1e-10, "twin influences")
    close(inf.self_influence(), ((Gtr @ Ainv) * Gtr).sum(1), 1e-9, "self_influence")
    close(inf.self_influence(), it.self_influence(), 1e-10, "twin self_influence")
    fn = influence_scores(c.model, ce, (c.X, c.y), (c.Xte, c.yte), curvature=curvature, damping=d)
    close(fn, ref, 1e-9, "influence_scores")


# -- diagnostics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_newton_direction(case, curvature):
    c = case
    ce = nn.CrossEntropyLoss()
    A = c.dense(curvature)
    d = _pd_damping(A)
    nd = diagnostics.newton_direction(c.model, ce, c.X, c.y, curvature=curvature, damping=d)
    ref = torch.linalg.solve(A + d * _eye(c.n), c.g)
    close(nd.direction, ref, 1e-9, "newton_direction(damping=d)")
    close(nd.gradient, c.g, 1e-12, "newton_direction gradient")
    ndt = diagnostics.newton_direction(c.twin, ce, c.X, c.y, curvature=curvature, damping=d)
    close(nd.direction, c.to_model(ndt.direction), 1e-10, "twin newton_direction")
    # the default damping rule: lambda = 0 where C is positive definite, else a margin past -lambda_min
    auto = diagnostics.newton_direction(c.model, ce, c.X, c.y, curvature=curvature)
    lam = auto.damping
    assert lam >= 0 and auto.inertia.negative == 0
    close(auto.direction, torch.linalg.solve(A + lam * _eye(c.n), c.g), 1e-6, "newton_direction default")
    # an operator passed in, and a gradient given in parameters() order
    op = _op(curvature, c.model, c)
    g2 = _rand(c.n, seed=16)
    nd2 = diagnostics.newton_direction(c.model, ce, c.X, c.y, damping=d, operator=op, gradient=g2)
    close(
        nd2.direction,
        torch.linalg.solve(A + d * _eye(c.n), g2),
        1e-9,
        "newton_direction(operator=, gradient=)",
    )
    close(diagnostics.gradient_direction(c.model, ce, c.X, c.y), c.g, 1e-12, "gradient_direction")


def test_direction_alignments_and_minimizer(case):
    c = case
    ce = nn.CrossEntropyLoss()
    x = diagnostics.flat_parameters(c.model)
    x_star = x + _rand(c.n, seed=17)
    al = diagnostics.direction_alignments(c.model, ce, c.X, c.y, x_star, which=("gradient", "newton"))
    alt = diagnostics.direction_alignments(
        c.twin, ce, c.X, c.y, c.to_twin(x_star), which=("gradient", "newton")
    )
    e = x - x_star
    cos = float(c.g @ e / (c.g.norm() * e.norm()))
    assert al["gradient"] == pytest.approx(cos, rel=1e-10)
    assert al["newton"] == pytest.approx(alt["newton"], rel=1e-8, abs=1e-10)
    nd = diagnostics.newton_direction(c.model, ce, c.X, c.y)
    assert al["newton"] == pytest.approx(float(nd.direction @ e / (nd.direction.norm() * e.norm())), rel=1e-8)
    # a few damped Newton steps: the iterate is the twin's (to the rounding that the steps along the
    # near-null direction of the logits' common shift amplify), and its loss and gradient are those at x
    est = diagnostics.estimate_minimizer(c.model, ce, c.X, c.y, max_iter=3)
    est_t = diagnostics.estimate_minimizer(c.twin, ce, c.X, c.y, max_iter=3)
    close(est.x, c.to_model(est_t.x), 1e-4, "estimate_minimizer x")
    assert est.iterations == est_t.iterations
    probe = copy.deepcopy(c.model)
    diagnostics.set_flat_parameters(probe, est.x)
    g_at, _ = autograd_gradient_hessian(probe, ce, c.X, c.y)
    assert est.gradient_norm == pytest.approx(float(g_at.norm()), rel=1e-6, abs=1e-14)
    assert est.loss == pytest.approx(float(ce(probe(c.X), c.y)), rel=1e-10)


# -- random registration orders (hypothesis) and a float32 model ----------------------------------------
class Shuffled(nn.Module):
    """A chain ``Linear -> act -> ... -> Linear`` (optionally scaled by a parameter of its own, used last)
    whose layers are registered in the order ``perm``: ``model.parameters()`` lists them so, forward uses
    them in chain order."""

    def __init__(self, widths: list[int], perm: list[int], act: str, scale: bool):
        super().__init__()
        if scale:
            self.t = nn.Parameter(torch.tensor(1.3))
        for i in perm:
            setattr(self, f"lin{i}", nn.Linear(widths[i], widths[i + 1]))
        self.depth, self.act = len(widths) - 1, {"tanh": torch.tanh, "gelu": nn.functional.gelu}[act]

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.depth):
            x = getattr(self, f"lin{i}")(x)
            if i < self.depth - 1:
                x = self.act(x)
        return x * self.t if hasattr(self, "t") else x


@st.composite
def shuffled_chains(draw):
    depth = draw(st.integers(2, 4))
    widths = [draw(st.integers(1, 5)) for _ in range(depth)] + [draw(st.integers(2, 3))]
    perm = draw(st.permutations(range(depth)))
    return (
        widths,
        perm,
        draw(st.sampled_from(["tanh", "gelu"])),
        draw(st.booleans()),
        draw(st.integers(0, 99)),
    )


@settings(max_examples=25, deadline=None)
@given(shuffled_chains())
def test_random_registration_orders_give_the_dense_curvature_in_parameters_order(case):
    """Any order of registration (the identity included): products, the dense matrices, the diagonal and
    a damped solve equal plain autograd's in ``model.parameters()`` order."""
    widths, perm, act, scale, seed = case
    torch.manual_seed(seed)
    model = Shuffled(widths, list(perm), act, scale).double()
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(6, widths[0], generator=gen, dtype=DT)
    y = torch.randint(0, widths[-1], (6,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    G_ref = autograd_gauss_newton(model, loss_fn, X, y)
    v = torch.randn(H_ref.shape[0], generator=gen, dtype=DT)
    for op, A in (
        (hessinv.hessian(model, loss_fn, X, y), H_ref),
        (hessinv.gauss_newton(model, loss_fn, X, y), G_ref),
    ):
        scale_ = float(A.abs().max()) + 1e-300
        assert torch.allclose(op.gradient, g_ref, rtol=1e-10, atol=1e-13)
        assert float((op.to_dense() - A).abs().max()) <= 1e-11 * scale_
        assert float((op @ v - A @ v).abs().max()) <= 1e-11 * scale_ * float(v.abs().sum())
        assert float((op.diagonal() - A.diagonal()).abs().max()) <= 1e-11 * scale_
        eps = 2.0 * scale_ + 1.0  # (H + eps I positive definite: a well-conditioned solve)
        x = op.solve(v, damping=eps)
        ref = torch.linalg.solve(A + eps * torch.eye(A.shape[0], dtype=DT), v)
        assert torch.allclose(x, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_a_float32_model_refines_through_its_float64_copy_in_the_same_order():
    """A float32 operator's refined solves, inverse diagonal and log-determinant come from a float64 copy
    of the model, whose own chain is permuted the same way: in ``model.parameters()`` order to float64
    accuracy."""
    case = _case("head_first")
    m32 = copy.deepcopy(case.model).float()
    X, y = case.X.float(), case.y
    H32 = hessinv.hessian(m32, nn.CrossEntropyLoss(), X, y)
    # the dense reference at the float32 weights, in float64
    m64 = copy.deepcopy(m32).double()
    _, H = autograd_gradient_hessian(m64, nn.CrossEntropyLoss(), X.double(), y)
    eps = 2.0 * float(H.abs().max()) + 0.5
    A = H + eps * torch.eye(H.shape[0], dtype=DT)
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    F = H32.factor(eps)
    x, info = F.solve(b.float(), return_info=True)
    assert info.residual <= 1e-10
    ref = torch.linalg.solve(A, b)
    assert float((x.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    d = F.inverse_diagonal()
    assert torch.allclose(d.double(), torch.linalg.inv(A).diagonal(), rtol=1e-5)
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-9)


def test_a_submodule_with_children_out_of_order_is_split_into_its_pieces():
    """An ordered split called such a submodule whole (3-4x slower factorizations, a review); the operators
    split in the order of use and permute: Linear+tanh stages, exact."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(2)])
            self.head = nn.Linear(WIDTH, C)

        def forward(self, x):
            for i, b in enumerate(self.blocks):
                x = torch.tanh(b(x if i == 0 else x[:, :D_IN]))
            return self.head(x)

    torch.manual_seed(0)
    model = Stack().double()
    X = torch.randn(8, D_IN, dtype=DT)
    y = torch.randint(0, C, (8,))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert H.chain.permuted and not any("(Block" in s.name for s in H.chain.stages)
    assert sum("Linear" in s.name for s in H.chain.stages) == 5
    _, ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert torch.allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()))


def test_root_with_stage_structure_is_refused_and_a_float32_operator_keeps_one_twin():
    case = _case("head_first")
    G = hessinv.gauss_newton(case.model, nn.CrossEntropyLoss(), case.X, case.y)
    with pytest.raises(hessinv.InvalidArgumentError, match="stages' order"):
        G.root(factors=[])
    m32 = copy.deepcopy(case.model).float()
    H32 = hessinv.hessian(m32, nn.CrossEntropyLoss(), case.X.float(), case.y)
    assert H32._residual_operator() is H32._plain._residual_operator()


# every public method of the operators and factorizations, by how a permuted operator treats it: a new
# one must be added here -- and, if it takes or gives an n-vector, converted (the `_order` branch), tested
_PUBLIC = {
    "CurvatureOperator": {
        "converted": {"__matmul__", "matmul", "to_dense", "diagonal", "solve", "eigenpairs"},
        "delegated": {"factor", "factor_if_positive_definite", "inertia", "min_eigenvalue", "norm_estimate"},
        "through others": {
            "__rmatmul__",
            "as_linear_operator",
            "trace",
            "is_positive_definite",
            "zero_tolerance",
        },
    },
    "GaussNewton": {
        "converted": {"to_dense", "diagonal", "root", "factor"},
        "delegated": {"factor_if_positive_definite", "min_eigenvalue"},
        "through others": {"is_positive_definite"},
    },
    "Hessian": {},
    "Factorization": {
        "converted": {"solve", "inverse_diagonal", "inverse_quadratic", "inverse_sqrt"},
        "through others": {"sample"},
        "invariant": {"inertia", "inertia_certified", "logdet", "slogdet"},
    },
    "WoodburyFactorization": {"converted": {"inverse_diagonal", "sample"}, "invariant": {"logdet"}},
    "MixedFactorization": {"converted": {"inverse_sqrt"}, "invariant": {"logdet", "slogdet"}},
}


def test_every_public_method_of_the_operators_is_classified_for_permuted_vectors():
    for name, kinds in _PUBLIC.items():
        cls = getattr(hessinv.curvature, name)
        public = {
            n
            for n, v in vars(cls).items()
            if (not n.startswith("_") or n in ("__matmul__", "__rmatmul__"))
            and (callable(v) or isinstance(v, property))
        }
        classified = set().union(*kinds.values()) if kinds else set()
        assert public == classified, (name, sorted(public ^ classified))
