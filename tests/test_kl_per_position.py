"""Per-position knowledge distillation: ``KLDivLoss`` of a final ``LogSoftmax(dim=1)`` on ``(B, C, T)``
outputs. The split at the logits took ``(B, C)`` only: per position the Gauss-Newton matrix came back exactly
zero (the log-softmax kept as a stage: its outputs' loss is linear), with a warning about log-probabilities
computed inside a stage (a probe, 2026-12-07). Now split as on ``(B, C)``, for every reduction."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv

F64 = torch.float64


def _gn_at_logits(model, loss_fn, X, y) -> torch.Tensor:
    """``J^T Lambda J`` at the logits (the model's last stage a log-softmax), by plain autograd."""
    params = list(model.parameters())
    z = model[:-1](X)
    zf = z.reshape(-1)
    J = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(zf[i], params, retain_graph=True)])
         for i in range(zf.numel())]
    )  # fmt: skip
    zd = z.detach().requires_grad_()
    gz = torch.autograd.grad(loss_fn(torch.log_softmax(zd, 1), y), zd, create_graph=True)[0].reshape(-1)
    Lam = torch.stack(
        [torch.autograd.grad(gz[i], zd, retain_graph=True)[0].reshape(-1) for i in range(gz.numel())]
    )
    return J.T @ Lam @ J


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_divergence_per_position_is_split_at_the_logits(reduction, log_target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1), nn.LogSoftmax(dim=1))
    model = model.double()
    X = torch.randn(3, 2, 5, dtype=F64)
    q = torch.softmax(2 * torch.randn(3, 3, 5, dtype=F64), 1)
    y = q.log() if log_target else q
    loss_fn = nn.KLDivLoss(reduction=reduction, log_target=log_target)
    ref = _gn_at_logits(model, loss_fn, X, y)
    assert float(ref.norm()) > 0
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    torch.testing.assert_close(G.to_dense(), ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    H = hessinv.hessian(model, loss_fn, X, y)
    torch.testing.assert_close(H.gradient, g_ref, atol=1e-12 * float(g_ref.abs().max()), rtol=0)
    torch.testing.assert_close(H.to_dense(), H_ref, atol=1e-11 * float(H_ref.abs().max()), rtol=0)
