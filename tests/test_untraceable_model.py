"""A model whose own forward torch.fx cannot trace (a loop over ``x.shape[1]``, ``torch.zeros(x.shape[0],
h)``) is called whole as one generic stage -- as ``nn.Sequential(model)`` is -- with a warning that says
what that costs, instead of a refusal: its curvature is exact (plain-autograd references, float64)."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.optim as ho


class Recurrent(nn.Module):
    """``h_t = tanh(W x_t + U h_{t-1})`` over the sequence, ``h_0 = 0`` made with ``torch.zeros``."""

    def __init__(self):
        super().__init__()
        self.inp, self.rec, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


class ConstantColumn(nn.Module):
    """A column of ones appended with ``torch.ones(x.shape[0], 1)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.cat([h, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1))


@pytest.mark.parametrize("kind", ["recurrent", "constant_column"])
def test_an_untraceable_model_is_called_whole_with_exact_curvature(kind):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "recurrent":
        model, X = Recurrent().double(), torch.randn(8, 4, 3, generator=gen, dtype=torch.float64)
    else:
        model, X = ConstantColumn().double(), torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.warns(UserWarning, match="could not be traced.*called whole"):
        H = hessinv.hessian(model, loss_fn, X, y)
    g, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    assert len(H.chain.stages) == 1
    assert torch.allclose(H.gradient, g, rtol=1e-10, atol=1e-14)
    assert torch.allclose(H.to_dense(), H_ref, rtol=1e-9, atol=1e-12)
    v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64)
    A = H_ref + 0.5 * torch.eye(H.shape[0], dtype=torch.float64)
    F = H.factor(0.5)
    assert torch.allclose(F.solve(v), torch.linalg.solve(A, v), rtol=1e-9, atol=1e-12)
    assert F.inertia.negative == int((torch.linalg.eigvalsh(A) < 0).sum())
    with pytest.warns(UserWarning, match="could not be traced"):
        G = hessinv.gauss_newton(model, loss_fn, X, y)
    assert torch.allclose(G.to_dense(), autograd_gauss_newton(model, loss_fn, X, y), rtol=1e-9, atol=1e-12)
    # and the optimizer trains it (the same single stage)
    with pytest.warns(UserWarning, match="could not be traced"):
        opt = ho.Newton(model, loss_fn, seed=0)
    with torch.no_grad():
        before = float(loss_fn(model(X), y))
    for _ in range(5):
        opt.step(X, y)
    with torch.no_grad():
        assert float(loss_fn(model(X), y)) < before
