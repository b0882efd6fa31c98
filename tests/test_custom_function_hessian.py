"""Custom ``autograd.Function`` stages whose backward autograd cannot differentiate correctly: the Hessian
refused by name, the Gauss-Newton matrix exact; a correct custom backward kept (plain-autograd float64
references). A probe's finding (2026-12-07): a Swish whose backward detaches its saved input gave a
Hessian 29% off, with no error."""

from __future__ import annotations

import pytest
import torch
from reference import (
    autograd_gauss_newton,
    autograd_gradient_hessian,
    autograd_hessian_vector_product,
    trainable,
)
from torch import Tensor, nn

import hessinv
from hessinv import NoExactHessian


class _SwishExact(torch.autograd.Function):
    """x sigmoid(x), its backward differentiable (saved tensors used as they are)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _swish_slope(x)


class _SwishDetached(_SwishExact):
    """The same function, its backward computed from a detached input: right to first order only."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _swish_slope(x.detach())


def _swish_slope(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


class _ScaleDetachedWeight(torch.autograd.Function):
    """y = w * x with a parameter w; the backward's w-gradient computed under no_grad: the mixed second
    derivative d2/dw dx is lost."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.no_grad():
            gw = (g * x).sum(0)
        return g * w, gw


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return _ScaleDetachedWeight.apply(x, self.w)


def _model(mid: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), mid, nn.Linear(6, 3)).to(dtype)


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 5, generator=g, dtype=dtype), torch.randint(0, 3, (12,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mid", ["activation", "parameter"])
def test_a_detached_custom_backward_is_refused_for_the_hessian(dtype, mid):
    m = _model(_Act(_SwishDetached) if mid == "activation" else nn.Sequential(nn.Tanh(), _Scale(6)), dtype)
    X, y = _data(dtype)
    loss = nn.CrossEntropyLoss()
    with pytest.raises(NoExactHessian, match="custom autograd.Function"):
        hessinv.hessian(m, loss, X, y).to_dense()
    # the Gauss-Newton matrix needs first derivatives only: exact
    G = hessinv.gauss_newton(m, loss, X, y).to_dense()
    ref = autograd_gauss_newton(m, loss, X, y)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert float((G - ref).abs().max() / ref.abs().max()) <= tol


def _true_hessian_by_differences(m: nn.Module, loss, X: Tensor, y: Tensor) -> Tensor:
    """Central differences of the (exact, first-order) gradient, float64."""
    ps = trainable(m)
    theta = torch.cat([p.detach().reshape(-1) for p in ps])

    def grad_at(th: Tensor) -> Tensor:
        o = 0
        with torch.no_grad():
            for p in ps:
                p.copy_(th[o : o + p.numel()].view_as(p))
                o += p.numel()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(m(X), y), ps)])

    h = 1e-5
    E = torch.eye(theta.numel(), dtype=theta.dtype)
    H = torch.stack([(grad_at(theta + h * e) - grad_at(theta - h * e)) / (2 * h) for e in E])
    grad_at(theta)
    return H


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_exact_custom_backward_is_kept(seed):
    """A custom Function whose backward is differentiable: not refused, the Hessian equal to plain autograd's
    and to central differences of the gradient (the check's own reference, independent of it)."""
    m = _model(_Act(_SwishExact), torch.float64, seed)
    X, y = _data(torch.float64, seed)
    loss = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, loss, X, y).to_dense()
    _, ref = autograd_gradient_hessian(m, loss, X, y)
    assert float((H - ref).abs().max() / ref.abs().max()) <= 1e-12
    fd = _true_hessian_by_differences(m, loss, X, y)
    assert float((H - fd).abs().max() / fd.abs().max()) <= 1e-6


def test_an_exact_custom_backward_is_kept_in_float32():
    m = _model(_Act(_SwishExact), torch.float32, 3)
    X, y = _data(torch.float32, 3)
    loss = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, loss, X, y).to_dense()
    _, ref = autograd_gradient_hessian(m, loss, X, y)
    assert float((H - ref).abs().max() / ref.abs().max()) <= 1e-4


