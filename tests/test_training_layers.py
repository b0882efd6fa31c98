"""Dropout and BatchNorm in training mode under the optimizer: the gradient as the model computes it (batch
statistics, dropout masks), the curvature of the deterministic network (eval mode), modes put back after
every step; the trust region, which models the batch loss of a deterministic network, refuses them."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton
from torch import nn

import hessinv
import hessinv.optim as ho


def _bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)
    ).double()


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return X, X[:, :3].argmax(1)  # (a rule the network can learn)


def test_newton_trains_with_batchnorm_and_dropout_in_training_mode():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(256)
    opt = ho.Newton(model, loss_fn, seed=0)
    with torch.no_grad():
        model.eval()
        first = float(loss_fn(model(X), y))
        model.train()
    mean0 = model[1].running_mean.clone()
    for i in list(range(0, 256, 16)) * 3:
        opt.step(X[i : i + 16], y[i : i + 16])
        assert all(m.training for m in model.modules())  # the modes as they were
    assert opt.mode == "precondition"
    assert not torch.equal(model[1].running_mean, mean0)  # the steps' forwards ran in training mode
    with torch.no_grad():
        model.eval()
        assert float(loss_fn(model(X), y)) < 0.75 * first


def test_the_step_takes_the_training_mode_loss_and_the_eval_mode_curvature():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    model[3].p = 0.0  # (Dropout off: the training-mode function is deterministic, comparable)
    X, y = _data(8)
    pre = ho.Preconditioner(model, loss_fn, curvature_batch_size=8, basis="identity", seed=0)
    U, S = pre.curvature_root(X, y)
    assert model.training and model[1].training
    model.eval()
    ref = autograd_gauss_newton(model, loss_fn, X, y)
    model.train()
    assert torch.allclose(U.T @ (S[:, None] * U), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    opt = ho.Newton(model, loss_fn, seed=0)
    with torch.no_grad():
        train_loss = float(loss_fn(model(X), y))  # batch statistics (and running stats moved once)
    model[1].reset_running_stats()
    opt.step(X, y)
    assert opt.last_stats.loss == pytest.approx(train_loss, rel=1e-12)


def test_precondition_with_training_layers_restores_the_modes():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(16)
    pre = ho.Preconditioner(model, loss_fn, seed=0)
    loss_fn(model(X), y).backward()
    d = pre.precondition_(X, y)
    assert bool(torch.isfinite(d).all()) and all(m.training for m in model.modules())


def test_the_trust_region_refuses_training_layers_and_auto_preconditions():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(16)
    opt = ho.Newton(model, loss_fn, mode="trust-region")
    with pytest.raises(hessinv.InvalidArgumentError, match="BatchNorm1d, Dropout in training mode"):
        opt.step(X, y)
    auto = ho.Newton(model, loss_fn, seed=0)  # mode="auto" on a full batch: the trust region if it could
    for _ in range(3):
        auto.step(X, y)
    assert auto.mode == "precondition"
    model.eval()  # the deterministic network: the trust region takes it
    opt.step(X, y)
    assert opt.last_stats.mode == "trust-region"
