"""A frozen backbone in front of a trainable head (fine-tuning): the stages before the first one with
parameters only transform the inputs, get no blocks, and every curvature quantity is the head's on the
backbone's features -- against plain autograd double backward on the whole model."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv.chain import Chain


def _model(frozen_head_layer: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
    ).requires_grad_(False)  # fmt: skip
    head = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    if frozen_head_layer:  # a frozen layer between trainable ones keeps its blocks (upstream varies)
        head[2].requires_grad_(False)
    return nn.Sequential(backbone, head).double()


def _spy_stage_blocks(monkeypatch) -> list[str]:
    """The names of the stages whose blocks are formed from now on."""
    seen: list[str] = []
    orig = Chain._stage_blocks

    def spy(self, s, *a, **k):
        seen.append(s.name)
        return orig(self, s, *a, **k)

    monkeypatch.setattr(Chain, "_stage_blocks", spy)
    return seen


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)


@pytest.mark.parametrize("frozen_head_layer", [False, True])
def test_frozen_backbone_hessian_gauss_newton_solve_and_inertia(frozen_head_layer, monkeypatch):
    model, ce = _model(frozen_head_layer), nn.CrossEntropyLoss()
    X, y = _batch()
    g_ref, H_ref = autograd_gradient_hessian(model, ce, X, y)
    G_ref = autograd_gauss_newton(model, ce, X, y)
    linearized = _spy_stage_blocks(monkeypatch)
    H = hessinv.hessian(model, ce, X, y)
    assert linearized and not any("Conv" in name or "Pool" in name for name in linearized), linearized
    n = H.shape[0]
    assert n == H_ref.shape[0]
    assert torch.allclose(H.gradient, g_ref, atol=1e-13)
    V = torch.randn(n, 3, dtype=torch.float64)
    assert torch.allclose(H @ V, H_ref @ V, atol=1e-12)
    G = hessinv.gauss_newton(model, ce, X, y)
    assert torch.allclose(G @ V, G_ref @ V, atol=1e-12)
    eps = 1e-2
    F = H.factor(eps)
    A = H_ref + eps * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    assert float((A @ F.solve(b) - b).norm() / b.norm()) < 1e-12
    ev = torch.linalg.eigvalsh(A)
    assert tuple(F.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
    assert abs(F.logdet() - float(torch.linalg.slogdet(A)[1])) < 1e-9
    assert H.min_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(H_ref)[0]), abs=1e-8)


def test_frozen_backbone_trains():
    """Newton on the whole model moves the head only and lowers the loss (the backbone stays frozen)."""
    import hessinv.optim as ho

    model, ce = _model(), nn.CrossEntropyLoss()
    X, y = _batch()
    frozen = [p.clone() for p in model[0].parameters()]
    opt = ho.Newton(model, ce, seed=0)
    loss0 = float(ce(model(X), y))
    for _ in range(5):
        opt.step(X, y)
    assert float(ce(model(X), y)) < loss0
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen, strict=True))


def test_frozen_backbone_per_example_gradients(monkeypatch):
    """The per-example rows stop at the first stage with parameters too (a frozen backbone's per-example
    Jacobians took 18 s for 64 examples of 3x12x12 before)."""
    from reference import autograd_per_example_gradients

    from hessinv.influence import per_example_gradients

    model, ce = _model(), nn.CrossEntropyLoss()
    X, y = _batch()
    seen = _spy_stage_blocks(monkeypatch)
    G = per_example_gradients(model, ce, X, y)
    assert seen and not any("Conv" in name or "Pool" in name for name in seen), seen
    assert torch.allclose(G, autograd_per_example_gradients(model, ce, X, y), atol=1e-14)
