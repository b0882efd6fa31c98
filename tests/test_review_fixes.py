"""Found by a review of the 2026-12-04 changes: a batch-mixing stage before the first parameter (no
blocks, so no probe of its own), a loss scaled to 1e-160 (a low-rank pivot's correction underflowed), and
per-example derivatives of a model vmap cannot run -- each against plain autograd."""

from __future__ import annotations

import math

import pytest
import torch
from reference import autograd_gradient_hessian, autograd_output_jacobian, autograd_per_example_gradients
from torch import nn

import hessinv
from hessinv.influence import output_jacobians, per_example_gradients


class _Center(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


def test_a_batch_mixing_prefix_is_refused_and_per_example_gradients_stay_each_examples_own():
    torch.manual_seed(0)
    m = nn.Sequential(_Center(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ce = nn.CrossEntropyLoss()
    with pytest.raises(hessinv.UnsupportedStageError, match=r"stage 0 \(_Center.*mixes examples"):
        hessinv.hessian(m, ce, X, y)
    # row i: the gradient of example i's loss through the model alone (x_i - x_i = 0 here)
    assert torch.allclose(per_example_gradients(m, ce, X, y), autograd_per_example_gradients(m, ce, X, y))


class _Scaled(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, o, t):
        return self.c * nn.functional.cross_entropy(o, t)


@pytest.mark.parametrize("c", [1e-160, 1e-200])
def test_inertia_logdet_and_lambda_min_at_a_tiny_loss_scale(c):
    """Wide enough for the low-rank Linear pivot, whose correction C = (b s')(b s')^T (x) Pi is a
    product of two Hessian-scale numbers: subnormal at c = 1e-155 (9 negative eigenvalues of 19)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    R = autograd_gradient_hessian(m, _Scaled(1.0), X, y)[1]  # H / c
    R = 0.5 * (R + R.T)
    ev = torch.linalg.eigvalsh(R)
    s = 0.5 * float(-ev[0])
    A = R + s * torch.eye(R.shape[0], dtype=torch.float64)
    H = hessinv.hessian(m, _Scaled(c), X, y)
    F = H.factor(s * c)
    assert F.inertia.negative == int((torch.linalg.eigvalsh(A) < 0).sum())
    assert F.logdet() - R.shape[0] * math.log(c) == pytest.approx(float(torch.linalg.slogdet(A)[1]), abs=1e-8)
    assert H.min_eigenvalue() / c == pytest.approx(float(ev[0]), abs=1e-7)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if float(x.abs().max()) > 1e9:  # data-dependent control flow: vmap cannot run it
            h = h.clamp(-1, 1)
        return self.c(h)


def test_per_example_derivatives_of_a_model_vmap_cannot_run():
    torch.manual_seed(0)
    m = nn.Sequential(_Branchy()).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ce = nn.CrossEntropyLoss()
    assert torch.allclose(per_example_gradients(m, ce, X, y), autograd_per_example_gradients(m, ce, X, y))
    assert torch.allclose(output_jacobians(m, X), autograd_output_jacobian(m, X))
