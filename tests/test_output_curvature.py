"""The loss's curvature in the outputs of losses that sum one term per output entry (MSE, BCE, Huber, L1,
...) is diagonal, and is kept as its diagonal on outputs of any shape: an image-to-image model's
``3 x 64 x 64`` outputs per example made a dense ``12288 x 12288`` matrix per example (a TooLargeError
at the optimizer's first step; seconds per refresh at ``3 x 32 x 32``), found by a review."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.optim
from hessinv import riccati
from hessinv.stages.losses import LossBlocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _targets(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    return t if name in ("bce", "bce_weighted", "bce_logits") else 3 * t - 1


LOSSES = {
    "mse": lambda: nn.MSELoss(),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
    "bce_logits": lambda: nn.BCEWithLogitsLoss(),
    "bce_weighted": lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0], dtype=torch.float64)),
    "huber": lambda: nn.HuberLoss(delta=0.5),
    "smooth_l1": lambda: nn.SmoothL1Loss(beta=0.7),
    "functional_mse": lambda: nn.functional.mse_loss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("shape", [(2, 5, 5), (7,), (4, 3)])
def test_elementwise_losses_on_outputs_of_any_shape_are_exact_and_diagonal(name, shape):
    torch.manual_seed(0)
    C = shape[0]
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)).double()
    if len(shape) == 1:
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, C)).double()
        X = torch.randn(5, 6, dtype=torch.float64)
    elif len(shape) == 2:
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 12), nn.Unflatten(1, shape)).double()
        X = torch.randn(5, 6, dtype=torch.float64)
    else:
        X = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    loss = LOSSES[name]()
    y = _targets(name, (5, *shape))
    g_ref, H_ref = autograd_gradient_hessian(m, loss, X, y)
    G_ref = autograd_gauss_newton(m, loss, X, y)
    H, G = hessinv.hessian(m, loss, X, y), hessinv.gauss_newton(m, loss, X, y)
    for op in (H, G):
        lb = op.blocks[-1]
        assert isinstance(lb, LossBlocks) and lb.diag is not None and lb._Lam is None  # never formed
    assert _rel(H.gradient, g_ref) < 1e-12
    assert _rel(H.to_dense(), H_ref) < 1e-10 and _rel(G.to_dense(), G_ref) < 1e-10
    v = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert (
        _rel(H.factor(0.5).solve(v), torch.linalg.solve(H_ref + 0.5 * torch.eye(H.shape[0]).double(), v))
        < 1e-9
    )
    U, S = G.root()
    assert _rel(U.T @ (S[:, None] * U), G_ref) < 1e-10
    assert _rel(G.diagonal(), G_ref.diagonal()) < 1e-10


def test_an_image_to_image_model_s_curvature_needs_no_dense_output_curvature():
    """3 x 64 x 64 outputs, 32 examples: a dense Lambda would hold 4.8e9 numbers (refused before); the
    optimizer's budgeted root takes products with the diagonal, and its steps run."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    X = torch.randn(32, 3, 64, 64)
    G = hessinv.gauss_newton(m, nn.MSELoss(), X, X.roll(1, 2))
    assert G.blocks[-1].diag.shape == (32, 3 * 64 * 64)
    U, S = G.root(max_rows=64)  # (each example's leading output directions: 2 of its 12288)
    assert U.shape == (64, 84) and bool((S == 1).all())
    v = torch.randn(G.shape[0])
    assert float(v @ (U.T @ (S * (U @ v)))) <= float(v @ (G @ v)) * (1 + 1e-4)  # a part of G (PSD)
    opt = hessinv.optim.Newton(m, nn.MSELoss(), seed=0)
    with torch.no_grad():
        before = float(nn.MSELoss()(m(X), X.roll(1, 2)))
    for i in range(6):
        half = slice(0, 16) if i % 2 == 0 else slice(16, 32)  # (mini-batches)
        opt.step(X[half], X.roll(1, 2)[half])
    with torch.no_grad():
        assert float(nn.MSELoss()(m(X), X.roll(1, 2))) < 0.9 * before


