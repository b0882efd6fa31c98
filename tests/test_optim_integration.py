"""The optimizers inside a PyTorch training loop, as a review (2026-12-04) used them: autocast, checkpoints
of another dtype, ``precondition_`` on what it already wrote, and grads left None (gradient hooks:
test_gradient_hooks.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessinv
import hessinv.optim as ho


def _task(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return net, nn.CrossEntropyLoss(), X, y


def _batch(X, y, i: int):
    idx = torch.arange(16) + 16 * (i % 4)
    return X[idx], y[idx]


def test_autocast_is_refused_at_every_step_not_only_at_a_refresh():
    """Between curvature refreshes no forward of the library's own ran, so a step under autocast trained on
    a bfloat16 gradient and the loop died at the refresh, 10 steps later; now refused at once, and the
    refused step changes nothing."""
    net, loss, X, y = _task()
    opt = ho.Newton(net, loss, seed=0)
    opt.step(*_batch(X, y, 0))
    opt.step(*_batch(X, y, 1))
    before = [p.detach().clone() for p in net.parameters()]
    steps = opt.steps
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(hessinv.DtypeMismatchError, match="autocast"),
    ):
        opt.step(*_batch(X, y, 2))
    assert opt.steps == steps and all(
        torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True)
    )

    pre = ho.Preconditioner(net, loss, seed=0)
    xb, yb = _batch(X, y, 0)
    loss(net(xb), yb).backward()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(hessinv.DtypeMismatchError, match="autocast"),
    ):
        pre.precondition_(xb, yb)


def test_a_checkpoint_of_another_dtype_is_cast_on_load():
    """A float64 run's state loaded into a float32 optimizer (torch.optim casts its state alike): the next
    steps ran into a bare RuntimeError; now they run, and follow the float64 run to float32 accuracy."""
    net64, loss, X, y = _task()
    net64 = net64.double()
    opt64 = ho.Newton(net64, loss, seed=0)
    for i in range(12):  # past a refresh (every 10 steps)
        xb, yb = _batch(X, y, i)
        opt64.step(xb.double(), yb)
    net32 = _task(1)[0]
    net32.load_state_dict({k: v.float() for k, v in net64.state_dict().items()})
    opt32 = ho.Newton(net32, loss, seed=5)
    opt32.load_state_dict(opt64.state_dict())
    for i in range(12, 15):
        xb, yb = _batch(X, y, i)
        opt64.step(xb.double(), yb)
        opt32.step(xb, yb)
    for a, b in zip(net64.parameters(), net32.parameters(), strict=True):
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5)

    pre64 = ho.Preconditioner(net64, loss, seed=0)
    xb, yb = _batch(X, y, 0)
    loss(net64(xb.double()), yb).backward()
    pre64.precondition_(xb.double(), yb)
    pre32 = ho.Preconditioner(net32, loss, seed=0)
    pre32.load_state_dict(pre64.state_dict())
    assert pre32.state["v"].dtype == torch.float32
    net32.zero_grad()
    loss(net32(xb), yb).backward()
    assert torch.isfinite(pre32.precondition_(xb, yb)).all()


def test_precondition_refuses_its_own_direction_and_keeps_none_grads():
    net, loss, X, y = _task()
    pre = ho.Preconditioner(net, loss, seed=0)
    xb, yb = _batch(X, y, 0)
    loss(net(xb), yb).backward()
    pre.precondition_(xb, yb)
    with pytest.raises(hessinv.InvalidArgumentError, match="still the direction"):
        pre.precondition_(xb, yb)  # no backward() since: a direction, not a gradient
    net.zero_grad()
    loss(net(xb), yb).backward()
    net[0].weight.grad = None  # torch's idiom: skip this parameter
    d = pre.precondition_(xb, yb)
    assert net[0].weight.grad is None and net[0].bias.grad is not None
    assert float(d[: net[0].weight.numel()].abs().max()) > 0  # (the coupling would have moved it)
