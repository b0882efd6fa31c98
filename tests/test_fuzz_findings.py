"""Defects a random-model fuzzer found (float64 models against plain autograd), each reduced to its model:
the Gauss-Newton root's truncation, a generic stage without a double backward under Gauss-Newton, and a
zero pivot coupled to the rest at damping 0."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian, autograd_hessian
from torch import Tensor, nn

import hessinv
from hessinv.errors import UnsupportedStageError

F64 = torch.float64


def _saturated_bce(batch: int):
    """Linear-Tanh-Linear-Sigmoid under ``BCELoss``, the second output saturated (p = 1 - 1e-10):
    ``Lambda ~ 1e20`` there, ``J ~ 1e-10``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2), nn.Sigmoid()).to(F64)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.0, 23.0]))
    X = torch.randn(batch, 2, dtype=F64) * 0.3
    y = torch.rand(batch, 2, dtype=F64)
    return model, nn.BCELoss(), X, y


@pytest.mark.parametrize("batch", [1, 4])
def test_the_gauss_newton_root_keeps_what_the_jacobian_scales_back_up(batch):
    """The root kept only eigenvalues of ``Lambda`` above ``C u`` times the batch's largest: a saturated
    output's ``1e20`` dropped every other output's ``~10``, whose ``J^T Lambda J`` is as large as the
    saturated one's -- ``to_dense()``, ``root()``, ``eigenpairs``, ``inertia`` and the Woodbury
    ``logdet`` 45% off, silently. Now per example, and a diagonal ``Lambda_n`` (an elementwise loss) keeps
    every nonzero entry."""
    model, loss_fn, X, y = _saturated_bce(batch)
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    ref = autograd_gauss_newton(model, loss_fn, X, y)
    scale = float(ref.abs().max())
    assert float((G.to_dense() - ref).abs().max()) <= 1e-12 * scale
    U, S = G.root()
    assert float((U.T @ (S[:, None] * U) - ref).abs().max()) <= 1e-12 * scale
    ev = torch.linalg.eigvalsh(ref)
    r = int((ev > 1e-12 * float(ev.max())).sum())
    assert G.inertia(0.0) == (0, G.shape[0] - r, r)
    F = G.factor(1e-3)
    sign, logabs = torch.linalg.slogdet(ref + 1e-3 * torch.eye(G.shape[0], dtype=F64))
    assert float(sign) > 0 and abs(F.logdet() - float(logabs)) <= 1e-10 * abs(float(logabs))


