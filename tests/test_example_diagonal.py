"""The exact diagonal through per-example blocks (a loss of per-example terms below Linear + activation
and elementwise stages) against plain autograd."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gauss_newton, autograd_gradient_hessian, chains
from torch import nn

import hessinv
from hessinv import riccati


@settings(max_examples=40, deadline=None)
@given(chains(max_depth=5, max_width=7, max_batch=6))
def test_diagonal_on_random_chains(prob):
    """Hessian and Gauss-Newton diagonals equal autograd's, whichever route a chain takes (residual
    blocks, standalone activations, every loss of the strategy)."""
    _, H_ref = autograd_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    G_ref = autograd_gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    for make, ref in ((hessinv.hessian, H_ref), (hessinv.gauss_newton, G_ref)):
        op = make(prob.model, prob.loss_fn, prob.inputs, prob.targets)
        d = op.diagonal()
        scale = max(float(ref.abs().max()), 1e-300)
        assert float((d - ref.diagonal()).abs().max()) <= 1e-12 * scale, prob.description


@pytest.mark.parametrize("residual", [False, True])
def test_per_example_route_needs_no_batch_sized_blocks(residual, monkeypatch):
    """2000 examples of a small tanh MLP (with a residual block): the a x a sweep (a = 2000 x 12) is
    refused by the memory check set up here, the dense route is never formed, and the per-example
    blocks give the exact diagonal."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12)

        def forward(self, z):
            return z + torch.tanh(self.lin(z))

    torch.manual_seed(0)
    layers = [nn.Linear(4, 12), nn.Tanh(), *([Res()] if residual else []), nn.Linear(12, 12), nn.GELU()]
    net = nn.Sequential(*layers, nn.Linear(12, 3)).double()
    X, y = torch.randn(2000, 4, dtype=torch.float64), torch.randint(0, 3, (2000,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert riccati.examples_apart(H.blocks)
    monkeypatch.setattr(riccati, "_capacity_bytes", lambda device: 2**40)
    monkeypatch.setattr(riccati, "_cpu_available", lambda: 2**20)  # 1 MiB: the a x a sweep cannot run
    with mock.patch.object(type(H), "to_dense", side_effect=AssertionError("formed the dense matrix")):
        d = H.diagonal()
    _, H_ref = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    assert float((d - H_ref.diagonal()).abs().max()) <= 1e-12 * float(H_ref.abs().max())
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    G_ref = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    assert float((G.diagonal() - G_ref.diagonal()).abs().max()) <= 1e-12 * float(G_ref.abs().max())


@settings(max_examples=20, deadline=None)
@given(chains(max_depth=4, max_width=6, max_batch=7), st.integers(1, 3))
def test_diagonal_a_few_examples_at_a_time(prob, rows):
    """The per-example route in chunks of one to three examples: the same diagonal as autograd's."""
    _, H_ref = autograd_gradient_hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    H = hessinv.hessian(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    d = max(max(b.d_in, b.d_out) for b in H.blocks[:-1])
    with mock.patch.object(riccati, "EXAMPLE_PASS_ENTRIES", rows * riccati.EXAMPLE_COPIES * d * d):
        got = H.diagonal()
    scale = max(float(H_ref.abs().max()), 1e-300)
    assert float((got - H_ref.diagonal()).abs().max()) <= 1e-12 * scale, prob.description


@pytest.mark.parametrize("mid", [nn.Identity, lambda: nn.Dropout(0.1), nn.Flatten, nn.Tanh])
@pytest.mark.parametrize("width", [6, 2])  # (6 > the loss's 3 outputs: factored; 2: full blocks)
def test_parameter_free_stages_keep_the_per_example_route(mid, width):
    """Identity, Dropout (eval) and Flatten between the layers and above the first one pass P through
    (its diagonal only, where no later stage needs more); the diagonals equal autograd's."""
    torch.manual_seed(0)
    layers = [
        nn.Flatten(),
        nn.Linear(4, width),
        nn.Tanh(),
        mid(),
        nn.Linear(width, width),
        mid(),
        nn.Linear(width, 3),
    ]
    net = nn.Sequential(*layers).double().eval()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for make, ref in (
        (hessinv.hessian, autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1]),
        (hessinv.gauss_newton, autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y)),
    ):
        op = make(net, nn.CrossEntropyLoss(), X, y)
        assert riccati.examples_apart(op.blocks)
        assert float((op.diagonal() - ref.diagonal()).abs().max()) <= 1e-13 * float(ref.abs().max())


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_a_piecewise_linear_activation_keeps_the_factored_curvature(act):
    """Activations with ``s'' = 0`` (ReLU, LeakyReLU) carry no second-order weight: the Hessian's
    per-example curvature stays factored at the loss's rank (10 columns) through every stage -- with a
    zero weight it grew by ``m`` columns a stage and went dense (a 64-256-256-10 ReLU MLP's diagonal at
    batch 256: 0.26 s, now 0.03 s) -- and the diagonal is autograd's."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 10)
    ).double()
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 10, (12,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    widths: list[int] = []
    original = type(H.blocks[0]).example_curvature_diagonal

    def spy(self, P, *args, **kwargs):
        # columns of the factored form; 0: only its diagonal (B, d); -1: dense (B, d, d) blocks
        widths.append(P[0].shape[-1] if isinstance(P, tuple) else (0 if P.dim() == 2 else -1))
        return original(self, P, *args, **kwargs)

    with mock.patch.object(type(H.blocks[0]), "example_curvature_diagonal", spy):
        d = H.diagonal()
    assert widths and all(0 <= w <= 10 for w in widths), widths
    _, H_ref = autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)
    assert float((d - H_ref.diagonal()).abs().max()) <= 1e-12 * float(H_ref.abs().max())


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_separate_second_order_products_keep_the_cross_term_without_s2(act):
    """Without a second-order weight (ReLU: ``s'' = 0``) a Linear stage's ``Hxz`` still holds the
    ``(b s')`` cross term of the weight and the input: the separate products (``hxx``, ``hxz``, ``hxzT``,
    ``hzz``, the protocol's unfused step) equal the fused ``hvp_backward``, and ``Hxz`` is autograd's."""
    from hessinv.stages.protocol import Blocks

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)).double()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    blk = H.blocks[1]
    g = torch.Generator().manual_seed(1)
    s = torch.randn(blk.batch, blk.d_out, 2, generator=g, dtype=torch.float64)
    v = torch.randn(blk.p, 2, generator=g, dtype=torch.float64)
    t = torch.randn(blk.batch, blk.d_in, 2, generator=g, dtype=torch.float64)
    fused, separate = blk.hvp_backward(s, v, t), Blocks.hvp_backward(blk, s, v, t)
    for a, b in zip(fused, separate, strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())
    assert float(blk.hxz(t).abs().max()) > 0  # the cross term is there
