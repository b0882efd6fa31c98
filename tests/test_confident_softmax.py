"""A confidently classified batch: the cross-entropy's curvature in the logits, ``diag p - p p^T``, is of
the size of the small probabilities, and ``1 - p_max`` must not be formed by cancellation (a probe: at a
logit margin of 25 the Gauss-Newton matrix came out 3e-7 off relative to its norm in float64, and a solve
at condition number 2 had a true residual of 1e-11 while reporting 1e-16).

The reference is exact: ``J^T Lambda J`` with the outputs' Jacobian ``J`` of a linear model (by autograd:
no cancellation there) and ``Lambda`` from the logits in arithmetic of 40 digits more than the
cancellation takes (mpmath, which torch installs through sympy). Plain autograd's double backward is
*not* a reference here: it forms ``p_i (1 - p_i)`` with the same cancellation (2.7e-7 relative at
margin 25)."""

from __future__ import annotations

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_output_jacobian
from torch import nn

import hessinv
from hessinv.stages.losses import softmax_curvature


def _exact_lambda(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight (diag p - p p^T)`` of ``p = softmax(logits)`` (one position's C logits), with 40 digits
    beyond those ``1 - p_max`` cancels (``log10 e`` per unit of the logits' spread)."""
    spread = float(logits.max() - logits.min())
    with mpmath.workdps(40 + int(0.45 * spread)):
        y = [mpmath.mpf(float(v)) for v in logits]
        top = max(y)
        e = [mpmath.exp(v - top) for v in y]
        s = mpmath.fsum(e)
        p = [v / s for v in e]
        C = len(p)
        lam = [[weight * ((p[i] if i == j else 0) - p[i] * p[j]) for j in range(C)] for i in range(C)]
        return torch.tensor([[float(v) for v in row] for row in lam], dtype=torch.float64)


def _exact_gauss_newton(model: nn.Module, X: torch.Tensor, classes: int, positions: int) -> torch.Tensor:
    """``J^T blockdiag(Lambda) J`` for the mean cross-entropy over ``B x positions`` logit vectors."""
    out = model(X).detach()  # (B, C) or (B, C, T)
    B = out.shape[0]
    out = out.reshape(B, classes, positions)
    J = autograd_output_jacobian(model, X).reshape(B * classes * positions, -1)  # rows: outputs' order
    blocks = torch.zeros(B * classes * positions, B * classes * positions, dtype=torch.float64)
    for b in range(B):
        for t in range(positions):
            lam = _exact_lambda(out[b, :, t], 1.0 / (B * positions))
            idx = b * classes * positions + torch.arange(classes) * positions + t
            blocks[idx[:, None], idx[None, :]] = lam
    return J.T @ blocks @ J


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    classes=st.integers(2, 5),
    positions=st.sampled_from([1, 3]),
    batch=st.integers(1, 4),
    margin=st.floats(0.0, 38.0),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_confident_cross_entropy_curvature_is_exact(seed, classes, positions, batch, margin, smoothing):
    """Products with the Hessian and the Gauss-Newton matrix (equal for a linear model), the dense
    matrix, and a well-conditioned solve agree with the exact curvature to 1e-12 relative."""
    g = torch.Generator().manual_seed(seed)
    d = 3
    lin = nn.Linear(d, classes * positions).double()
    with torch.no_grad():
        lin.weight.copy_(0.1 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
        top = torch.randint(0, classes, (positions,), generator=g)
        bias = torch.zeros(classes, positions, dtype=torch.float64)
        bias[top, torch.arange(positions)] = margin  # each position predicts its `top` class confidently
        lin.bias.copy_(bias.reshape(-1))
    model = lin if positions == 1 else nn.Sequential(lin, nn.Unflatten(1, (classes, positions)))
    X = torch.randn(batch, d, generator=g, dtype=torch.float64)
    shape = (batch,) if positions == 1 else (batch, positions)
    y = torch.randint(0, classes, shape, generator=g)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)  # (|q| = 1: Lambda does not depend on it)

    ref = _exact_gauss_newton(model, X, classes, positions)
    scale = float(torch.linalg.matrix_norm(ref, 2))
    n = ref.shape[0]
    V = torch.randn(n, 3, generator=g, dtype=torch.float64)
    for op in (hessinv.gauss_newton(model, loss_fn, X, y), hessinv.hessian(model, loss_fn, X, y)):
        assert float((op @ V - ref @ V).norm()) <= 1e-12 * scale * float(V.norm())
        assert float(torch.linalg.matrix_norm(op.to_dense() - ref, 2)) <= 1e-12 * scale
        b = V[:, 0]
        x = op.solve(b, damping=scale)  # condition number at most 2
        A = ref + scale * torch.eye(n, dtype=torch.float64)
        assert float((b - A @ x).norm() / b.norm()) <= 1e-12


def test_softmax_curvature_against_many_digits():
    """The product itself, at margins up to 300 (where ``1 - p_max`` underflows in any formula but the
    sums of the small probabilities keep it), flat and per position, in float64 and float32."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        for margin in (0.0, 5.0, 20.0, 36.0, 80.0, 300.0 if dtype == torch.float64 else 80.0):
            y = torch.randn(4, 5, generator=g, dtype=torch.float64)
            y[:, 2] += margin
            y = y.to(dtype)
            p = torch.softmax(y, 1)
            t = torch.randn(4, 5, 2, generator=g, dtype=torch.float64).to(dtype)
            ours = softmax_curvature(p[:, :, None], t, 1)
            for b in range(4):
                lam = _exact_lambda(y[b].double(), 1.0)
                ref = lam @ t[b].double()
                err = float((ours[b].double() - ref).abs().max())
                assert err <= tol * float(lam.abs().max()) * float(t[b].abs().max()) * 5, (dtype, margin)


def test_confident_binary_cross_entropy_curvature_is_exact():
    """``BCEWithLogitsLoss``'s curvature ``sigma (1 - sigma)`` at logits far from 0, both signs (1 - sigma
    cancelled at large positive logits), against 40-digit arithmetic: the Gauss-Newton matrix of a linear
    model to 1e-12 relative."""
    g = torch.Generator().manual_seed(0)
    for margin in (0.0, 10.0, 20.0, 30.0):
        lin = nn.Linear(3, 4).double()
        with torch.no_grad():
            lin.weight.copy_(0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.tensor([margin, -margin, margin, margin], dtype=torch.float64))
        X = torch.randn(5, 3, generator=g, dtype=torch.float64)
        y = torch.rand(5, 4, generator=g, dtype=torch.float64)
        out = lin(X).detach()
        with mpmath.workdps(60):
            lam = [
                float(
                    mpmath.mpf(1) / (mpmath.exp(-mpmath.mpf(float(v))) + 2 + mpmath.exp(mpmath.mpf(float(v))))
                )
                for v in out.reshape(-1)
            ]
        Lam = torch.diag(torch.tensor(lam, dtype=torch.float64)) / out.numel()
        J = autograd_output_jacobian(lin, X).reshape(out.numel(), -1)
        ref = J.T @ Lam @ J
        G = hessinv.gauss_newton(lin, nn.BCEWithLogitsLoss(), X, y).to_dense()
        assert float(torch.linalg.matrix_norm(G - ref, 2)) <= 1e-12 * float(torch.linalg.matrix_norm(ref, 2))


def _exact_residual(logits: torch.Tensor, y: torch.Tensor, bce: bool) -> torch.Tensor:
    """The loss's gradient in the outputs, unscaled: ``softmax(logits) - onehot(y)`` per row, or
    ``sigmoid(logits) - y`` entrywise (``bce``), with 40 digits beyond the cancellation (mpmath)."""
    spread = float(logits.abs().max()) if bce else float((logits.max(1).values - logits.min(1).values).max())
    out = torch.zeros_like(logits)
    with mpmath.workdps(40 + int(0.45 * spread)):
        for b in range(logits.shape[0]):
            row = [mpmath.mpf(float(v)) for v in logits[b]]
            if bce:
                out[b] = torch.tensor(
                    [float(1 / (1 + mpmath.exp(-v)) - float(t)) for v, t in zip(row, y[b], strict=True)],
                    dtype=torch.float64,
                )
                continue
            top = max(row)
            e = [mpmath.exp(v - top) for v in row]
            s = mpmath.fsum(e)
            out[b] = torch.tensor(
                [float(v / s - (1 if i == int(y[b]) else 0)) for i, v in enumerate(e)], dtype=torch.float64
            )
    return out


@pytest.mark.parametrize("kind", ["ce", "bce", "ce-weighted"])
def test_the_gradient_of_a_confident_classifier_is_exact_and_so_is_its_hessian(kind):
    """The loss's gradient in the outputs was formed as ``p_y - 1`` (``sigmoid(y) - t``): at a logit margin of
    30 ``H.gradient`` was 8.6e-4 off and the Hessian's second-order term with it (1.3e-7; BCE at a logit of
    30: 7.2e-4), through a nonlinear model (a probe; a linear one has no such term). Reference: that
    gradient in many digits, back-propagated by autograd (the Jacobian has no cancellation), and the
    Hessian ``J^T Lambda J + sum_k r_k d2 o_k``. With class weights (``weight=``) the cross-entropy took
    autograd's ``w_y (p_y - 1)`` until 2026-12-06 (2.7% off at confident logits, a probe): the closed form
    now, each example's terms times its class's weight."""
    bce = kind == "bce"
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) if kind == "ce-weighted" else None
    torch.manual_seed(0)
    D = torch.float64
    X = torch.randn(4, 3, dtype=D)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # (logits 30 at each example's class, 0 (CE) or -30 (BCE) elsewhere)
        h = torch.tanh(m[0](X))
        target = 30.0 * nn.functional.one_hot(y, 3).to(D)
        target = 2 * target - 30.0 if bce else target  # (BCE: -30 where the target is 0)
        sol = torch.linalg.lstsq(torch.cat([h, torch.ones(4, 1, dtype=D)], 1), target).solution
        m[2].weight.copy_(sol[:5].T)
        m[2].bias.copy_(sol[5])
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum") if bce else nn.CrossEntropyLoss(weight=w, reduction="sum")
    t = nn.functional.one_hot(y, 3).to(D) if bce else y
    params = list(m.parameters())
    out = m(X)
    wy = torch.ones(4, dtype=D) if w is None else w[y]  # (each example's class weight)
    r = _exact_residual(out.detach(), t, bce) * wy[:, None]
    g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(out, params, r, retain_graph=True)])
    J = autograd_output_jacobian(m, X).reshape(12, -1)
    if bce:
        s = torch.sigmoid(out.detach()).reshape(-1)
        lam = torch.diag(s * torch.sigmoid(-out.detach()).reshape(-1))
    else:
        lam = torch.block_diag(*[_exact_lambda(out[b].detach(), float(wy[b])) for b in range(4)])
    gs = torch.autograd.grad((m(X) * r).sum(), params, create_graph=True)
    flat = torch.cat([v.reshape(-1) for v in gs])
    second = torch.stack(
        [
            torch.cat(
                [
                    v.reshape(-1)
                    for v in torch.autograd.grad(
                        f, params, retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                ]
            )
            for f in flat
        ]
    )
    ref = J.T @ lam @ J + second
    H = hessinv.hessian(m, loss_fn, X, t)
    assert float((H.gradient - g).norm() / g.norm()) < 1e-12
    assert float((H.to_dense() - ref).norm() / ref.norm()) < 1e-12