class _Conv(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(2, 3, 3, padding=1), fn

    def forward(self, x):
        return self.fn.apply(self.conv(x))


@pytest.mark.parametrize("fn", [_SwishDetached, _SwishExact])
def test_lazy_products_of_a_large_stage_check_a_custom_backward(fn):
    """A convolution stage large enough that its Hessian products are taken on autograd's graph, not dense
    blocks (LazyBlocks): the same check on the products."""
    torch.manual_seed(0)
    m = nn.Sequential(_Conv(fn), nn.Flatten(), nn.Linear(3 * 24 * 24, 4)).double()
    X, y = torch.randn(16, 2, 24, 24, dtype=torch.float64), torch.randint(0, 4, (16,))
    loss = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in trainable(m)), dtype=torch.float64)
    if fn is _SwishDetached:
        with pytest.raises(NoExactHessian, match="custom autograd.Function"):
            hessinv.hessian(m, loss, X, y) @ v
        return
    H = hessinv.hessian(m, loss, X, y)
    ref = autograd_hessian_vector_product(m, loss, X, y, v)
    assert float((H @ v - ref).norm() / ref.norm()) <= 1e-12


class _MulTanh(torch.autograd.Function):
    """tanh(x w) with an exact (differentiable) backward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.tanh(x * w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        d = g * (1 - torch.tanh(x * w) ** 2)
        return d * w, (d * x).sum(0)


class _AliasedScale(nn.Module):
    """Its parameter read through a list made in ``__init__``, which a functional call does not replace; the
    forward is data-dependent, so the module is one stage called whole."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.ws = [self.w]

    def forward(self, x):
        if bool(x.isfinite().all()):
            pass
        return _MulTanh.apply(x, self.ws[0])


def test_an_exact_backward_whose_parameter_a_functional_call_cannot_move_is_kept():
    """The differences cannot move the parameter there (their outputs disagree with J v): no check is made,
    rather than a refusal of an exact Hessian (a review's finding: "80% off")."""
    m = _model(_AliasedScale(6), torch.float64)
    X, y = _data(torch.float64)
    loss = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, loss, X, y).to_dense()
    _, ref = autograd_gradient_hessian(m, loss, X, y)
    assert float((H - ref).abs().max() / ref.abs().max()) <= 1e-12


class _Block(nn.Module):
    """Linear -> (custom) Swish -> Linear as one stage (a data-dependent forward): the Function's missing
    term is part of a Hessian with other curvature, not all of it."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(5, 6), act, nn.Linear(6, 3)

    def forward(self, x):
        if bool(x.isfinite().all()):
            pass
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_detached_backward_inside_a_block_is_refused_at_any_input_scale(dtype, scale):
    """A review found the float32 check blind to a missing term below half the second derivatives (the Hessian
    32% off, no error), and every dtype blind at inputs of scale 255 (one step for parameters and inputs:
    87-91% off): the step is now per tensor, and the refusal is judged against the differences' own error."""
    torch.manual_seed(0)
    m = nn.Sequential(_Block(_Act(_SwishDetached))).to(dtype)
    with torch.no_grad():
        m[0].a.weight /= scale  # (pre-activations of size 1 at inputs of size `scale`)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 5, generator=g, dtype=dtype) * scale, torch.randint(0, 3, (12,), generator=g)
    with pytest.raises(NoExactHessian, match="finite differences"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).to_dense()
    m_exact = nn.Sequential(_Block(_Act(_SwishExact))).to(dtype)
    m_exact.load_state_dict(m.state_dict())
    H = hessinv.hessian(m_exact, nn.CrossEntropyLoss(), X, y).to_dense()  # (the exact one is kept)
    _, ref = autograd_gradient_hessian(m_exact, nn.CrossEntropyLoss(), X, y)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert float((H - ref).abs().max() / ref.abs().max()) <= tol