def test_the_sweep_s_cost_and_memory_count_the_loss_s_coupling_of_many_outputs(monkeypatch):
    """One convolution (84 parameters) with 3 x 32 x 32 outputs on 16 examples: the sweep couples a =
    16 x 3072 outputs at the loss (a 49152^2 matrix: 19 GB in float64) that neither the cost model nor
    the memory check counted (only stage inputs), so the factorization tried to allocate it; the dense
    route (84 x 84) takes it now, and the memory check names the loss's coupling."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).double()
    X = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    y = X.roll(1, 3)
    H = hessinv.hessian(m, nn.MSELoss(), X, y)
    assert H._swept() is not H  # the dense route
    g_ref, H_ref = autograd_gradient_hessian(m, nn.MSELoss(), X, y)
    x = H.factor(1e-3).solve(H.gradient)
    assert _rel(x, torch.linalg.solve(H_ref + 1e-3 * torch.eye(84, dtype=torch.float64), g_ref)) < 1e-9
    a = 16 * 3 * 32 * 32
    assert riccati._sweep_entries(H.blocks[0], 16, True) >= a * a


class _PerPosition(nn.Module):
    """Logits (B, C, *positions) from a small MLP."""

    def __init__(self, positions: tuple[int, ...], C: int = 4):
        super().__init__()
        self.shape = (C, *positions)
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, C * int(torch.tensor(positions).prod()))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).view(-1, *self.shape)


CE = {
    "plain": lambda: nn.CrossEntropyLoss(),
    "weighted_smoothed": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64), label_smoothing=0.1
    ),
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=2),
    "sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "probabilities": lambda: nn.CrossEntropyLoss(),
    "functional": lambda: nn.functional.cross_entropy,
}


@pytest.mark.parametrize(
    ("name", "positions"),
    [(n, p) for n in sorted(CE) for p in [(5,), (2, 3)]] + [("weighted_smoothed", ())],  # (B, C): weighted
)
def test_a_cross_entropy_per_position_keeps_its_softmax_form(name, positions):
    """Per-position logits (B, C, T) (a sequence model, segmentation) and a class-weighted (B, C)
    cross-entropy went through autograd's dense (C T)^2 output curvature per example (a next-token model
    of 500 classes x 16 positions: refused, or 8 s and 3 GB per refresh with 4 examples; a review)."""
    torch.manual_seed(0)
    m = (
        _PerPosition(positions).double()
        if positions
        else nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    )
    m = m.double()
    X = torch.randn(6, 3, dtype=torch.float64)
    if name == "probabilities":
        y = torch.softmax(torch.randn(6, 4, *positions, dtype=torch.float64), 1)
    else:
        y = torch.randint(0, 4, (6, *positions))
    loss = CE[name]()
    g_ref, H_ref = autograd_gradient_hessian(m, loss, X, y)
    G_ref = autograd_gauss_newton(m, loss, X, y)
    H, G = hessinv.hessian(m, loss, X, y), hessinv.gauss_newton(m, loss, X, y)
    lb = H.blocks[-1]
    assert lb.classes == 4 and lb._Lam is None
    assert _rel(H.to_dense(), H_ref) < 1e-10 and _rel(G.to_dense(), G_ref) < 1e-10
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    assert _rel(H.factor(0.3).solve(g_ref), torch.linalg.solve(H_ref + 0.3 * eye, g_ref)) < 1e-9
    U, S = G.root()
    assert _rel(U.T @ (S[:, None] * U), G_ref) < 1e-10 and _rel(G.diagonal(), G_ref.diagonal()) < 1e-10


def test_a_next_token_model_s_refresh_forms_no_dense_output_curvature():
    """500 classes x 16 positions, the optimizer's default curvature batch of 8: 5e8 numbers of dense
    output curvature (refused before)."""
    torch.manual_seed(0)
    V, T = 500, 16
    m = nn.Sequential(
        nn.Embedding(V, 16),
        nn.Flatten(),
        nn.Linear(16 * T, 32),
        nn.Tanh(),
        nn.Linear(32, V * T),
        nn.Unflatten(1, (V, T)),
    )
    X = torch.randint(0, V, (32, T))
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(), seed=0)
    with torch.no_grad():
        before = float(nn.CrossEntropyLoss()(m(X), X.roll(1, 1)))
    for i in range(4):
        half = slice(0, 16) if i % 2 == 0 else slice(16, 32)
        opt.step(X[half], X.roll(1, 1)[half])
    with torch.no_grad():
        assert float(nn.CrossEntropyLoss()(m(X), X.roll(1, 1))) < before