def test_gauss_newton_through_a_stage_without_double_backward(monkeypatch):
    """``F.hardsigmoid`` has no double backward: every Gauss-Newton product (``G @ v``, solves, inertia)
    raised torch's bare ``RuntimeError`` (an earlier fuzzer's finding), then a named refusal; the products
    now come from ``G``'s root (``U^T S U``, first derivatives only) -- exact against plain autograd's
    Gauss-Newton matrix -- and the Hessian, which needs the double backward, is refused with the remedy."""
    from reference import autograd_gauss_newton

    class Block(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, z: Tensor) -> Tensor:
            return z + self.fc2(nn.functional.hardsigmoid(self.fc1(z)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(4), nn.Linear(4, 3)).to(F64)
    X, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    G_ref = autograd_gauss_newton(model, loss_fn, X, y)
    v = torch.randn(G.shape[0], dtype=F64)
    assert torch.allclose(G @ v, G_ref @ v, rtol=0, atol=1e-12 * float((G_ref @ v).abs().max()))
    x = G.solve(G.gradient, damping=1e-2)
    A = G_ref + 1e-2 * torch.eye(G.shape[0], dtype=F64)
    assert float((A @ x - G.gradient).norm() / G.gradient.norm()) <= 1e-12
    ev = torch.linalg.eigvalsh(G_ref)
    tol = G.zero_tolerance()
    monkeypatch.setattr(hessinv.curvature, "DENSE_COUNTS", True)  # (the library's default: from the root)
    assert tuple(G.inertia(0.0)) == (
        int((ev < -tol).sum()),
        int((ev.abs() <= tol).sum()),
        int((ev > tol).sum()),
    )
    with pytest.raises(UnsupportedStageError, match="hardsigmoid"):
        hessinv.hessian(model, loss_fn, X, y) @ v


def test_a_zero_pivot_coupled_to_the_rest_is_perturbed_not_refused():
    """Under a sum of absolute errors the last layer's block of ``H`` is zero (the loss is piecewise
    linear in the outputs) while ``H`` is nonsingular (cond 3e3) through its coupling to the layer
    before: the sweep refused damping 0 as "parameters that do not reach the loss"; now the zero pivot is
    perturbed at the coupling's scale and the solve refined: residual, inertia and log-determinant as
    the dense matrix's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).to(F64)
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    loss_fn = nn.L1Loss(reduction="sum")
    g, ref = autograd_gradient_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(ref)
    assert float(ev.abs().min()) > 1e-6 * float(ev.abs().max())  # (nonsingular)
    H = hessinv.hessian(model, loss_fn, X, y)
    assert float(H.to_dense()[-8:, -8:].abs().max()) == 0.0  # (the last layer's block is zero)
    F = H.factor(0.0)
    x = F.solve(g)
    assert float((ref @ x - g).norm()) <= 1e-10 * float(g.norm())
    assert F.inertia == H.inertia(0.0, tol=0.0) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    assert abs(F.logdet() - float(torch.linalg.slogdet(ref)[1])) <= 1e-9


def _confident_output(per_pixel: bool) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """``(model, X, y, G)``: a linear model (a 1 x 1 convolution under a per-pixel cross-entropy, or a Linear
    layer under a per-example one) with one bright input (a logit gap of 36: ``p (1 - p) = 2e-16``, times a
    Jacobian of 6e5), and its Gauss-Newton matrix ``sum q a a^T`` written out."""
    torch.manual_seed(0)
    if per_pixel:
        model = nn.Sequential(nn.Conv2d(1, 2, 1)).to(F64)
        X = torch.randn(2, 1, 4, 4, dtype=F64)
        X[0, 0, 1, 1] = 6e5  # one bright pixel: a logit gap of 36
        y = torch.randint(0, 2, (2, 4, 4))
    else:
        model = nn.Sequential(nn.Linear(1, 2)).to(F64)
        X = torch.randn(6, 1, dtype=F64)
        X[0, 0] = 6e5
        y = torch.randint(0, 2, (6,))
    w = model[0].weight
    with torch.no_grad():
        w.copy_(torch.tensor([3e-5, -3e-5], dtype=F64).reshape(w.shape))
        model[0].bias.zero_()
        z = model(X)
        d = (z[:, 0] - z[:, 1]).reshape(-1)
    q = torch.sigmoid(d) * torch.sigmoid(-d)  # (each position's p0 p1, without cancellation)
    x = X[:, 0].reshape(-1)
    one = torch.ones_like(x)
    A = torch.stack([x, -x, one, -one], 1)  # d(z0 - z1) / d(W0, W1, b0, b1)
    return model, X, y, (A.T * q) @ A


@pytest.mark.parametrize("per_pixel", [True, False])
def test_a_confident_output_amplified_by_its_jacobian_keeps_the_diagonal_exact(per_pixel):
    """The per-example diagonal sweep factored each example's ``Lambda_n`` by ``eigh``, whose eigenvalues
    carry ``u ||Lambda_n||``: a confident output's ``p (1 - p) = 2e-16`` came out 10% off, and a Jacobian of
    6e5 made that 1e-6 of the diagonal (the a x a sweep it replaced for convolutions was exact). Now the
    closed form's exact factor ``sqrt(p_j) (e_j - p)``: a per-pixel cross-entropy through a 1 x 1
    convolution and a per-example one through a Linear layer, against ``sum q a a^T`` written out."""
    model, X, y, G_exact = _confident_output(per_pixel)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for make in (hessinv.gauss_newton, hessinv.hessian):  # (a linear model: H = G)
        d = make(model, loss_fn, X, y).diagonal()
        assert float((d - G_exact.diagonal()).abs().max()) <= 1e-13 * float(G_exact.abs().max()), make


@pytest.mark.parametrize("per_pixel", [True, False])
def test_a_confident_position_keeps_the_gauss_newton_root_exact(per_pixel):
    """The Gauss-Newton root took each example's ``Lambda_n`` from ``eigh`` with a tolerance at the example's
    scale; under a per-pixel cross-entropy ``Lambda_n`` is block diagonal over positions of different
    scales, and a confident pixel's ``p (1 - p)`` (below ``u ||Lambda_n||``) was dropped: ``U^T S U`` was
    1e-5 off ``G`` and the Woodbury factorization's log-determinant 1.3e-5 off. Now the closed form's
    exact factor per position."""
    model, X, y, G_exact = _confident_output(per_pixel)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    U, S = G.root()
    assert float(((U.T * S) @ U - G_exact).abs().max()) <= 1e-13 * float(G_exact.abs().max())
    shifted = G_exact + 1e-3 * torch.eye(4, dtype=F64)
    F = G.factor(1e-3, method="woodbury")
    assert abs(F.logdet() - float(torch.linalg.slogdet(shifted)[1])) <= 1e-11
    b = torch.randn(4, dtype=F64)
    assert float((shifted @ F.solve(b) - b).norm()) <= 1e-11 * float(b.norm())


class _OnceSwish(torch.autograd.Function):
    """``x sigmoid(x)`` with a backward autograd cannot differentiate (``@once_differentiable``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class _OnceBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return _OnceSwish.apply(self.fc(x)) + x


def test_a_refused_probe_is_not_taken_as_passed_and_gauss_newton_uses_the_root():
    """A stage with a ``@once_differentiable`` backward: the first ``G @ v`` was refused, a second call on
    the same operator returned numbers 25% off with no error (the probe marked done before its checks ran),
    and a solve after it reported a residual of 7e-15 against a true 0.67 (a fuzzer's finding). The
    Gauss-Newton products now come from the root (exact, every call), the default factorization takes the
    Woodbury form where the sweep cannot run, and the Hessian is refused on every call."""
    from reference import autograd_gauss_newton

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _OnceBlock(6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    m = m.to(F64)
    X, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    G, G_ref = hessinv.gauss_newton(m, loss_fn, X, y), autograd_gauss_newton(m, loss_fn, X, y)
    v = torch.randn(G.shape[0], dtype=F64)
    for _ in range(2):
        assert torch.allclose(G @ v, G_ref @ v, rtol=0, atol=1e-12 * float((G_ref @ v).abs().max()))
    x = G.factor(1e-3).solve(G.gradient)
    A = G_ref + 1e-3 * torch.eye(G.shape[0], dtype=F64)
    assert float((A @ x - G.gradient).norm() / G.gradient.norm()) <= 1e-12
    for _ in range(2):  # (the Hessian's blocks, formed at once on so small a stage, are refused each time)
        with pytest.raises(UnsupportedStageError, match="once_differentiable"):
            hessinv.hessian(m, loss_fn, X, y) @ v


def test_full_batch_newton_stays_on_preconditioning_without_a_double_backward():
    """``Newton``'s auto mode switches to the exact-Hessian trust region at the second step on the same
    batch: on a model without a double backward (an ``nn.EmbeddingBag``) that step raised (a fuzzer's
    finding). It now keeps the Gauss-Newton preconditioning, and the loss falls."""
    import hessinv.optim as ho

    torch.manual_seed(0)
    m = nn.Sequential(nn.EmbeddingBag(40, 6, mode="mean"), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    X, y = torch.randint(0, 40, (32, 5)), torch.randint(0, 3, (32,))
    opt = ho.Newton(m, nn.CrossEntropyLoss(), seed=0)
    losses = [float(opt.step(X, y)) for _ in range(6)]
    assert opt.mode == "precondition" and losses[-1] < losses[0]


def _invariant_gauss_newton(dtype: torch.dtype, gn_eps: float, seed: int):
    """Eval BatchNorm2d (trainable affine) -> GroupNorm without affine (which normalizes each channel again:
    the loss sees BatchNorm's parameters only through GroupNorm's eps) -> a frozen head, MSE: ``||G||``
    about 1e-9 (float32) or 1e-18 (float64, GroupNorm eps 1e-9) while the stage blocks are of order 1."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(2))
        bn.bias.copy_(0.3 * torch.randn(2))
        bn.running_mean.copy_(0.3 * torch.randn(2))
        bn.running_var.copy_(0.5 + torch.rand(2))
    head = nn.Linear(8, 1).requires_grad_(False)
    model = nn.Sequential(bn, nn.GroupNorm(2, 2, affine=False, eps=gn_eps), nn.Flatten(), head)
    model = model.eval().to(dtype)
    X, y = torch.randn(8, 2, 2, 2, dtype=dtype), torch.randn(8, 1, dtype=dtype)
    return model, nn.MSELoss(), X, y


@pytest.mark.parametrize(
    ("dtype", "gn_eps", "seed"), [(torch.float32, 1e-5, 5), (torch.float32, 1e-5, 0), (F64, 1e-9, 13)]
)
def test_a_gauss_newton_matrix_positive_definite_by_construction_is_counted_so(dtype, gn_eps, seed):
    """``G + s I`` with ``s > 0`` and a convex loss is positive definite, but the sweep's pivots carry
    rounding relative to the stage blocks (order 1), not to ``||G||`` (1e-9): it counted 1-3 negative
    eigenvalues at ``s = 0.1 ||G||``, certified, and ``is_positive_definite(s)`` said False (a fuzzer's
    find). The factorization's solve and log-determinant must be those of ``G + s I`` all the same."""
    model, loss_fn, X, y = _invariant_gauss_newton(dtype, gn_eps, seed)
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    ref = autograd_gauss_newton(copy.deepcopy(model).double(), loss_fn, X.double(), y.double())
    ev = torch.linalg.eigvalsh(ref)
    s = 0.1 * float(ev.abs().max())
    assert G.inertia(s) == (0, 0, 4)
    assert G.is_positive_definite(s)
    F = G.factor(s, method="riccati")
    assert F.inertia == (0, 0, 4) and F.inertia_certified and F.positive_definite
    assert G.factor_if_positive_definite(s) is not None
    A = ref + s * torch.eye(4, dtype=F64)
    b = torch.randn(4, dtype=F64)
    with warnings.catch_warnings():  # (float64: the solve reaches 3e-8 and says so)
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        x = F.solve(b.to(dtype)).double()
    # (G's own entries carry the cancellation: BatchNorm's Jacobian through GroupNorm is u / (its eps)
    # relative, 1e-7 in float64 -- the reference too)
    tol = 1e-3 if dtype == torch.float32 else 1e-5
    assert float((A @ x - b).norm() / b.norm()) < tol
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-3)


def test_factor_if_positive_definite_returns_none_where_the_factorization_is_singular():
    """``G + 1e-20 I`` is positive definite by construction but singular to working precision: the
    fallback factorization raised SingularError where the contract is "a factorization, else None"
    (a review; a Levenberg-Marquardt loop written against it crashed)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    assert G.is_positive_definite(1e-20)
    assert G.factor_if_positive_definite(1e-20) is None
    assert G.factor_if_positive_definite(1e-2) is not None


@pytest.mark.parametrize("loss_fn", [nn.HuberLoss(), nn.SmoothL1Loss()])
def test_a_residual_exactly_at_the_huber_kink_is_not_refused(loss_fn):
    """A zero-initialized head with targets of +-1 puts every residual at the kink ``|r| = delta``: the loss's
    gradient changes smoothly on one side only, and the second-derivative check refused it as a loss
    autograd cannot differentiate (naming torch.compile). The Hessian is autograd's, one-sided."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    nn.init.zeros_(m[2].weight)
    nn.init.zeros_(m[2].bias)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    H = hessinv.hessian(m, loss_fn, x, y)
    assert torch.allclose(H.to_dense(), autograd_hessian(m, loss_fn, x, y), atol=1e-13)
    with torch.no_grad():  # one residual at the kink among smooth ones
        m[2].weight.normal_()
        y2 = m(x) + torch.tensor([[1.0], [0.3], [-1.0], [2.0]], dtype=torch.float64)
    G = hessinv.gauss_newton(m, loss_fn, x, y2)
    assert torch.allclose(G.to_dense(), autograd_gauss_newton(m, loss_fn, x, y2), atol=1e-13)
